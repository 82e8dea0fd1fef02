"""The `mxfx` custom ops (torch.library namespace `mxfx`).

Each op's eager kernel is the reference math of `mxfx.numerics` (its quantizers in C on the CPU,
`mxfx.numerics.native`: the same bits); the reference math is registered as its Inductor decomposition, so `torch.compile` fuses it into generated kernels while
`torch.export` keeps the op visible by name. Codes and scales cross op boundaries as uint8.

Autograd: `fake_quantize` and `linear` have straight-through estimators (quantization is treated
as the identity in the backward pass); `quantize`, `dequantize` and `matmul` (uint8 operands) are
inference only.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mxfx import _compat
from mxfx.errors import MXTypeError
from mxfx.numerics import kernels
from mxfx.numerics.attention import attention_reference
from mxfx.numerics.formats import get_format
from mxfx.numerics.native import dequantize_last_axis, fake_quantize_last_axis, quantize_last_axis
from mxfx.numerics.reference import packed_length


def _quantize_impl(x, elem_format, block_size, axis, scale_mode, rounding, seed, flush_subnormals, hint=None):
    codes, scales = quantize_last_axis(
        x.movedim(axis, -1), elem_format, block_size, scale_mode, rounding, seed, flush_subnormals, hint
    )
    return codes.contiguous(), scales.contiguous()


@torch.library.custom_op("mxfx::quantize", mutates_args=())
def quantize(
    x: Tensor,
    elem_format: str,
    block_size: int,
    axis: int,
    scale_mode: str,
    rounding: str,
    seed: int,
    flush_subnormals: bool,
) -> tuple[Tensor, Tensor]:
    """Quantize `x` to MX blocks along `axis`.

    Returns (codes, scales), both uint8, laid out with `axis` moved last: codes packed along it
    (fp4 two per byte, fp6 four per three bytes), one E8M0 scale code per block.
    """
    return _quantize_impl(x, elem_format, block_size, axis, scale_mode, rounding, seed, flush_subnormals)


@quantize.register_fake
def _(x, elem_format, block_size, axis, scale_mode, rounding, seed, flush_subnormals):
    fmt = get_format(elem_format)
    shape = list(x.shape)
    n = shape.pop(axis)
    n_blocks = (n + block_size - 1) // block_size
    codes = x.new_empty((*shape, packed_length(n_blocks * block_size, fmt)), dtype=torch.uint8)
    return codes, x.new_empty((*shape, n_blocks), dtype=torch.uint8)


def _moved_shape(shape, axis):
    moved = list(shape)
    n = moved.pop(axis)
    return moved, n


def _dequantize_impl(codes, scales, elem_format, block_size, axis, shape, dtype, hint=None):
    _, n = _moved_shape(shape, axis)
    out = dequantize_last_axis(codes, scales, elem_format, block_size, n, dtype, hint)
    return out.movedim(-1, axis % len(shape)).contiguous()


@torch.library.custom_op("mxfx::dequantize", mutates_args=())
def dequantize(
    codes: Tensor,
    scales: Tensor,
    elem_format: str,
    block_size: int,
    axis: int,
    shape: list[int],
    dtype: torch.dtype,
) -> Tensor:
    """Decode MX (codes, scales) from `mxfx::quantize` back to a tensor of `shape` and `dtype`."""
    return _dequantize_impl(codes, scales, elem_format, block_size, axis, shape, dtype)


@dequantize.register_fake
def _(codes, scales, elem_format, block_size, axis, shape, dtype):
    return codes.new_empty(shape, dtype=dtype)


def _fake_quantize_impl(x, elem_format, block_size, axis, scale_mode, rounding, seed, flush_subnormals, hint=None):
    out = fake_quantize_last_axis(
        x.movedim(axis, -1), elem_format, block_size, scale_mode, rounding, seed, flush_subnormals, hint
    )
    return out.movedim(-1, axis).contiguous()


@torch.library.custom_op("mxfx::fake_quantize", mutates_args=())
def fake_quantize(
    x: Tensor,
    elem_format: str,
    block_size: int,
    axis: int,
    scale_mode: str,
    rounding: str,
    seed: int,
    flush_subnormals: bool,
) -> Tensor:
    """MX quantize then dequantize along `axis`, in x's dtype (straight-through gradient)."""
    return _fake_quantize_impl(x, elem_format, block_size, axis, scale_mode, rounding, seed, flush_subnormals)


@fake_quantize.register_fake
def _(x, elem_format, block_size, axis, scale_mode, rounding, seed, flush_subnormals):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _straight_through(ctx, grad):
    return grad, None, None, None, None, None, None, None


fake_quantize.register_autograd(_straight_through)


def _linear_impl(
    x, weight_codes, weight_scales, bias, weight_format, weight_block_size, in_features,
    act_format, act_block_size, act_scale_mode, act_rounding, hint=None,
):
    if act_format:
        x = fake_quantize_last_axis(x, act_format, act_block_size, act_scale_mode, act_rounding, hint=hint)
    weight = dequantize_last_axis(weight_codes, weight_scales, weight_format, weight_block_size, in_features, x.dtype,
                                  hint)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


