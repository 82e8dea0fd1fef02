"""Insert MX quantization at each config-matched mixture-of-experts site.

An expert site (`MatchExpertSitesPass`) is quantized as a dense linear would be if each expert
were an `nn.Linear` (OCP MX v1.0 §6.3, blocks along the reduction axis):

- the activation operand of the product gets a dynamic `mxfx.fake_quantize` along its in_features
  axis: per token (the rows of a grouped product are tokens sorted by expert; blocking along
  features commutes with that gather);
- the stacked parameter is quantized once, here, per expert along that expert's in_features: axis
  2 of an `[E, out, in]` parameter, axis 1 of an `[E, in, out]` one. With `weight_storage =
  "packed"` the module keeps uint8 codes + E8M0 scales and an `mxfx.dequantize` node (same axis)
  feeds the product's weight operand through the model's own views and gather; with "simulated" it
  keeps the fake-quantized fp tensor. The fp parameter is dropped when nothing else reads it.

The product itself (the grouped op, or the bmm of gathered expert matrices) is kept: each expert's
rows meet that expert's dequantized matrix, as `F.linear` per expert would compute them.
"""

from __future__ import annotations

import logging

import torch
from mxfx.passes._utils import PRECOMPUTED_META, count_rewrites, create_call, create_get_attr, fake_mode_of, finish
from mxfx.passes.insert_qdq import spec_args
from mxfx.passes.match_expert_sites import ExpertProduct, expert_product
from mxfx.passes.rotate_linear import attribute, drop_unread
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx.graph.config import MXSpec, QuantConfig
from mxfx.graph.sites import EXPERT_FORMS, site_of
from mxfx.numerics import ops as _ops  # noqa: F401  (registers the torch.ops.mxfx ops named here)
from mxfx.numerics import slabs  # one slab at a time: bounded temporaries for big stacked weights

log = logging.getLogger(__name__)
mxfx_ops = torch.ops.mxfx
DONE_META = "mxfx_expert_qdq"  # node.meta key: this expert product has its Q/DQ


def replace_weight(gm: fx.GraphModule, node: fx.Node, product: ExpertProduct, new: fx.Node) -> None:
    """Make the product read `new` (a tensor shaped and laid out as the stacked parameter) in place
    of the parameter's get_attr, through the same views and gather."""
    first = product.chain[0] if product.chain else node
    first.replace_input_with(product.attr, new)


def expert_buffer_names(target: str, index: int, storage: str) -> tuple[str, ...]:
    """The buffers holding the `index`-th quantized stacked weight (`target`): codes and scales
    ("packed"), or the simulated fp tensor."""
    stem = f"mxfx_experts{index}_" + target.replace(".", "_")
    return (f"{stem}_codes", f"{stem}_scales") if storage == "packed" else (f"{stem}_simulated",)


class InsertExpertQDQPass(PassBase):
    """Quantize the activation and the stacked weight of each quantized expert site.

    Requires: MatchExpertSitesPass annotations (and RotateExpertsPass / GPTQExpertsPass, if any).
    Ensures: new nodes carry meta["val"] and the product's metadata; processed products are
    marked, so running twice is a no-op.
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        fake_mode = fake_mode_of(gm)
        quantized: dict[tuple, tuple[str, ...]] = {}  # (parameter, axis, spec, storage) -> buffers
        replaced: set[str] = set()
        rewrites = 0
        for node in list(gm.graph.nodes):
            site = site_of(node)
            if site is None or site.form not in EXPERT_FORMS or not site.quantized or DONE_META in node.meta:
                continue
            product = expert_product(node)
            with gm.graph.inserting_before(node):
                if site.activation is not None:
                    x = node.args[product.x_index]
                    args = (x, *spec_args(site.activation, product.x_axis))
                    node.update_arg(product.x_index, create_call(gm, mxfx_ops.fake_quantize.default, args, node, fake_mode))
            if site.weight is not None:
                attr = product.attr
                key = (str(attr.target), product.param_axis, site.weight, site.weight_storage)
                if key not in quantized:
                    quantized[key] = self._quantize(gm, attr, product.param_axis, site.weight, site.weight_storage,
                                                    len(quantized))
                with gm.graph.inserting_before(product.chain[0] if product.chain else node):
                    attrs = [create_get_attr(gm, name, fake_mode) for name in quantized[key]]
                    new = attrs[0]
                    if site.weight_storage == "packed":
                        value = attr.meta["val"]
                        new = create_call(gm, mxfx_ops.dequantize.default,
                                          (attrs[0], attrs[1], site.weight.format, site.weight.block_size,
                                           product.param_axis, list(value.shape), value.dtype), node, fake_mode)
                replace_weight(gm, node, product, new)
                replaced.add(str(attr.target))
            node.meta[DONE_META] = True
            rewrites += 1
            log.debug("inserted MX Q/DQ at expert site %s (%s)", site.fqn, site.rule_label)
        if rewrites:
            finish(gm)
            drop_unread(gm, replaced)
        count_rewrites(gm, type(self).__name__, rewrites)
        return PassResult(gm, rewrites > 0)

    @staticmethod
    def _quantize(gm: fx.GraphModule, attr: fx.Node, axis: int, spec: MXSpec, storage: str, index: int) -> tuple[str, ...]:
        tensor = attribute(gm, str(attr.target)).detach()
        names = expert_buffer_names(str(attr.target), index, storage)
        precomputed = attr.meta.get(PRECOMPUTED_META)  # GPTQ's own codes (passes/gptq_experts.py): kept as they are
        if precomputed is not None and storage == "simulated":
            gm.register_buffer(names[0], tensor)
        elif storage == "packed":
            data = precomputed if precomputed is not None else slabs.quantize(
                tensor, spec.format, block_size=spec.block_size, axis=axis, scale_mode=spec.scale_mode,
                rounding=spec.rounding)
            gm.register_buffer(names[0], data.codes)
            gm.register_buffer(names[1], data.scales)
        else:
            gm.register_buffer(names[0], slabs.fake_quantize(tensor, spec.format, block_size=spec.block_size, axis=axis,
                                                             scale_mode=spec.scale_mode, rounding=spec.rounding))
        return names
