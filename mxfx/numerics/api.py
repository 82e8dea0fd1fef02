"""The eager tensor API: quantize, dequantize, fake-quantize, MX matmul and MX linear.

Everything a user of an MX tensor-subclass library did (quantize/dequantize a tensor, matmul of MX
operands including 4-D attention, linear layers with separate weight and activation formats),
done with a plain frozen dataclass (`MXData`) and the `torch.ops.mxfx` ops.
"""

from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import Tensor

from mxfx.errors import FormatError, MXFXWarning, MXTypeError, MXValueError
from mxfx.numerics import ops as _ops  # noqa: F401  (registers the torch.ops.mxfx ops named here)
from mxfx.numerics.formats import ElementFormat, get_format
from mxfx.numerics.reference import ROUNDINGS, SCALE_MODES

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclasses.dataclass(frozen=True)
class MXData:
    """A tensor quantized to MX blocks along one axis.

    `codes` and `scales` are laid out with the block axis moved last: `codes` holds the element
    codes packed along it (fp4: two per byte, first element in the low nibble; fp6: four per three
    bytes; fp8/int8: one per byte), `scales` one E8M0 code per block (uint8).
    """

    codes: Tensor  # uint8 (..., packed block-axis length)
    scales: Tensor  # uint8 (..., number of blocks)
    elem_format: str  # canonical format name
    block_size: int
    axis: int  # the block axis of the original tensor, non-negative
    shape: tuple[int, ...]  # the original shape
    dtype: torch.dtype  # the original dtype, and the default for dequantize()
    scale_mode: str = "floor"
    rounding: str = "even"

    @property
    def format(self) -> ElementFormat:
        return get_format(self.elem_format)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes plus scales."""
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """Decode to a dense tensor of the original shape, in `dtype` (default: the original)."""
        dtype = self.dtype if dtype is None else dtype
        if dtype not in SUPPORTED_DTYPES:
            raise MXTypeError(f"dequantize dtype must be one of {_names(SUPPORTED_DTYPES)}, got {dtype}")
        return torch.ops.mxfx.dequantize(
            self.codes, self.scales, self.elem_format, self.block_size, self.axis, list(self.shape), dtype
        )


def _names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def warn_if_infinite(x: Tensor, where: str) -> None:
    """Warn (once per site) that ±Inf in `x` turns its whole MX block into NaN (scale 0xFF)."""
    if where not in _WARNED_INF and not torch.compiler.is_compiling() and bool(torch.isinf(x).any()):
        _WARNED_INF.add(where)
        warnings.warn(f"mxfx: {where} holds ±Inf; each MX block containing it decodes to NaN (scale 0xFF, "
                      "see the README's NaN/Inf policy)", MXFXWarning, stacklevel=3)


_WARNED_INF: set[str] = set()


def check_float_tensor(x, what: str = "input") -> None:
    """Raise MXTypeError unless x is a float32/bfloat16/float16 tensor with at least one dim."""
    if not isinstance(x, Tensor):
        raise MXTypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        hint = " (convert with .float() first; fp64 is not converted silently)" if x.is_floating_point() else ""
        raise MXTypeError(
            f"{what} has dtype {x.dtype}; MX quantization takes {_names(SUPPORTED_DTYPES)}{hint}"
        )
    if x.dim() == 0:
        raise MXValueError(f"{what} is 0-d; MX blocks need an axis (reshape to 1-D, e.g. x.reshape(1))")


def check_options(elem_format, block_size, scale_mode="floor", rounding="even") -> str:
    """Validate quantization options; returns the canonical format name."""
    fmt = get_format(elem_format)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise MXValueError(f"block_size must be a positive integer (OCP MX uses 32), got {block_size!r}")
    if scale_mode not in SCALE_MODES:
        raise FormatError(f"unknown scale_mode {scale_mode!r}; valid: {', '.join(SCALE_MODES)}")
    if rounding not in ROUNDINGS:
        raise FormatError(f"unknown rounding {rounding!r}; valid: {', '.join(ROUNDINGS)}")
    return fmt.name


def _check_axis(axis, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
        raise MXValueError(f"axis {axis!r} is out of range for a {ndim}-d tensor (valid: {-ndim}..{ndim - 1})")
    return axis % ndim


def _validate(x, elem_format, block_size, axis, scale_mode, rounding, caller: str) -> tuple[str, int]:
    """The checks quantize and fake_quantize share; returns (canonical format, non-negative axis)."""
    check_float_tensor(x)
    name = check_options(elem_format, block_size, scale_mode, rounding)
    axis = _check_axis(axis, x.dim())
    warn_if_infinite(x, f"the tensor passed to {caller}")
    return name, axis


def quantize(
    x: Tensor,
    elem_format: str,
    *,
    block_size: int = 32,
    axis: int = -1,
    scale_mode: str = "floor",
    rounding: str = "even",
    seed: int = 0,
    flush_subnormals: bool = False,
) -> MXData:
    """Quantize `x` to MX blocks of `block_size` elements along `axis` (OCP MX v1.0 §6.3).

    Args:
        x: float32, bfloat16 or float16 tensor (computed in fp32).
        elem_format: fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, fp4_e2m1, int8 (or an alias).
        block_size: elements per shared scale; a partial trailing block is zero-padded.
        axis: the block axis; it must be the reduction axis of the matmul that consumes x.
        scale_mode: floor (the spec), ceil, even or rceil.
        rounding: even (the spec), away, toward_zero or stochastic (seeded by `seed`).
        flush_subnormals: treat fp32 subnormal inputs as zero.

    Returns:
        MXData with packed codes and E8M0 scales.

    Raises:
        MXFXError subclasses for non-float inputs, unknown names, bad block sizes or axes.
    """
    name, axis = _validate(x, elem_format, block_size, axis, scale_mode, rounding, "mxfx.quantize")
    codes, scales = torch.ops.mxfx.quantize(x, name, block_size, axis, scale_mode, rounding, int(seed), bool(flush_subnormals))
    return MXData(codes, scales, name, block_size, axis, tuple(x.shape), x.dtype, scale_mode, rounding)


def dequantize(data: MXData, dtype: torch.dtype | None = None) -> Tensor:
    """Decode MXData to a dense tensor (same as `data.dequantize(dtype)`)."""
    if not isinstance(data, MXData):
        raise MXTypeError(f"dequantize takes mxfx.MXData (from mxfx.quantize), got {type(data).__name__}")
    return data.dequantize(dtype)


def fake_quantize(
    x: Tensor,
    elem_format: str,
    *,
    block_size: int = 32,
    axis: int = -1,
    scale_mode: str = "floor",
    rounding: str = "even",
    seed: int = 0,
    flush_subnormals: bool = False,
) -> Tensor:
    """quantize -> dequantize in x's dtype, in one op (same options as `quantize`)."""
    name, axis = _validate(x, elem_format, block_size, axis, scale_mode, rounding, "mxfx.fake_quantize")
    return torch.ops.mxfx.fake_quantize(x, name, block_size, axis, scale_mode, rounding, int(seed), bool(flush_subnormals))


