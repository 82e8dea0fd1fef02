"""Find the linear sites of a graph and decide, by config rule, what happens to each."""

from __future__ import annotations

import logging

import torch
from mxfx.passes._utils import count_rewrites, linear_site_name
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx.config import QuantConfig
from mxfx.sites import LINEAR, Site, annotate, decide

log = logging.getLogger(__name__)


def linear_weight(node: fx.Node):
    """The get_attr weight of an `aten.linear` node, or None if it is not a linear layer."""
    if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
        return None
    weight = node.args[1]
    if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.meta["val"].dim() == 2:
        return weight
    return None


class MatchLinearSitesPass(PassBase):
    """Annotate each `aten.linear` whose weight is a module attribute with its site and rule.

    Requires: linears canonicalized to `aten.linear` (CanonicalizeLinearPass), nn_module_stack.
    Ensures: a `mxfx.sites.Site` on every linear site (status NO_RULE: no rule matched); the
    graph itself is unchanged; `modified` is True only when an annotation was added or changed.
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = 0
        for node in gm.graph.nodes:
            weight = linear_weight(node)
            if weight is None or node.meta.get("mxfx_lowered"):
                continue
            fqn = linear_site_name(node, weight)
            site = Site(fqn=fqn, kind=LINEAR, form="linear", node=node.name, weight_target=str(weight.target),
                        weight_shape=tuple(weight.meta["val"].shape), **decide(self.config, fqn, LINEAR))
            changed += annotate(node, site)
            log.debug("linear site %s -> %s", fqn, site.status)
        count_rewrites(gm, type(self).__name__, changed)
        return PassResult(gm, changed > 0)
