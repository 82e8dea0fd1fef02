"""Rewrite the matmul forms of a linear layer into `aten.linear`.

A decomposed graph spells `F.linear(x, W, b)` as `addmm(b, x, t(W))` or `mm(x, t(W))`; the
later passes match one form only. Only a weight that is a module attribute (get_attr) transposed
by `t`/`permute([1, 0])` counts: products of two activations are not linear layers.
"""

from __future__ import annotations

import logging

import torch
from mxfx.passes._utils import count_rewrites, create_call, fake_mode_of, finish
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

log = logging.getLogger(__name__)
aten = torch.ops.aten
_TRANSPOSES = (aten.t.default, aten.transpose.int, aten.permute.default)


def _transposed_attribute(node: fx.Node):
    """The get_attr weight W if `node` is W transposed (2-D), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target in _TRANSPOSES):
        return None
    if node.target is aten.permute.default and list(node.args[1]) != [1, 0]:
        return None
    source = node.args[0]
    if isinstance(source, fx.Node) and source.op == "get_attr" and source.meta["val"].dim() == 2:
        return source
    return None


class CanonicalizeLinearPass(PassBase):
    """Turn `addmm(b, x, t(W))` and `mm(x, t(W))` (W a 2-D attribute) into `aten.linear(x, W, b)`.

    Requires: an FX graph whose nodes carry meta["val"].
    Ensures: the new linear nodes carry meta["val"] and the matmul's metadata; running twice is a no-op.
    """

    def call(self, gm: fx.GraphModule) -> PassResult:
        fake_mode = fake_mode_of(gm)
        rewrites = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            if node.target is aten.addmm.default and not node.kwargs:
                bias, x, w_t = node.args
                if not (isinstance(bias, fx.Node) and bias.meta["val"].dim() == 1):
                    continue
            elif node.target is aten.mm.default:
                (x, w_t), bias = node.args, None
            else:
                continue
            weight = _transposed_attribute(w_t)
            if weight is None:
                continue
            with gm.graph.inserting_before(node):
                args = (x, weight) if bias is None else (x, weight, bias)
                linear = create_call(gm, aten.linear.default, args, node, fake_mode)
            node.replace_all_uses_with(linear)
            gm.graph.erase_node(node)
            rewrites += 1
            log.debug("canonicalized %s into aten.linear", node.name)
        if rewrites:
            finish(gm)
        count_rewrites(gm, type(self).__name__, rewrites)
        return PassResult(gm, rewrites > 0)
