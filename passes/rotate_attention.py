"""Rotate Q and K along head_dim by a normalized block-Hadamard matrix at attention sites.

Q K^T = (Q H)(K H)^T for orthogonal H, so rotating both operands of the QK^T product along its
reduction axis (head_dim) changes nothing without quantization and spreads outliers over each MX
block (OCP MX v1.0 §6.3) before QuantizeAttentionPass quantizes Q and K. An SDPA site gets
`mxfx.hadamard` on its query and key inputs (the fused `mxfx.attention` op that replaces it then
quantizes the rotated operands; Inductor compiles both together); an explicit QK^T -> softmax ->
PV chain gets it on both operands of its QK^T matmul, along that matmul's reduction axis.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from mxfx.passes._utils import count_rewrites, create_call, fake_mode_of, finish
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx.config import QuantConfig
from mxfx.sites import ATTENTION, CHECK_FAILED, annotate, site_of

log = logging.getLogger(__name__)
aten = torch.ops.aten
DONE_META = "mxfx_attention_rotated"


def _qk_operands(gm: fx.GraphModule, node: fx.Node, site) -> tuple[fx.Node, list[tuple[int, int]]] | None:
    """(the node whose args hold Q and K, [(arg index, axis)] for Q and K); None if not supported."""
    if site.form == "sdpa":
        return (node, [(0, -1), (1, -1)]) if len(node.args) >= 2 else None
    if not site.nodes:
        return None
    qk = next((n for n in gm.graph.nodes if n.name == site.nodes[0]), None)
    if qk is None:
        return None
    if qk.target is aten.einsum.default:
        return None  # operands sit in a list argument; not rotated (reported)
    return qk, [(0, -1), (1, -2)]


class RotateAttentionPass(PassBase):
    """Insert `mxfx.hadamard` on Q and K at each quantized attention site whose rule sets
    `attention_rotation` (TOML: `rotation` in the attention table).

    Requires: MatchAttentionSitesPass annotations; runs before QuantizeAttentionPass.
    Ensures: new nodes carry meta["val"] and the site's metadata; a site whose head_dim the block
    does not divide, or whose form is not supported (einsum), is marked CHECK_FAILED (left in high
    precision, reason in the report); running twice is a no-op.
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        fake_mode = fake_mode_of(gm)
        rewrites = 0
        for node in list(gm.graph.nodes):
            site = site_of(node)
            if site is None or site.kind != ATTENTION or not site.quantized or DONE_META in node.meta:
                continue
            block = self.config.rules[site.rule].attention_rotation_block
            if not block:
                continue
            found = _qk_operands(gm, node, site)
            reason = "" if found is not None else f"rotation is not supported for the {site.form} form"
            if found is not None:
                target, operands = found
                sizes = [target.args[index].meta["val"].shape[axis] for index, axis in operands]
                if any(size % block for size in sizes):
                    reason = f"the Hadamard rotation block {block} does not divide head_dim {sizes[0]}"
            if reason:
                annotate(node, dataclasses.replace(site, status=CHECK_FAILED, reason=reason, attention=None))
                log.warning("attention %s left in high precision: %s", site.fqn, reason)
                rewrites += 1
                continue
            with gm.graph.inserting_before(target):
                for index, axis in operands:
                    rotated = create_call(gm, torch.ops.mxfx.hadamard.default, (target.args[index], block, axis),
                                          target, fake_mode)
                    target.update_arg(index, rotated)
            node.meta[DONE_META] = block
            rewrites += 1
            log.debug("rotated Q and K of %s (Hadamard blocks of %d)", site.fqn, block)
        if rewrites:
            finish(gm)
        count_rewrites(gm, type(self).__name__, rewrites)
        return PassResult(gm, rewrites > 0)
