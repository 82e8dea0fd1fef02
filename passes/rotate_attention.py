"""Rotate Q and K along head_dim by a normalized block-Hadamard matrix at attention sites.

Q K^T = (Q H)(K H)^T for orthogonal H, so rotating both operands of the QK^T product along its
reduction axis (head_dim) changes nothing without quantization and spreads outliers over each MX
block (OCP MX v1.0 §6.3) before QuantizeAttentionPass quantizes Q and K. An SDPA site gets
`mxfx.hadamard` on its query and key inputs (the fused `mxfx.attention` op that replaces it then
quantizes the rotated operands; Inductor compiles both together); an explicit QK^T -> softmax ->
PV chain gets it on both operands of its QK^T product (matmul, bmm, baddbmm's batch1 @ batch2,
einsum), along that product's reduction axis (for einsum, where the equation puts the contracted
index in each term).
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from mxfx.passes._utils import count_rewrites, create_call, fake_mode_of, finish
from mxfx.passes.match_attention_sites import PRODUCTS, contraction_axes, product_operands
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx import _compat
from mxfx.graph.config import QuantConfig
from mxfx.graph.sites import ATTENTION, CHECK_FAILED, annotate, site_of

log = logging.getLogger(__name__)
aten = torch.ops.aten
DONE_META = "mxfx_attention_rotated"


def _qk_operands(gm: fx.GraphModule, node: fx.Node, site) -> tuple[fx.Node, list[fx.Node], tuple[int, int]] | str:
    """(the node that takes Q and K, [Q, K], the head_dim axis of each), or why the site cannot be
    rotated. For SDPA, Q and K are args 0 and 1 with head_dim last; for an explicit QK^T product its
    two operands (baddbmm: batch1 and batch2) along their contraction axes: the last axis of the
    left operand and the second-to-last of the right one, or, for einsum, the position of the one
    contracted index in each term of the equation (`'bhld,bhsd->bhls'`: -1 and -1)."""
    if site.form == "sdpa":
        return (node, list(node.args[:2]), (-1, -1)) if len(node.args) >= 2 else "SDPA without query and key"
    qk = next((n for n in gm.graph.nodes if n.name == site.nodes[0]), None) if site.nodes else None
    if qk is None or qk.target not in PRODUCTS:
        return f"the QK^T product of this {site.form} site is not in the graph"
    axes = contraction_axes(qk)
    if axes is None:  # the matcher does not record such an einsum as QUANTIZED; checked anyway
        return f"QK^T einsum {qk.args[0]!r} does not contract exactly one index (head_dim)"
    operands = list(product_operands(qk))
    if qk.target is aten.einsum.default:
        sizes = [operand.meta["val"].shape[axis] for operand, axis in zip(operands, axes)]
        if not _compat.statically_known_true(sizes[0] == sizes[1]):
            # einsum broadcasts a size-1 index: sum_d q_d k_1 is not invariant under rotating Q along d
            return (f"QK^T einsum {qk.args[0]!r} broadcasts its contracted index (sizes {_size_text(sizes[0])} "
                    f"and {_size_text(sizes[1])})")
    return qk, operands, axes


def _size_text(size) -> str:
    """A size for a reason text: an int, or a symbolic size with its value in the example inputs."""
    return str(size) if isinstance(size, int) else f"{size} (dynamic; {_compat.size_hint(size)} in the example inputs)"


def _replace_operands(target: fx.Node, operands: list[fx.Node]) -> None:
    """Make `target` (SDPA or a QK^T product) take `operands` as its Q and K."""
    if target.target is aten.einsum.default:
        target.update_arg(1, operands)
        return
    first = 1 if target.target is aten.baddbmm.default else 0  # baddbmm(input, batch1, batch2)
    target.update_arg(first, operands[0])
    target.update_arg(first + 1, operands[1])


class RotateAttentionPass(PassBase):
    """Insert `mxfx.hadamard` on Q and K at each quantized attention site whose rule sets
    `attention_rotation` (TOML: `rotation` in the attention table).

    Requires: MatchAttentionSitesPass annotations; runs before QuantizeAttentionPass.
    Ensures: new nodes carry meta["val"] and the site's metadata; a site whose head_dim the block
    does not divide, or whose einsum equation does not allow the rotation (no single contracted
    index, or one broadcast from size 1), is marked CHECK_FAILED (left in high precision, reason in
    the report); running twice is a no-op.
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
            block = site.rotation_block
            if not block:
                continue
            found = _qk_operands(gm, node, site)
            reason = found if isinstance(found, str) else ""
            if not reason:
                target, operands, axes = found
                size = next((operand.meta["val"].shape[axis] for operand, axis in zip(operands, axes)
                             if operand.meta["val"].shape[axis] % block), None)
                if size is not None:
                    reason = f"the Hadamard rotation block {block} does not divide head_dim {_size_text(size)}"
            if reason:
                annotate(node, dataclasses.replace(site, status=CHECK_FAILED, reason=reason, attention=None))
                log.warning("attention %s left in high precision: %s", site.fqn, reason)
                rewrites += 1
                continue
            with gm.graph.inserting_before(target):
                rotated = [create_call(gm, torch.ops.mxfx.hadamard.default, (operand, block, axis), target, fake_mode)
                           for operand, axis in zip(operands, axes)]
            _replace_operands(target, rotated)
            node.meta[DONE_META] = block
            rewrites += 1
            log.debug("rotated Q and K of %s (Hadamard blocks of %d)", site.fqn, block)
        if rewrites:
            finish(gm)
        count_rewrites(gm, type(self).__name__, rewrites)
        return PassResult(gm, rewrites > 0)
