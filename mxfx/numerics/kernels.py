"""Shared kernels: under `torch.compile`, the mxfx ops of a model run kernels compiled once per
kind of site, not once per site (first-compile time).

Inlined into the model's graph (the Inductor decompositions of `mxfx.ops`), every quantized site
is its own generated kernel: Inductor's Python codegen costs some 0.3-0.7 s per fake-quantize and
~3 s per quantized attention on a 2-core CPU, so a 30-layer model's first compile took ~5x the
fp32 model's. Layers repeat the same shapes, so here, on CPU, each mxfx op is lowered instead to an
opaque call (`mxfx::shared_*`, a fallback kernel for Inductor) of one kernel per op and static
arguments, compiled on its first call and reused by every site and every layer:

- quantizers (fake_quantize, quantize, dequantize) see their tensor as 2-D with the block axis
  last, one row per MX block where whole blocks tile it (else (rows, n)), and the row count
  symbolic, so every activation and every weight of a format shares one kernel whatever its
  width;
- attention's four operand quantizers become such calls, a partial block zero-padded to a whole
  one in the model's graph (so attention adds no kernel of its own); only where a length is
  symbolic is attention one kernel compiled for static shapes (its layers share them; a
  symbolic-shape attention kernel measured 4x slower to compile);
- linear and matmul become shared quantizers around the ATen GEMM, as they are inlined;
- identical calls on one buffer (the query, key and value linears of one activation) run once
  per compiled graph (`_compat.register_deduplicated_fallback`).

Where the C kernels of `mxfx.numerics.native` cover a call (the default on CPU: every quantizer but
the `mse` scale mode and stochastic rounding), the shared op runs them, as eager does, and nothing
is compiled for it. Otherwise the kernels trace the same reference math as eager (`mxfx.numerics`,
`mxfx.attention`) with the same realize hints, so eager == compiled stays bit for bit (the test
suite checks each path).
A kernel is traced to ATen on fake tensors and compiled by Inductor without Dynamo
(`_compat.compile_rows_kernel`): a call runs no Dynamo frame and checks no guards; what Dynamo
would guard (dtype, device, the static sizes, rows >= 2, contiguity) is the kernel's key, and a
compile that assumes anything else of the sizes is refused. What a site loses: fusion with its
neighbours (a quantizer's input is realized either way; see `mxfx.numerics.ops._realizing`) and ~25 us of
dispatch per call on a 2-core CPU (the op's Python kernel, the reshapes, Inductor's wrapper: a
64x32 fake-quantize, 2 threads, 28 us, of which ~5 us arithmetic; as a Dynamo frame and a
`custom_op` it was 84 us), well under 1% of a transformer layer at a few hundred tokens.
(Composing attention from operand quantizers was slower to compile while kernels were per width:
six kernels of ~2.5 s each against one of ~5 s; one row per block made them one.) `fused_kernels()` compiles with the
inlined decompositions instead (on other devices they are the only path: per-call dispatch is
too dear next to a GPU kernel); so do Inductor freezing (`mxfx.frozen_weights`, which must see
the weight dequantize to fold it) and ahead-of-time compilation (no Python at run time).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable

import torch
from torch import Tensor

from mxfx import _compat
from mxfx.numerics import native
from mxfx.numerics.attention import attention_reference, sdpa_layout
from mxfx.numerics.formats import get_format
from mxfx.numerics.reference import dequantize_last_axis, fake_quantize_last_axis, packing_group, quantize_last_axis
from mxfx.numerics.spec import MXSpec

_FUSED = contextvars.ContextVar("mxfx_fused_kernels", default=False)
_KERNELS: dict[tuple, Callable] = {}
_LOCK = threading.Lock()


@contextlib.contextmanager
def fused_kernels():
    """A context in which `torch.compile` inlines each mxfx op into the model's own kernels
    (one generated kernel per site, fused with its neighbours) instead of calling kernels shared
    by sites. It must be active at the compiling (first) call:

        compiled = torch.compile(prepared)
        with mxfx.fused_kernels():
            compiled(x)

    The choice enters torch.compile's cache keys, so a warm cache never hands one back for the other.
    """
    token = _FUSED.set(True)
    try:
        with _compat.cache_key_suffix("fused"):
            yield
    finally:
        _FUSED.reset(token)


def sharing(*tensors: Tensor | None) -> bool:
    """Whether an mxfx op on `tensors`, traced now for Inductor, becomes a shared-kernel call."""
    shared = (not _FUSED.get() and _compat.shared_kernels_enabled() and _compat.inductor_runs_python_fallbacks()
              and all(t is None or t.device.type == "cpu" for t in tensors))
    if shared:  # identical calls on one buffer (one input, several linears) run once per graph
        for op in (torch.ops.mxfx.shared_fake_quantize, torch.ops.mxfx.shared_quantize,
                   torch.ops.mxfx.shared_dequantize, torch.ops.mxfx.shared_attention):
            _compat.register_deduplicated_fallback(op.default)
    return shared


def compiled_kernels() -> list[str]:
    """The shared kernels this process has built, one line each: op, static arguments, operands
    (dtype and width; `rows` where the row count is symbolic, else the full shape)."""

    def operand(kind):
        if kind is None:
            return "None"
        dtype, device, width, static = kind
        shape = "x".join(map(str, static[0])) if static else "x".join(["rows", *map(str, width)])
        return f"{str(dtype).removeprefix('torch.')}[{shape}]@{device}"

    return [f"{name.strip('_')}{static} on {', '.join(map(operand, kinds))}" for name, static, kinds in _KERNELS]


def _realize(x: Tensor) -> Tensor:
    return torch.ops.mxfx.realize(x)


def _fake_quantize_2d(x, elem_format, block_size, scale_mode, rounding, seed, flush_subnormals):
    return fake_quantize_last_axis(_realize(x), elem_format, block_size, scale_mode, rounding, seed,
                                   flush_subnormals, hint=_realize)


def _quantize_2d(x, elem_format, block_size, scale_mode, rounding, seed, flush_subnormals):
    return quantize_last_axis(_realize(x), elem_format, block_size, scale_mode, rounding, seed, flush_subnormals,
                              hint=_realize)


def _dequantize_2d(codes, scales, elem_format, block_size, n, dtype):
    return dequantize_last_axis(codes, scales, elem_format, block_size, n, dtype, hint=_realize)


def _attention(query, key, value, attn_mask, *static):
    return attention_reference(query, key, value, attn_mask, *static, hint=_realize)


def _compiled(math: Callable, static: tuple, tensors: tuple[Tensor | None, ...], dynamic_rows: bool) -> Callable:
    """`math(*tensors, *static)` compiled for tensors like `tensors` (None where they are None),
    as a function of the tensors: traced and compiled without Dynamo (`_compat.compile_rows_kernel`),
    so a call runs no Dynamo frame or guards; what Dynamo would guard is in the kernel's key."""
    absent = [i for i, t in enumerate(tensors) if t is None]

    def kernel(*present):
        full = list(present)
        for i in absent:
            full.insert(i, None)
        return math(*full, *static)

    # Inductor's CPU backend splits a loop over threads only if the first call's size hint is big
    # enough, and its cache hands that code to every row count: with `dynamic_threads` the outer
    # loop is always an OpenMP loop, its thread count read at run time (a kernel first called on a
    # few rows ran every later site on one thread: 2048x2048, 2 threads, 3.6 vs 2.0 ms).
    compiled = _compat.compile_rows_kernel(kernel, [t for t in tensors if t is not None], dynamic_rows,
                                           {"cpp.dynamic_threads": True})

    def run(*tensors):
        return compiled(*(t for t in tensors if t is not None))

    return run


