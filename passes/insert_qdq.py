"""Insert MX quantize/dequantize around each config-matched linear.

Activations get a dynamic `mxfx.fake_quantize` (quantize -> dequantize in one op, blocked along
in_features). Weights are quantized once, here: with `weight_storage = "packed"` the module keeps
only uint8 codes + E8M0 scales and an `mxfx.dequantize` node feeds the linear (the fp weight is
dropped); with "simulated" it keeps the fake-quantized fp weight. A weight read through a chain
of views, slices or casts (GPT-2's `Conv1D` weight transposed, a slice of a packed
`in_proj_weight`, `W.to(dtype)`) is materialised first: the chain is evaluated on the real tensor
and the (out_features, in_features) result is quantized along in_features (the reduction axis).
A weight shared by several linears (tied weights) is quantized once per expression and spec.
"""

from __future__ import annotations

import logging

import torch
from mxfx.passes._utils import (
    PRECOMPUTED_META,
    QDQ_DONE_META,
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

from mxfx.graph.config import MXSpec, QuantConfig
from mxfx.graph.sites import site_of
from mxfx.numerics import ops as _ops  # noqa: F401  (registers the torch.ops.mxfx ops named here)
from mxfx.numerics import slabs

log = logging.getLogger(__name__)
mxfx_ops = torch.ops.mxfx
DONE_META = QDQ_DONE_META  # node.meta key: this linear has its Q/DQ (the specs are on its Site)


def spec_args(spec: MXSpec, axis: int = -1) -> tuple:
    """The option arguments of mxfx.quantize / fake_quantize for a spec."""
    return (spec.format, spec.block_size, axis, spec.scale_mode, spec.rounding, 0, False)


def _delete_attribute(gm: fx.GraphModule, target: str) -> None:
    owner_path, _, name = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    delattr(owner, name)


class InsertQDQPass(PassBase):
    """Insert MX Q/DQ on both operands of each config-matched linear site.

    Requires: MatchLinearSitesPass annotations; nodes carry meta["val"].
    Ensures: every new node has meta["val"] and the linear's nn_module_stack; a linear already
    processed is skipped, so running twice is a no-op.
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        fake_mode = fake_mode_of(gm)
        quantized_weights: dict[tuple, tuple] = {}  # (weight target, spec, storage) -> new attrs
        replaced_targets: set[str] = set()
        rewrites = 0
        for node in list(gm.graph.nodes):
            site = site_of(node)
            found = linear_weight(node)
            if site is None or found is None or not site.quantized or DONE_META in node.meta:
                continue
            attr, chain = found
            with gm.graph.inserting_before(node):
                if site.activation is not None:
                    x = node.args[0]
                    fq = create_call(gm, mxfx_ops.fake_quantize.default, (x, *spec_args(site.activation)), node, fake_mode)
                    node.update_arg(0, fq)
                if site.weight is not None:
                    key = (attr.target, chain_key(chain), site.weight, site.weight_storage)
                    if key not in quantized_weights:
                        quantized_weights[key] = self._quantize_weight(gm, attr, chain, site.weight, site.weight_storage,
                                                                       len(quantized_weights))
                    names = quantized_weights[key]
                    attrs = [create_get_attr(gm, name, fake_mode) for name in names]
                    if site.weight_storage == "packed":
                        w = node.args[1].meta["val"]
                        new_weight = create_call(
                            gm, mxfx_ops.dequantize.default,
                            (attrs[0], attrs[1], site.weight.format, site.weight.block_size, -1, list(w.shape), w.dtype),
                            node, fake_mode,
                        )
                    else:
                        new_weight = attrs[0]
                    node.update_arg(1, new_weight)
                    replaced_targets.add(attr.target)
            node.meta[DONE_META] = True
            rewrites += 1
            log.debug("inserted MX Q/DQ at %s (%s)", site.fqn, site.rule_label)
        if rewrites:
            finish(gm)
            # Drop fp weights nothing reads any more: the prepared module keeps codes + scales only.
            still_read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
            for target in replaced_targets - still_read:
                _delete_attribute(gm, target)
        count_rewrites(gm, type(self).__name__, rewrites)
        return PassResult(gm, rewrites > 0)

    @staticmethod
    def _quantize_weight(gm: fx.GraphModule, attr: fx.Node, chain: list[fx.Node], spec: MXSpec, storage: str,
                         index: int) -> tuple[str, ...]:
        tensor = gm.get_parameter(attr.target) if _is_parameter(gm, attr.target) else gm.get_buffer(attr.target)
        # the (out_features, in_features) weight the linear reads: the stored tensor itself, or the
        # chain of views/casts evaluated on it (quantized a slab at a time either way: `slabs`)
        tensor = evaluate_chain(tensor.detach(), attr, chain)
        stem = f"mxfx_w{index}_" + str(attr.target).replace(".", "_")
        # GPTQ's own codes (passes/gptq_weights.py), on a fresh get_attr: stored as computed
        precomputed = attr.meta.get(PRECOMPUTED_META) if not chain else None
        if precomputed is not None and storage == "simulated":
            gm.register_buffer(f"{stem}_simulated", tensor.contiguous())
            return (f"{stem}_simulated",)
        if storage == "packed":
            data = precomputed if precomputed is not None else slabs.quantize(
                tensor, spec.format, block_size=spec.block_size, axis=-1, scale_mode=spec.scale_mode, rounding=spec.rounding)
            gm.register_buffer(f"{stem}_codes", data.codes)
            gm.register_buffer(f"{stem}_scales", data.scales)
            return f"{stem}_codes", f"{stem}_scales"
        simulated = slabs.fake_quantize(tensor, spec.format, block_size=spec.block_size, axis=-1,
                                        scale_mode=spec.scale_mode, rounding=spec.rounding)
        gm.register_buffer(f"{stem}_simulated", simulated)
        return (f"{stem}_simulated",)


def _is_parameter(gm: fx.GraphModule, target: str) -> bool:
    try:
        gm.get_parameter(target)
        return True
    except AttributeError:
        return False
