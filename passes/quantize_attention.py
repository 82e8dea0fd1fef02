"""Quantize the operands of attention matmuls (QK^T and PV) at config-matched attention sites.

SDPA calls become one fused `mxfx.attention` op (reference = the decomposed MX math; Inductor
compiles it). Explicit forms get `mxfx.fake_quantize` on each operand of their QK^T and PV products
(matmul, bmm, baddbmm's batch1 @ batch2, einsum), blocked along that product's reduction axis: the
last axis of the left operand, the second-to-last of the right one (for einsum, the position of
the contracted index). For a bmm with a pre-transposed K the right operand's second-to-last axis is
still the contracted one: the operand is quantized as the product receives it.
"""

from __future__ import annotations

import logging
import warnings

import torch
from mxfx.passes._utils import count_rewrites, create_call, fake_mode_of, finish
from mxfx.passes.insert_qdq import spec_args
from mxfx.passes.match_attention_sites import SDPA, contraction_axes, product_operands
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx.errors import MXFXError
from mxfx.graph.config import MXSpec, QuantConfig
from mxfx.graph.sites import SITE_META, site_of
from mxfx.numerics import ops as _ops  # noqa: F401  (registers the torch.ops.mxfx ops named here)

log = logging.getLogger(__name__)
aten, mxfx_ops = torch.ops.aten, torch.ops.mxfx
DONE_META = "mxfx_attention_done"


def _sdpa_arguments(node: fx.Node) -> dict:
    names = [a.name for a in SDPA._schema.arguments]
    bound = {a.name: a.default_value for a in SDPA._schema.arguments if a.has_default_value()}
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


class QuantizeAttentionPass(PassBase):
    """Insert MX quantization on Q, K, V and P at each attention site whose rule asks for it.

    Requires: MatchAttentionSitesPass annotations. Ensures: new nodes carry meta["val"] and the
    site's nn_module_stack; processed sites are marked, so running twice is a no-op.
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        fake_mode = fake_mode_of(gm)
        by_name = {n.name: n for n in gm.graph.nodes}
        rewrites = 0
        for node in list(gm.graph.nodes):
            site = site_of(node)
            if site is None or site.kind != "attention" or not site.quantized or DONE_META in node.meta:
                continue
            spec = site.attention
            if site.form == "sdpa":
                if not self._rewrite_sdpa(gm, node, spec, fake_mode, site.fqn):
                    continue
            else:
                qk, pv = site.nodes
                self._quantize_matmul(gm, by_name[qk], spec.query, spec.key, fake_mode)
                self._quantize_matmul(gm, by_name[pv], spec.probs, spec.value, fake_mode)
                node.meta[DONE_META] = True
            rewrites += 1
            log.debug("quantized attention at %s (%s)", site.fqn, site.form)
        if rewrites:
            finish(gm)
        count_rewrites(gm, type(self).__name__, rewrites)
        return PassResult(gm, rewrites > 0)

    @staticmethod
    def _rewrite_sdpa(gm, node, spec, fake_mode, fqn) -> bool:
        args = _sdpa_arguments(node)
        if args["dropout_p"] != 0.0:
            warnings.warn(f"mxfx: attention at {fqn!r} has dropout_p={args['dropout_p']}; left unquantized "
                          "(export the model in eval mode)", stacklevel=2)
            return False
        as_arg = lambda s: "" if s is None else s.to_arg()  # noqa: E731
        with gm.graph.inserting_before(node):
            fused = create_call(gm, mxfx_ops.attention.default, (
                args["query"], args["key"], args["value"], args["attn_mask"], bool(args["is_causal"]), args["scale"],
                bool(args["enable_gqa"]), as_arg(spec.query), as_arg(spec.key), as_arg(spec.value), as_arg(spec.probs),
            ), node, fake_mode)
        fused.meta[SITE_META] = node.meta[SITE_META]
        fused.meta[DONE_META] = True
        node.replace_all_uses_with(fused)
        gm.graph.erase_node(node)
        return True

    @staticmethod
    def _quantize_matmul(gm, matmul: fx.Node, left: MXSpec | None, right: MXSpec | None, fake_mode) -> None:
        """fake_quantize each operand of `matmul` (matmul, bmm, baddbmm's batch1 @ batch2, einsum)
        along its reduction axis; MatchAttentionSitesPass checked the shapes and the equation."""
        axes = contraction_axes(matmul)
        if axes is None:  # the matcher records such a product as UNSUPPORTED, never as QUANTIZED
            raise MXFXError(f"internal: attention product {matmul.name!r} has no single contraction axis")
        operands = list(product_operands(matmul))
        for index, (spec, axis) in enumerate(zip((left, right), axes)):
            if spec is None:
                continue
            with gm.graph.inserting_before(matmul):
                operands[index] = create_call(gm, mxfx_ops.fake_quantize.default, (operands[index], *spec_args(spec, axis)), matmul, fake_mode)
        if matmul.target is aten.einsum.default:
            matmul.update_arg(1, operands)
        else:
            first = 1 if matmul.target is aten.baddbmm.default else 0  # baddbmm(input, batch1, batch2)
            matmul.update_arg(first, operands[0])
            matmul.update_arg(first + 1, operands[1])

