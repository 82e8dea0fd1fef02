"""Rotate the in_features blocks of config-selected mixture-of-experts sites by a normalized Hadamard matrix.

The expert form of RotateLinearPass: for an expert site whose rule says `rotation = "hadamard"`,
each expert's `y = x W_e^T` becomes `y = hadamard(x) (W_e H)^T` (exact without quantization: H is
orthogonal). The stacked parameter is rotated once, here, along its in_features axis (axis 2 of
`[E, out, in]`, axis 1 of `[E, in, out]`; a new buffer, the fp parameter dropped when nothing else
reads it), and the product's activation operand online by an `mxfx.hadamard` node along its
in_features axis. InsertExpertQDQPass then quantizes the rotated operands (OCP MX v1.0 §6.3).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from mxfx.passes._utils import count_rewrites, create_call, create_get_attr, fake_mode_of, finish
from mxfx.passes.insert_expert_qdq import replace_weight
from mxfx.passes.match_expert_sites import expert_product
from mxfx.passes.rotate_linear import attribute, drop_unread
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx.graph.config import QuantConfig
from mxfx.graph.sites import CHECK_FAILED, EXPERT_FORMS, annotate, site_of
from mxfx.recovery.rotation import rotate_weight

log = logging.getLogger(__name__)
DONE_META = "mxfx_expert_rotated"  # node.meta key: the Hadamard block size applied to this product


class RotateExpertsPass(PassBase):
    """Rotate the activation (online) and the stacked weight (offline) of each quantized expert site
    whose rule has a rotation.

    Requires: MatchExpertSitesPass annotations; runs before GPTQExpertsPass and InsertExpertQDQPass.
    Ensures: new nodes carry meta["val"] and the product's metadata; a site whose in_features the
    block does not divide is marked CHECK_FAILED (left in high precision, with the reason); rotated
    products are marked, so running twice is a no-op.
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        fake_mode = fake_mode_of(gm)
        rotated: dict[tuple[str, int, int], str] = {}
        replaced: set[str] = set()
        rewrites = 0
        for node in list(gm.graph.nodes):
            site = site_of(node)
            if site is None or site.form not in EXPERT_FORMS or not site.quantized or DONE_META in node.meta:
                continue
            block = site.rotation_block
            if not block:
                continue
            product = expert_product(node)
            in_features = site.weight_shape[2]
            if in_features % block:
                reason = f"the Hadamard rotation block {block} does not divide in_features {in_features}"
                annotate(node, dataclasses.replace(site, status=CHECK_FAILED, reason=reason, weight=None,
                                                   activation=None, weight_storage=""))
                log.warning("expert site %s left in high precision: %s", site.fqn, reason)
                rewrites += 1
                continue
            target, axis = str(product.attr.target), product.param_axis
            key = (target, axis, block)
            if key not in rotated:
                name = f"mxfx_rot_experts{len(rotated)}_" + target.replace(".", "_")
                tensor = attribute(gm, target).detach()
                # rotate_weight rotates the last axis: move in_features there and back
                gm.register_buffer(name, rotate_weight(tensor.movedim(axis, -1), block).movedim(-1, axis).contiguous())
                rotated[key] = name
            with gm.graph.inserting_before(product.chain[0] if product.chain else node):
                replace_weight(gm, node, product, create_get_attr(gm, rotated[key], fake_mode))
            with gm.graph.inserting_before(node):
                x = node.args[product.x_index]
                node.update_arg(product.x_index, create_call(gm, torch.ops.mxfx.hadamard.default,
                                                             (x, block, product.x_axis), node, fake_mode))
            replaced.add(target)
            node.meta[DONE_META] = block
            rewrites += 1
            log.debug("rotated expert site %s (Hadamard blocks of %d)", site.fqn, block)
        if rewrites:
            finish(gm)
            drop_unread(gm, replaced)
        count_rewrites(gm, type(self).__name__, rewrites)
        return PassResult(gm, rewrites > 0)
