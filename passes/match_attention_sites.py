"""Find attention sites: `scaled_dot_product_attention` calls, and explicit
matmul -> (scale, mask) -> softmax -> matmul chains (nanoGPT's manual path, Hugging Face "eager"
attention). A site is named by the module the call happens in (e.g. `model.layers.0.self_attn`).
"""

from __future__ import annotations

import logging

import torch
from mxfx.passes._utils import count_rewrites, module_stack
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx.config import QuantConfig
from mxfx.sites import ATTENTION, Site, annotate, decide

log = logging.getLogger(__name__)
aten = torch.ops.aten

SDPA = aten.scaled_dot_product_attention.default
SOFTMAXES = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
MATMULS = (aten.matmul.default, aten.bmm.default, aten.einsum.default)
# Ops allowed between Q @ K^T and the softmax (scaling, masking, casts) ...
_SCORE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar, aten.add.Tensor, aten.sub.Tensor,
              aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.to.dtype, aten._to_copy.default,
              aten.type_as.default, aten.tanh.default}
# ... and between the softmax and P @ V (dropout, casts).
_PROB_OPS = {aten.dropout.default, aten.to.dtype, aten._to_copy.default, aten.type_as.default, aten.clone.default}


def attention_site_name(node: fx.Node) -> str:
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def _is_matmul(node) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in MATMULS


def _matmul_operands(node: fx.Node) -> list:
    return list(node.args[1]) if node.target is aten.einsum.default else list(node.args[:2])


def find_qk_matmul(softmax: fx.Node, depth: int = 8) -> fx.Node | None:
    """The matmul producing the softmax's scores, through scaling/masking/cast ops."""
    frontier = [softmax.args[0]]
    for _ in range(depth):
        next_frontier = []
        for node in frontier:
            if _is_matmul(node):
                return node
            if isinstance(node, fx.Node) and node.op == "call_function" and node.target in _SCORE_OPS:
                next_frontier.extend(a for a in node.args if isinstance(a, fx.Node))
        frontier = next_frontier
    return None


def find_pv_matmul(softmax: fx.Node, depth: int = 4) -> fx.Node | None:
    """The matmul whose first operand is the softmax output (through dropout/cast ops)."""
    frontier = [softmax]
    for _ in range(depth):
        next_frontier = []
        for node in frontier:
            for user in node.users:
                if _is_matmul(user) and _matmul_operands(user)[0] is node:
                    return user
                if user.op == "call_function" and user.target in _PROB_OPS:
                    next_frontier.append(user)
        frontier = next_frontier
    return None


class MatchAttentionSitesPass(PassBase):
    """Annotate each SDPA node, and each softmax between two attention matmuls, with its site.

    Requires: an ATen graph with nn_module_stack. Ensures: a `mxfx.sites.Site` on each SDPA or
    softmax node (`nodes` = the QK^T and PV matmuls of an explicit form); the graph is unchanged;
    `modified` is True only when an annotation was added or changed.
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = 0
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            if node.target is SDPA:
                form, qk, pv = "sdpa", None, None
            elif node.target in SOFTMAXES:
                qk, pv = find_qk_matmul(node), find_pv_matmul(node)
                if qk is None or pv is None:
                    continue
                form = "matmul"
            else:
                continue
            fqn = attention_site_name(node)
            site = Site(fqn=fqn, kind=ATTENTION, form=form, node=node.name,
                        nodes=() if qk is None else (qk.name, pv.name), **decide(self.config, fqn, ATTENTION))
            changed += annotate(node, site)
            log.debug("attention site %s (%s)", fqn, form)
        count_rewrites(gm, type(self).__name__, changed)
        return PassResult(gm, changed > 0)
