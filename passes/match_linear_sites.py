"""Find the linear sites of a graph and decide, by config rule, what happens to each."""

from __future__ import annotations

import dataclasses
import logging

import torch
from mxfx.passes._utils import LOWERED_META, QDQ_DONE_META, count_rewrites, linear_site_name, weight_chain
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx.graph.config import QuantConfig
from mxfx.graph.sites import CHECK_FAILED, LINEAR, UNSUPPORTED, Site, annotate, decide, site_of

log = logging.getLogger(__name__)


def linear_weight(node: fx.Node) -> tuple[fx.Node, list[fx.Node]] | None:
    """(get_attr, chain) of an `aten.linear` node whose weight is a 2-D constant expression of
    one parameter or buffer (`_utils.weight_chain`), or None if it is not a linear site."""
    if node.op != "call_function" or node.target is not torch.ops.aten.linear.default:
        return None
    weight = node.args[1]
    if not isinstance(weight, fx.Node) or weight.meta["val"].dim() != 2:
        return None
    return weight_chain(weight)


class MatchLinearSitesPass(PassBase):
    """Annotate each `aten.linear` whose weight is a parameter expression with its site and rule.

    Requires: linears canonicalized to `aten.linear` (CanonicalizeLinearPass), nn_module_stack.
    Ensures: a `mxfx.graph.sites.Site` on every linear site (status from the first matching rule,
    NO_RULE if none); candidates CanonicalizeLinearPass left UNSUPPORTED / CHECK_FAILED keep
    their status and get the rule that would have decided them (for prepare's warning); the
    graph itself is unchanged; `modified` is True only when an annotation was added or changed.
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = 0
        for node in gm.graph.nodes:
            old = site_of(node)
            if old is not None and old.kind == LINEAR and old.status in (UNSUPPORTED, CHECK_FAILED):
                fields = decide(self.config, old.fqn, LINEAR)
                changed += annotate(node, dataclasses.replace(old, rule=fields["rule"], rule_label=fields["rule_label"]))
                continue
            found = linear_weight(node)
            if found is None or node.meta.get(LOWERED_META) or QDQ_DONE_META in node.meta:
                continue
            attr, chain = found
            fqn = linear_site_name(node, attr, chain)
            form = old.form if old is not None and old.kind == LINEAR else "linear"
            site = Site(fqn=fqn, kind=LINEAR, form=form, node=node.name, weight_target=str(attr.target),
                        weight_shape=tuple(node.args[1].meta["val"].shape), **decide(self.config, fqn, LINEAR))
            changed += annotate(node, site)
            log.debug("linear site %s (%s) -> %s", fqn, form, site.status)
        count_rewrites(gm, type(self).__name__, changed)
        return PassResult(gm, changed > 0)
