"""Lower `fake_quantize(x) -> linear <- dequantize(codes, scales)` to one `mxfx.linear` op.

The fused op's eager kernel is the reference; its Inductor decomposition fuses the activation
quantization and the weight dequantization around the GEMM. Linears with a simulated (fp) weight
keep `mxfx.fake_quantize` + `aten.linear`, which Inductor also fuses.
"""

from __future__ import annotations

import logging

import torch
from mxfx.passes._utils import LOWERED_META, count_rewrites, create_call, fake_mode_of, finish
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx.numerics import ops as _ops  # noqa: F401  (registers the torch.ops.mxfx ops named here)
from mxfx.numerics.ops import op_arguments

log = logging.getLogger(__name__)
aten, mxfx_ops = torch.ops.aten, torch.ops.mxfx


def _is(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


class LowerLinearPass(PassBase):
    """Replace each linear whose weight is an `mxfx.dequantize` of stored codes by `mxfx.linear`.

    Requires: InsertQDQPass output. Ensures: the fused node has meta["val"] and the linear's
    metadata; dead Q/DQ nodes are removed; running twice is a no-op.
    """

    def call(self, gm: fx.GraphModule) -> PassResult:
        fake_mode = fake_mode_of(gm)
        rewrites = 0
        for node in list(gm.graph.nodes):
            if not _is(node, aten.linear.default):
                continue
            linear = op_arguments(node)
            x, dq, bias = linear["input"], linear["weight"], linear["bias"]
            if not _is(dq, mxfx_ops.dequantize.default) or op_arguments(dq)["axis"] not in (-1, 1):
                continue
            d = op_arguments(dq)
            codes, scales, weight_format, weight_block, shape = d["codes"], d["scales"], d["elem_format"], d["block_size"], d["shape"]
            act = ("", 32, "floor", "even")
            q = op_arguments(x) if _is(x, mxfx_ops.fake_quantize.default) else None
            if q is not None and q["axis"] in (-1, x.meta["val"].dim() - 1) and (q["seed"], q["flush_subnormals"]) == (0, False):
                act = (q["elem_format"], q["block_size"], q["scale_mode"], q["rounding"])
                x = q["x"]
            with gm.graph.inserting_before(node):
                fused = create_call(
                    gm, mxfx_ops.linear.default,
                    (x, codes, scales, bias, weight_format, weight_block, shape[1], *act),
                    node, fake_mode,
                )
            fused.meta.update({k: v for k, v in node.meta.items() if k.startswith("mxfx_")})
            fused.meta[LOWERED_META] = True
            node.replace_all_uses_with(fused)
            gm.graph.erase_node(node)
            rewrites += 1
            log.debug("lowered %s to mxfx.linear", node.name)
        if rewrites:
            finish(gm)
        count_rewrites(gm, type(self).__name__, rewrites)
        return PassResult(gm, rewrites > 0)