@torch.library.custom_op("mxfx::linear", mutates_args=())
def linear(
    x: Tensor,
    weight_codes: Tensor,
    weight_scales: Tensor,
    bias: Tensor | None,
    weight_format: str,
    weight_block_size: int,
    in_features: int,
    act_format: str,
    act_block_size: int,
    act_scale_mode: str,
    act_rounding: str,
) -> Tensor:
    """`F.linear` with an MX weight (codes/scales blocked along in_features) and, unless
    `act_format` is "", MX fake-quantized activations (blocked along in_features).

    The GEMM runs in x's dtype on the dequantized operands. Straight-through gradient for x and bias.
    """
    return _linear_impl(
        x, weight_codes, weight_scales, bias, weight_format, weight_block_size, in_features,
        act_format, act_block_size, act_scale_mode, act_rounding,
    )


@linear.register_fake
def _(x, weight_codes, weight_scales, bias, weight_format, weight_block_size, in_features,
      act_format, act_block_size, act_scale_mode, act_rounding):
    return x.new_empty((*x.shape[:-1], weight_scales.shape[0]))


def _linear_setup_context(ctx, inputs, output):
    x, weight_codes, weight_scales, bias, weight_format, weight_block_size, in_features = inputs[:7]
    ctx.save_for_backward(weight_codes, weight_scales)
    ctx.weight_args = (weight_format, weight_block_size, in_features)
    ctx.x_dtype, ctx.has_bias = x.dtype, bias is not None


def _linear_backward(ctx, grad):
    """Straight-through estimator: the gradient of F.linear with the dequantized weight, with
    activation quantization treated as the identity. Codes and scales get no gradient."""
    weight_codes, weight_scales = ctx.saved_tensors
    weight = dequantize_last_axis(weight_codes, weight_scales, *ctx.weight_args, ctx.x_dtype)
    grad_x = grad @ weight
    grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias else None
    return grad_x, None, None, grad_bias, None, None, None, None, None, None, None


linear.register_autograd(_linear_backward, setup_context=_linear_setup_context)


def _matmul_impl(a_codes, a_scales, a_format, a_block_size, b_codes, b_scales, b_format, b_block_size, k, dtype,
                 hint=None):
    a = dequantize_last_axis(a_codes, a_scales, a_format, a_block_size, k, torch.float32, hint)
    b = dequantize_last_axis(b_codes, b_scales, b_format, b_block_size, k, torch.float32, hint)
    return torch.matmul(a, b.transpose(-1, -2)).to(dtype)


@torch.library.custom_op("mxfx::matmul", mutates_args=())
def matmul(
    a_codes: Tensor,
    a_scales: Tensor,
    a_format: str,
    a_block_size: int,
    b_codes: Tensor,
    b_scales: Tensor,
    b_format: str,
    b_block_size: int,
    k: int,
    dtype: torch.dtype,
) -> Tensor:
    """A @ B for MX operands, both blocked along the reduction axis K (OCP MX v1.0 §6.2).

    a: (..., M, K) stored as codes (..., M, packed K); b: (..., K, N) stored with K moved last,
    codes (..., N, packed K). Batch dims broadcast. FP32 accumulation; result in `dtype`.
    """
    return _matmul_impl(a_codes, a_scales, a_format, a_block_size, b_codes, b_scales, b_format, b_block_size, k, dtype)


@matmul.register_fake
def _(a_codes, a_scales, a_format, a_block_size, b_codes, b_scales, b_format, b_block_size, k, dtype):
    batch = torch.broadcast_shapes(a_scales.shape[:-2], b_scales.shape[:-2])
    return a_codes.new_empty((*batch, a_scales.shape[-2], b_scales.shape[-2]), dtype=dtype)


@torch.library.custom_op("mxfx::realize", mutates_args=())
def realize(x: Tensor) -> Tensor:
    """The identity; under Inductor, a hint that `x` be computed into a buffer (see `_realizing`)."""
    return x.clone()


@realize.register_fake
def _(x):
    return torch.empty_like(x)


def _realizing(impl, inputs: bool = True):
    """`impl` as an Inductor decomposition that realizes its per-block tensors and, if `inputs`,
    first its floating-point inputs.

    A quantizer reads each block twice (the amax, then the elements): without a realized input,
    Inductor recomputes the producer (GELU's erf, LayerNorm, the residual adds) in both loops,
    which measured ~40% of a compiled model. Likewise, without a realized per-block scale (1/X
    and X, from the block's amax or its E8M0 code), Inductor inlines the scale arithmetic (some
    30 ops of bit manipulation) into the loop over the elements, where it is recomputed per
    element and makes the loop body, whose C++ Inductor generates several times (scalar,
    vectorised, tail), several times longer: it measured ~70% of the first compile of a
    fake-quantize. `mxfx::realize` is lowered to a buffer (`_compat.register_realize_lowering`)
    and is never seen in eager or torch.export graphs; it changes no value (the identity).
    """

    def decomposition(*args):
        _compat.register_realize_lowering(torch.ops.mxfx.realize.default)
        if inputs:
            args = (realize(a) if isinstance(a, Tensor) and a.is_floating_point() else a for a in args)
        return impl(*args, hint=realize)

    return decomposition


