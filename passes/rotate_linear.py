"""Rotate the in_features blocks of config-selected linears by a normalized Hadamard matrix.

For a linear site whose rule says `rotation = "hadamard"`, `y = x W^T + b` becomes
`y = hadamard(x) (W H)^T + b` (exact without quantization: H is orthogonal): the weight is rotated
once, here (a new buffer; the fp weight is dropped when nothing else reads it), and the input
online by an `mxfx.hadamard` node. InsertQDQPass then quantizes the rotated operands, so the MX
blocks (OCP MX v1.0 §6.3) see values with their outliers spread over the block.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from mxfx.passes._utils import (
    chain_key,
    count_rewrites,
    create_call,
    create_get_attr,
    evaluate_chain,
    fake_mode_of,
    finish,
)
from mxfx.passes.match_linear_sites import linear_weight
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx.graph.config import QuantConfig
from mxfx.graph.sites import CHECK_FAILED, annotate, site_of
from mxfx.recovery.rotation import rotate_weight

log = logging.getLogger(__name__)
DONE_META = "mxfx_rotated"  # node.meta key: the Hadamard block size applied to this linear


def attribute(gm: fx.GraphModule, target: str) -> torch.Tensor:
    """The parameter or buffer a get_attr node reads."""
    owner_path, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner_path) if owner_path else gm, name)


def drop_unread(gm: fx.GraphModule, targets: set[str]) -> None:
    """Delete the attributes among `targets` that no get_attr node reads any more."""
    still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for target in targets - still_read:
        owner_path, _, name = target.rpartition(".")
        delattr(gm.get_submodule(owner_path) if owner_path else gm, name)


class RotateLinearPass(PassBase):
    """Insert the online Hadamard rotation of the input and rotate the weight offline, at each
    quantized linear site whose rule has a rotation.

    Requires: MatchLinearSitesPass annotations; runs before InsertQDQPass.
    Ensures: new nodes carry meta["val"] and the linear's metadata; a site whose in_features the
    block does not divide is marked CHECK_FAILED (left in high precision, with the reason in the
    report); rotated linears are marked, so running twice is a no-op.
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        fake_mode = fake_mode_of(gm)
        rotated: dict[tuple[str, int], str] = {}  # (weight target, block) -> rotated buffer (tied weights)
        replaced: set[str] = set()
        rewrites = 0
        for node in list(gm.graph.nodes):
            site, found = site_of(node), linear_weight(node)
            if site is None or found is None or not site.quantized or DONE_META in node.meta:
                continue
            attr, chain = found  # the weight the linear reads: `chain` applied to `attr`'s tensor
            weight = node.args[1]
            block = site.rotation_block
            if not block:
                continue
            in_features = weight.meta["val"].shape[1]
            if in_features % block:
                reason = f"the Hadamard rotation block {block} does not divide in_features {in_features}"
                annotate(node, dataclasses.replace(site, status=CHECK_FAILED, reason=reason, weight=None,
                                                   activation=None, weight_storage=""))
                log.warning("linear %s left in high precision: %s", site.fqn, reason)
                rewrites += 1
                continue
            key = (str(attr.target), chain_key(chain), block)
            if key not in rotated:
                name = f"mxfx_rot{len(rotated)}_" + key[0].replace(".", "_")
                tensor = evaluate_chain(attribute(gm, key[0]).detach(), attr, chain).contiguous()
                gm.register_buffer(name, rotate_weight(tensor, block))
                rotated[key] = name
            with gm.graph.inserting_before(node):
                node.update_arg(1, create_get_attr(gm, rotated[key], fake_mode))
                node.update_arg(0, create_call(gm, torch.ops.mxfx.hadamard.default, (node.args[0], block, -1), node, fake_mode))
            replaced.add(key[0])
            node.meta[DONE_META] = block
            rewrites += 1
            log.debug("rotated %s (Hadamard blocks of %d)", site.fqn, block)
        if rewrites:
            finish(gm)
            drop_unread(gm, replaced)
        count_rewrites(gm, type(self).__name__, rewrites)
        return PassResult(gm, rewrites > 0)