def matmul(a: MXData, b: MXData, *, out_dtype: torch.dtype | None = None) -> Tensor:
    """A @ B for MX operands (2-D to 4-D, batch dims broadcast), accumulated in fp32.

    `a` must be blocked along its last axis and `b` along its second-to-last: the reduction axis
    of the product (OCP MX v1.0 §6.2). For attention, `Q @ K^T` is
    `matmul(quantize(q), quantize(k.transpose(-2, -1), axis=-2))`.
    """
    for name, operand in (("a", a), ("b", b)):
        if not isinstance(operand, MXData):
            raise MXTypeError(f"mxfx.matmul operand {name} must be mxfx.MXData (from mxfx.quantize), got {type(operand).__name__}")
        if not 2 <= operand.ndim <= 4:
            raise MXValueError(f"mxfx.matmul operand {name} must be 2-D to 4-D, got shape {operand.shape}")
    if a.axis != a.ndim - 1:
        raise MXValueError(f"a must be blocked along its last axis (the reduction axis), got axis={a.axis} of shape {a.shape}")
    if b.axis != b.ndim - 2:
        raise MXValueError(
            f"b must be blocked along its second-to-last axis (the reduction axis), got axis={b.axis} of shape {b.shape}; "
            "quantize it with axis=-2"
        )
    k = a.shape[-1]
    if b.shape[-2] != k:
        raise MXValueError(f"inner dimensions differ: a {a.shape} @ b {b.shape}")
    try:
        torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except RuntimeError:
        raise MXValueError(f"batch dimensions of a {a.shape} and b {b.shape} do not broadcast") from None
    dtype = out_dtype or torch.promote_types(a.dtype, b.dtype)
    return torch.ops.mxfx.matmul(
        a.codes, a.scales, a.elem_format, a.block_size, b.codes, b.scales, b.elem_format, b.block_size, k, dtype
    )


def linear(
    x: Tensor,
    weight: Tensor | MXData,
    bias: Tensor | None = None,
    weight_format: str | None = "fp8_e4m3",
    activation_format: str | None = "fp8_e4m3",
    *,
    block_size: int = 32,
    scale_mode: str = "floor",
    rounding: str = "even",
) -> Tensor:
    """`F.linear(x, weight, bias)` with MX weight and activations, both blocked along in_features.

    `weight` is a float tensor (quantized here to `weight_format`) or MXData blocked along its
    last axis. `activation_format=None` keeps activations in high precision (weight-only).
    """
    check_float_tensor(x, "x")
    if isinstance(weight, MXData):
        if weight.ndim != 2 or weight.axis != 1:
            raise MXValueError(f"an MX weight must be 2-D and blocked along in_features (axis 1), got shape {weight.shape} axis {weight.axis}")
        w = weight
    else:
        check_float_tensor(weight, "weight")
        if weight.dim() != 2:
            raise MXValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
        if weight_format is None:
            raise MXValueError("weight_format=None: use torch.nn.functional.linear for a high-precision weight")
        w = quantize(weight, weight_format, block_size=block_size, axis=-1, scale_mode=scale_mode, rounding=rounding)
    if x.shape[-1] != w.shape[1]:
        raise MXValueError(f"x has {x.shape[-1]} features but the weight expects {w.shape[1]}")
    act = "" if activation_format is None else check_options(activation_format, block_size, scale_mode, rounding)
    return torch.ops.mxfx.linear(
        x, w.codes, w.scales, bias, w.elem_format, w.block_size, w.shape[1], act, block_size, scale_mode, rounding
    )