def _kernel(math: Callable, static: tuple, tensors: tuple[Tensor | None, ...]) -> Tensor:
    """Run `math` on `tensors` through the shared kernel for (math, static, the tensors' kinds)."""
    if torch.compiler.is_compiling():  # traced, not run: the reference math itself
        return math(*tensors, *static)
    tensors = tuple(None if t is None else t.contiguous() for t in tensors)  # the layout compiled for
    rows = {t.shape[0] for t in tensors if t is not None}
    # one symbolic row count (>= 2: 0 and 1 are specialized) where the tensors share it
    dynamic_rows = math is not _attention and len(rows) == 1 and min(rows) >= 2
    kinds = tuple(None if t is None else (t.dtype, t.device, tuple(t.shape[1:]),
                                          None if dynamic_rows else (tuple(t.shape), t.stride())) for t in tensors)
    key = (math.__name__, static, kinds)
    kernel = _KERNELS.get(key)
    if kernel is None:
        _compat.register_realize_lowering(torch.ops.mxfx.realize.default)
        with _LOCK:
            kernel = _KERNELS.get(key)
            if kernel is None:
                try:
                    kernel = _compiled(math, static, tensors, dynamic_rows)
                except Exception as error:  # a build failure is never a run-time error: eager math, same bits
                    _compat.shared_kernel_failed(
                        RuntimeError(f"{math.__name__.strip('_')}{static}: {type(error).__name__}: {error}"))

                    def kernel(*tensors, math=math, static=static):
                        return math(*tensors, *static)

                _KERNELS[key] = kernel
    return kernel(*tensors)