def _decomposition(impl, shared, inputs: bool = True):
    """The Inductor decomposition of an mxfx op: a call of its shared kernel where
    `kernels.sharing` says so (CPU, Python run time, no freezing), else `impl` inlined (`_realizing`)."""
    inlined = _realizing(impl, inputs)

    def decomposition(*args):
        if kernels.sharing(*(a for a in args if isinstance(a, Tensor))):
            return shared(*args)
        return inlined(*args)

    return decomposition


for _op, _impl in (
    (torch.ops.mxfx.quantize.default, _decomposition(_quantize_impl, torch.ops.mxfx.shared_quantize.default)),
    (torch.ops.mxfx.dequantize.default,
     _decomposition(_dequantize_impl, torch.ops.mxfx.shared_dequantize.default, inputs=False)),
    (torch.ops.mxfx.fake_quantize.default,
     _decomposition(_fake_quantize_impl, torch.ops.mxfx.shared_fake_quantize.default)),
    (torch.ops.mxfx.linear.default, _decomposition(_linear_impl, kernels.shared_linear)),
    (torch.ops.mxfx.matmul.default, _decomposition(_matmul_impl, kernels.shared_matmul, inputs=False)),
    # Q, K, V and P are realized by `quantize_operand` where they are quantized, and only there.
    (torch.ops.mxfx.attention.default,
     _decomposition(attention_reference, kernels.shared_attention_call, inputs=False)),
):
    _compat.register_inductor_decomposition(_op, _impl)
# The hooks below, like the decompositions, are installed when Inductor's modules are imported
# (the first compile), not here: `import mxfx` loads no Inductor code (docs/compatibility.md).
# Partial blocks would otherwise miscompile on CPU (see the guard's docstring). Process-wide but
# fail-safe; only on tested torch releases; MXFX_INDUCTOR_LOOP_SPLIT_GUARD=0 turns it off.
_compat.guard_inductor_loop_split()
# Faster Inductor code generation (pytorch/pytorch#192820, backported; changes no result);
# MXFX_DTYPE_PROPAGATION_BACKPORT=0 turns it off.
_compat.backport_dtype_propagation_init()


def _source_digest() -> str:
    """A hash of the files whose code Inductor traces for the mxfx ops (and of the guard)."""
    import hashlib
    from pathlib import Path

    package = Path(__file__).parents[1]
    digest = hashlib.sha256()
    for name in ("numerics/formats.py", "numerics/reference.py", "numerics/spec.py", "numerics/ops.py",
                 "numerics/attention.py", "numerics/kernels.py", "recovery/rotation.py", "_compat.py"):
        digest.update((package / name).read_bytes())
    return digest.hexdigest()[:16]


# A cached kernel must never outlive the math it was built from. This keys every compile in the
# process, mxfx's or not: torch 2.13 has no per-op key (see the function's docstring). The digest
# is of the sources loaded now; MXFX_COMPILE_CACHE_TAG=0 turns the tag off.
_DIGEST = _source_digest()
_compat.tag_compile_caches_on_compile(lambda: _DIGEST)


def frozen_weights():
    """A context for the first call of a `torch.compile`d prepared module that makes its weights
    compile-time constants: packed weights are dequantized once, at compile time, instead of on
    every call (Inductor freezing; inference only: the context also disables autograd).

        compiled = torch.compile(prepared)
        with mxfx.frozen_weights():
            compiled(x)  # compiles with the weights folded in
        compiled(x)  # later calls (no_grad) reuse that code

    The folded weight is the dequantized weight bit for bit (the same decomposition, evaluated by
    the eager kernels at compile time); freezing may also pick a prepacked oneDNN GEMM, whose
    rounding can differ in the last bit from the plain compiled GEMM. A recompile outside the
    context (e.g. a new input shape) compiles without freezing. Later changes to the module's
    tensors are not seen by the frozen code.
    """
    import contextlib

    stack = contextlib.ExitStack()
    stack.enter_context(torch.no_grad())
    stack.enter_context(_compat.inductor_freezing())
    return stack


def op_arguments(node: torch.fx.Node) -> dict[str, Any]:
    """A call node's arguments bound to the names of its op's schema, defaults filled in: how tools
    read `torch.ops.mxfx.*` (and aten) arguments, never by position.

        >>> op_arguments(node)["block_size"]   # an mxfx.fake_quantize node
        32

    Raises:
        MXTypeError: the node does not call an op with a schema (an OpOverload).
    """
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        raise MXTypeError(f"{node.name} does not call an op with a schema ({node.target})")
    names = [a.name for a in schema.arguments]
    bound = {a.name: a.default_value for a in schema.arguments if a.has_default_value()}
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    missing = [n for n in names if n not in bound]
    if missing:
        raise MXTypeError(f"{node.name}: {node.target} is missing arguments {missing}")
    return bound
