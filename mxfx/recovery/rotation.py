"""Block-Hadamard rotations (accuracy recovery for MX) and the op `mxfx::hadamard`.

A rotation by an orthogonal matrix spreads an outlier over its block before MX quantization shares
one E8M0 scale among the block (OCP MX v1.0 §6.3), so the other elements keep more precision. For
a linear `y = x W^T + b` with every block of `block_size` consecutive in_features rotated by the
normalized Sylvester Hadamard matrix H (H_1 = [1], H_2n = [[H_n, H_n], [H_n, -H_n]] / sqrt(2)),

    y = (x H) (W H)^T + b      exactly, since H H^T = I,

so the weight is rotated once, offline, and the input online, right before its quantization:
`y = Q(x H) Q(W H)^T + b`. The rotation is block diagonal, so with `block_size` equal to the MX
block each MX block is rotated on its own (as in MR-GPTQ / FP-Quant for MXFP4).

The math is a Walsh-Hadamard butterfly: log2(block) stages of `(a, c) -> (a + c, a - c)` and one
final multiply by 1/sqrt(block). Eager runs it as broadcast pointwise ops (no matmul). Inductor
gets, for fp32, a lowering (`_compat.register_hadamard_lowering`) that computes each output from
the loads of its block by the same tree of adds, so the rotation runs inside the loop of the
quantizer that consumes it: one loop nest, the rotated activation never written to memory. (Traced
as the eager ops, Inductor realized a buffer every two stages: three extra loop nests.) Eager and
compiled code do the same adds in the same order, so they agree bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mxfx import _compat
from mxfx.errors import MXValueError


def check_block(n: int, block_size: int, what: str = "the rotated axis") -> None:
    """Raise MXValueError unless `block_size` is a power of two that divides `n`."""
    if block_size <= 0 or block_size & (block_size - 1):
        raise MXValueError(f"a Hadamard rotation needs a power-of-two block size, got {block_size}")
    if n % block_size:
        raise MXValueError(f"the Hadamard block size {block_size} does not divide {what} ({n})")


def hadamard_last_axis(x: Tensor, block_size: int) -> Tensor:
    """Multiply every block of `block_size` consecutive elements of the last axis by the normalized
    Sylvester Hadamard matrix of that size (symmetric, so x H = H x per block). Same dtype as x;
    the arithmetic is in x's dtype (fp32 for fp32 models)."""
    *lead, n = x.shape
    blocks = n // block_size
    v = x.reshape(*lead, blocks, block_size)
    sign = torch.tensor([[1.0], [-1.0]], dtype=x.dtype, device=x.device)  # (a + c, a + (-c)), both exact
    half = 1
    while half < block_size:
        # one butterfly stage on bit `half` of the in-block index: (a, c) -> (a + c, a - c)
        v = v.reshape(*lead, blocks, block_size // (2 * half), 2, half)
        a, c = v[..., :1, :], v[..., 1:, :]
        v = a + c * sign  # broadcast over the pair axis: pointwise, no stack/cat to materialize
        half *= 2
    v = v.reshape(*lead, n)
    # One rounding for the normalization (exact for block sizes that are powers of four).
    return v * (1.0 / math.sqrt(block_size))


def _hadamard_impl(x: Tensor, block_size: int, axis: int) -> Tensor:
    return hadamard_last_axis(x.movedim(axis, -1), block_size).movedim(-1, axis).contiguous()


@torch.library.custom_op("mxfx::hadamard", mutates_args=())
def hadamard(x: Tensor, block_size: int, axis: int) -> Tensor:
    """Rotate every block of `block_size` consecutive elements along `axis` by the normalized
    Sylvester Hadamard matrix (a power of two that divides that axis). Its own inverse; the
    gradient is the same rotation of the incoming gradient."""
    check_block(x.shape[axis], block_size)
    return _hadamard_impl(x, block_size, axis)


@hadamard.register_fake
def _(x, block_size, axis):
    check_block(x.shape[axis], block_size)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _hadamard_backward(ctx, grad):
    return torch.ops.mxfx.hadamard(grad, ctx.block_size, ctx.axis), None, None


def _hadamard_setup(ctx, inputs, output):
    ctx.block_size, ctx.axis = inputs[1], inputs[2]


def _hadamard_decomposition(x: Tensor, block_size: int, axis: int):
    """Inductor's view of the op: fp32 with a static block size keeps the op for its one-Pointwise
    lowering (`_compat.register_hadamard_lowering`); other dtypes, and a block size that is
    symbolic (`dynamic=True` makes int arguments symbolic), trace the eager butterfly."""
    if x.dtype == torch.float32 and isinstance(block_size, int) and _compat.has_inductor_lowering(
            torch.ops.mxfx.hadamard.default):
        return NotImplemented
    return _hadamard_impl(x, block_size, axis)


hadamard.register_autograd(_hadamard_backward, setup_context=_hadamard_setup)
_compat.register_hadamard_lowering(torch.ops.mxfx.hadamard.default)  # when Inductor's lowering module is imported
_compat.register_inductor_decomposition(torch.ops.mxfx.hadamard.default, _hadamard_decomposition)


def rotate_weight(weight: Tensor, block_size: int) -> Tensor:
    """W H for a (out, in) weight: its in_features blocks rotated, computed in fp64 and rounded
    once to the weight's dtype (offline, at prepare)."""
    check_block(weight.shape[-1], block_size, "in_features")
    return hadamard_last_axis(weight.detach().to(torch.float64), block_size).to(weight.dtype)