def _per_block(n: int, block_size: int, elem_format: str | None = None) -> bool:
    """Whether an axis of n elements can be cut into one row per MX block: whole blocks tile it,
    and (for packed codes, `elem_format` given) a block's codes fill whole bytes (fp6 packs 4
    codes into 3 bytes, fp4 2 into 1: a block of 1 or 2 codes would pad each row)."""
    group = 1 if elem_format is None else packing_group(get_format(elem_format))
    return n % block_size == 0 and block_size % group == 0


def _rows(x: Tensor, axis: int, block_size: int, elem_format: str | None = None) -> tuple[Tensor, torch.Size]:
    """x with `axis` moved last, as 2-D rows, and the moved shape. The rows are the MX blocks
    themselves, (rows * n / block_size, block_size), where `_per_block`: the quantizers' math works
    block by block, and the element order (and so a stochastic rounding's counter) is unchanged,
    so one kernel serves every width; else (rows, n)."""
    moved = x.movedim(axis, -1)
    n = moved.shape[-1]
    return moved.reshape(-1, block_size if _per_block(n, block_size, elem_format) else n), moved.shape


_LIBRARY = torch.library.Library("mxfx", "FRAGMENT")


def _cpu_op(fn: Callable) -> Callable:
    """Define `mxfx::<fn's name>` from fn's type hints (`torch.library.infer_schema`), fn its CPU
    kernel. Not `torch.library.custom_op`, whose Python autograd, aliasing-check and Dynamo-disable
    wrappers cost ~13 us per call (a 64x32 shared fake-quantize, 2 threads: 84 -> 71 us): these ops
    are called only from Inductor's generated code, on tensors that need no autograd."""
    _LIBRARY.define(fn.__name__ + torch.library.infer_schema(fn, mutates_args=()))
    _LIBRARY.impl(fn.__name__, fn, "CPU")
    return fn


@_cpu_op
def shared_fake_quantize(x: Tensor, elem_format: str, block_size: int, axis: int, scale_mode: str, rounding: str,
                         seed: int, flush_subnormals: bool) -> Tensor:
    """`mxfx::fake_quantize` through a shared kernel (see the module docstring), or the native one."""
    if native.covers(x, block_size, scale_mode, rounding):
        out = native.native_fake_quantize(x.movedim(axis, -1), elem_format, block_size, scale_mode, rounding,
                                          flush_subnormals)
        return out.movedim(-1, axis).contiguous()
    rows, moved = _rows(x, axis, block_size)
    out = _kernel(_fake_quantize_2d, (elem_format, block_size, scale_mode, rounding, seed, flush_subnormals), (rows,))
    return out.reshape(moved).movedim(-1, axis).contiguous()


@torch.library.register_fake("mxfx::shared_fake_quantize", lib=_LIBRARY)
def _(x, elem_format, block_size, axis, scale_mode, rounding, seed, flush_subnormals):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_cpu_op
def shared_quantize(x: Tensor, elem_format: str, block_size: int, axis: int, scale_mode: str, rounding: str,
                    seed: int, flush_subnormals: bool) -> tuple[Tensor, Tensor]:
    """`mxfx::quantize` through a shared kernel, or the native one."""
    if native.covers(x, block_size, scale_mode, rounding):
        return native.native_quantize(x.movedim(axis, -1), elem_format, block_size, scale_mode, rounding,
                                      flush_subnormals)
    rows, moved = _rows(x, axis, block_size, elem_format)
    codes, scales = _kernel(_quantize_2d, (elem_format, block_size, scale_mode, rounding, seed, flush_subnormals),
                            (rows,))
    return codes.reshape(*moved[:-1], -1), scales.reshape(*moved[:-1], -1)  # blocks' bytes back to back


@torch.library.register_fake("mxfx::shared_quantize", lib=_LIBRARY)
def _(x, elem_format, block_size, axis, scale_mode, rounding, seed, flush_subnormals):
    return torch.ops.mxfx.quantize.default(x, elem_format, block_size, axis, scale_mode, rounding, seed,
                                           flush_subnormals)


@_cpu_op
def shared_dequantize(codes: Tensor, scales: Tensor, elem_format: str, block_size: int, axis: int, shape: list[int],
                      dtype: torch.dtype) -> Tensor:
    """`mxfx::dequantize` through a shared kernel, or the native one."""
    moved = list(shape)
    n = moved.pop(axis)
    if native.dequantize_covers(codes, scales, dtype):
        out = native.native_dequantize(codes, scales, elem_format, block_size, n, dtype)
        return out.movedim(-1, axis % len(shape)).contiguous()
    if _per_block(n, block_size, elem_format):  # one row per block (see `_rows`)
        codes, scales, width = codes.reshape(-1, codes.shape[-1] // scales.shape[-1]), scales.reshape(-1, 1), block_size
    else:
        codes, scales, width = codes.reshape(-1, codes.shape[-1]), scales.reshape(-1, scales.shape[-1]), n
    out = _kernel(_dequantize_2d, (elem_format, block_size, width, dtype), (codes, scales))
    return out.reshape(*moved, n).movedim(-1, axis % len(shape)).contiguous()


@torch.library.register_fake("mxfx::shared_dequantize", lib=_LIBRARY)
def _(codes, scales, elem_format, block_size, axis, shape, dtype):
    return codes.new_empty(shape, dtype=dtype)


@_cpu_op
def shared_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, is_causal: bool,
                     scale: float | None, enable_gqa: bool, query_spec: str, key_spec: str, value_spec: str,
                     probs_spec: str) -> Tensor:
    """`mxfx::attention` through a shared kernel (static shapes)."""
    static = (is_causal, scale, enable_gqa, query_spec, key_spec, value_spec, probs_spec)
    return sdpa_layout(_kernel(_attention, static, (query, key, value, attn_mask)))


@torch.library.register_fake("mxfx::shared_attention", lib=_LIBRARY)
def _(query, key, value, attn_mask, *static):
    return torch.ops.mxfx.attention.default(query, key, value, attn_mask, *static)


def _shared_operand(x: Tensor, spec, axis: int) -> Tensor:
    """x fake-quantized along `axis` by the shared kernel. A partial trailing block is padded with
    zeros to a whole one first, in the caller's graph, so that the call takes one row per block:
    the numerics pad it so too (`numerics._scaled_blocks`: zeros never change max|V|, and a
    stochastic rounding's counter runs over the padded blocks), so the bits are the same."""
    length = x.shape[axis]
    pad = (-length) % spec.block_size
    if pad:
        x = torch.nn.functional.pad(x.movedim(axis, -1), (0, pad))
    out = torch.ops.mxfx.shared_fake_quantize(x, spec.format, spec.block_size, -1 if pad else axis, spec.scale_mode,
                                              spec.rounding, 0, False)
    return out[..., :length].movedim(-1, axis) if pad else out


def _static_length(length, spec: str) -> bool:
    return MXSpec.from_arg(spec) is None or isinstance(length, int)


def shared_attention_call(query, key, value, attn_mask, is_causal, scale, enable_gqa, query_spec, key_spec, value_spec,
                          probs_spec):
    """`mxfx::attention` under the shared kernels. Where every quantized operand's axis (head_dim
    for Q and K, the key axis for P and V) has a static length, its four quantizers become shared
    fake-quantize calls, one row per MX block (a partial block padded: `_shared_operand`): the
    kernel the linears' activations already use where format and dtype match, so quantized
    attention adds no kernel of its own; the ATen matmuls, the mask and the softmax stay in the
    model's graph, as inlined. A symbolic length keeps one static-shape attention kernel
    (`mxfx::shared_attention`). First compile, 4 layers, quantized attention, side by side: SmolLM2
    26.9 -> 14.9 s, nanoGPT 15.7 -> 14.0 s."""
    args = (query, key, value, attn_mask, is_causal, scale, enable_gqa, query_spec, key_spec, value_spec, probs_spec)
    if (_static_length(query.shape[-1], query_spec) and _static_length(key.shape[-1], key_spec)
            and _static_length(key.shape[-2], probs_spec) and _static_length(value.shape[-2], value_spec)):
        return attention_reference(*args, quantizer=_shared_operand)
    return torch.ops.mxfx.shared_attention(*args)


def shared_linear(x, weight_codes, weight_scales, bias, weight_format, weight_block_size, in_features,
                  act_format, act_block_size, act_scale_mode, act_rounding):
    """`mxfx::linear` as shared quantizers around the ATen GEMM (the math of `mxfx.numerics.ops._linear_impl`)."""
    if act_format:
        x = torch.ops.mxfx.shared_fake_quantize(x, act_format, act_block_size, -1, act_scale_mode, act_rounding, 0,
                                                False)
    weight = torch.ops.mxfx.shared_dequantize(weight_codes, weight_scales, weight_format, weight_block_size, -1,
                                              [*weight_scales.shape[:-1], in_features], x.dtype)
    return torch.nn.functional.linear(x, weight, None if bias is None else bias.to(x.dtype))


def shared_matmul(a_codes, a_scales, a_format, a_block_size, b_codes, b_scales, b_format, b_block_size, k, dtype):
    """`mxfx::matmul` as shared dequantizers around the ATen matmul (`mxfx.numerics.ops._matmul_impl`)."""
    a = torch.ops.mxfx.shared_dequantize(a_codes, a_scales, a_format, a_block_size, -1, [*a_scales.shape[:-1], k],
                                         torch.float32)
    b = torch.ops.mxfx.shared_dequantize(b_codes, b_scales, b_format, b_block_size, -1, [*b_scales.shape[:-1], k],
                                         torch.float32)
    return torch.matmul(a, b.transpose(-1, -2)).to(dtype)
