"""Reference MX conversion math (OCP MX v1.0 §6.3), written in plain ATen tensor ops.

These functions are the single source of truth: the `mxfx` custom ops run them as their eager
kernels, and Inductor traces the very same functions as the ops' decompositions, so compiled and
eager results agree bit for bit.

Why not reuse torchao's `to_mx`: it supports neither INT8, the `ceil`/`rceil` exact exponent for
fp32 subnormals, other rounding modes, any axis, partial blocks, nor a NaN scale for Inf blocks,
and it computes RCEIL with a floating-point log2. The tests cross-check it bit for bit where the
two overlap and document each difference.

Every step is done on fp32 bit patterns or by exact power-of-two arithmetic:
- the block maximum is an integer max over `|x|`'s bit patterns (monotone for non-negative
  floats, NaN above Inf above all finite values), so it is immune to fast-math NaN handling;
- the shared exponent comes from exponent bits (never a float `log2`);
- an element is rounded as an integer multiple of its quantum 2^(e - mbits), scaled exactly by
  powers of two, and its code is assembled with integer arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mxfx.formats import E8M0_BIAS, E8M0_NAN, SCALE_EXP_MAX, SCALE_EXP_MIN, ElementFormat, get_format

SCALE_MODES = ("floor", "ceil", "even", "rceil")
ROUNDINGS = ("even", "away", "toward_zero", "stochastic")

_F32_SIGN = -0x80000000  # 0x80000000 as a signed int32
_F32_ABS = 0x7FFFFFFF
_F32_MANT = 0x7FFFFF


def _pow2(k: Tensor) -> Tensor:
    """Exactly 2^k in fp32 for integer k in [-149, 127], built from bits (fp32 subnormals too)."""
    normal = ((k + 127).clamp(min=1) << 23).view(torch.float32)
    subnormal = (torch.ones_like(k) << (k + 149).clamp(0, 22)).view(torch.float32)
    return torch.where(k >= -126, normal, subnormal)


def _ceil_log2_bits(bits: Tensor) -> Tensor:
    """ceil(log2(v)) for non-negative finite fp32 v given as int32 bits, exact; results below -127
    are reported as -127 (every caller clamps to the E8M0 range)."""
    efield = (bits >> 23) & 0xFF
    mant = bits & _F32_MANT
    # An fp32 subnormal v = mant * 2^-149 lies in (2^-127, 2^-126) iff mant > 2^22.
    subnormal = torch.where(mant > 0x400000, -126, -127)
    return torch.where(efield == 0, subnormal, efield - 127 + (mant != 0).to(torch.int32))


def shared_exponent(amax_bits: Tensor, fmt: ElementFormat, scale_mode: str) -> Tensor:
    """The block's E8M0 scale code (uint8) from the int32 bits of max|V| (OCP MX v1.0 §6.3).

    `floor` is the spec: floor(log2(amax)) - emax. `ceil`, `even` and `rceil` are the rules
    torchao names (see MX_SPEC.md). A NaN or Inf block maximum gives the NaN scale 0xFF.
    """
    efield = (amax_bits >> 23) & 0xFF
    if scale_mode == "floor":
        # floor(log2(amax)); an fp32 subnormal or zero amax reads as -127, and since emax >= 0 the
        # result clamps to -127 exactly as the true (smaller) exponent would.
        exp = efield - 127 - fmt.emax
    elif scale_mode == "ceil":
        exp = _ceil_log2_bits(amax_bits) - fmt.emax
    elif scale_mode == "even":
        # Round amax to the element's mantissa width (add half an element ulp, drop the fp32
        # mantissa), then apply the floor rule: torchao's ScaleCalculationMode.EVEN.
        # An fp32-subnormal amax skips the rounding (documented choice; it only matters for
        # INT8, whose emax is 0: every other format clamps such blocks to 2^-127 anyway).
        rounded = (amax_bits + (1 << (22 - fmt.mbits))) & 0x7F800000
        exp = torch.where(efield == 0, 0, rounded >> 23) - 127 - fmt.emax
    elif scale_mode == "rceil":
        # X = 2^ceil(log2(amax / max_normal)) (cuBLAS UE8M0 recipe); the fp32 quotient is rounded,
        # its ceil-log2 is then taken exactly from its bits.
        quotient = amax_bits.view(torch.float32) / fmt.max_normal
        exp = _ceil_log2_bits(quotient.view(torch.int32))
    else:  # validated by the callers; kept for direct use
        raise ValueError(f"unknown scale mode {scale_mode!r}")
    code = exp.clamp(SCALE_EXP_MIN, SCALE_EXP_MAX) + E8M0_BIAS
    return torch.where(efield == 0xFF, E8M0_NAN, code).to(torch.uint8)


def _uniform_hash(shape: tuple, seed: int, device: torch.device) -> Tensor:
    """Counter-based uniform numbers in [0, 1) with 24-bit resolution, one per element.

    A stateless integer hash of (seed, flat index) rather than torch's RNG, so stochastic
    rounding is reproducible for a seed and identical in eager and compiled code.
    """
    numel = 1
    for size in shape:
        numel = numel * size
    h = torch.arange(numel, device=device, dtype=torch.int64).reshape(shape)
    h = (h * 0x2545F491 + (seed & 0x7FFFFFFF) * 0x6A09E667 + 0x3C6EF372) & 0xFFFFFFFF
    # Multipliers stay below 2^31 so int64 products never overflow.
    for multiplier, shift in ((0x7FEB352D, 15), (0x446F8C9B, 13), (0x2C1B3C6D, 16)):
        h = h ^ (h >> shift)
        h = (h * multiplier) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * 2.0**-24


def encode_elements(
    scaled: Tensor, fmt: ElementFormat, rounding: str, seed: int = 0
) -> Tensor:
    """Round fp32 values V/X to element codes (uint8, unpacked), saturating at ±max normal.

    Subnormals of the element format are included; the sign of zero is kept for float formats.
    """
    bits = scaled.view(torch.int32)
    negative = bits < 0
    magnitude_bits = bits & _F32_ABS
    magnitude = magnitude_bits.view(torch.float32)
    if fmt.is_int:
        quantum_exp = torch.full_like(bits, -fmt.mbits)  # fixed point: steps of 2^-6
    else:
        # The element's binade, floored at its smallest normal one (subnormals share it).
        quantum_exp = ((magnitude_bits >> 23) - 127).clamp(min=fmt.emin) - fmt.mbits
    multiple = magnitude * _pow2(-quantum_exp)  # exact: a power-of-two scaling
    # The fraction is split off exactly (multiple - trunc is exact in fp32); comparing it, rather
    # than adding 0.5 or a random number to `multiple`, avoids a second fp32 rounding.
    whole = torch.trunc(multiple)
    fraction = multiple - whole
    if rounding == "even":
        rounded = torch.round(multiple)  # round half to even
    elif rounding == "away":
        rounded = whole + (fraction >= 0.5).to(torch.float32)
    elif rounding == "toward_zero":
        rounded = whole
    elif rounding == "stochastic":
        # Up with probability `fraction` (to 2^-24): u < fraction for u uniform on a 2^-24 grid.
        uniform = _uniform_hash(tuple(multiple.shape), seed, multiple.device)
        rounded = whole + (uniform < fraction).to(torch.float32)
    else:
        raise ValueError(f"unknown rounding {rounding!r}")
    if fmt.is_int:  # fixed point: huge inputs (outside a block) must not overflow int32
        rounded = rounded.clamp(max=255.0)
    rounded_int = rounded.to(torch.int32)
    if fmt.is_int:
        # Symmetric: conversion never produces -128 (OCP MX v1.0 §5.3.3).
        code_magnitude = rounded_int.clamp(max=127)
        return torch.where(negative, (256 - code_magnitude) & 0xFF, code_magnitude).to(torch.uint8)
    # In binade e the code is (e - emin) << mbits plus the integer multiple (which carries the
    # implicit leading one for normals); a carry into the next binade falls out for free.
    code_magnitude = ((quantum_exp + fmt.mbits - fmt.emin) << fmt.mbits) + rounded_int
    max_code = ((fmt.emax - fmt.emin + 1) << fmt.mbits) | int(
        (fmt.max_normal / 2.0**fmt.emax - 1) * 2**fmt.mbits
    )
    code_magnitude = code_magnitude.clamp(max=max_code)  # saturate to ±max normal (§6.3)
    sign = negative.to(torch.int32) << (fmt.bits - 1)
    return (code_magnitude | sign).to(torch.uint8)


def decode_elements(codes: Tensor, fmt: ElementFormat) -> Tensor:
    """Element codes (uint8, unpacked) to their fp32 values, specials included."""
    c = codes.to(torch.int32)
    if fmt.is_int:
        return ((c ^ 0x80) - 0x80).to(torch.float32) * 2.0**-fmt.mbits  # 0x80 -> -2.0
    magnitude = c & ((1 << (fmt.bits - 1)) - 1)
    efield = magnitude >> fmt.mbits
    mant = magnitude & ((1 << fmt.mbits) - 1)
    significand = mant + ((efield > 0).to(torch.int32) << fmt.mbits)
    value = significand.to(torch.float32) * _pow2(efield.clamp(min=1) - fmt.bias - fmt.mbits)
    if fmt.name == "fp8_e4m3":
        value = torch.where(magnitude == 0x7F, float("nan"), value)
    elif fmt.has_inf:  # E5M2: top exponent field is Inf (mantissa 0) or NaN
        special = torch.where(mant == 0, float("inf"), float("nan"))
        value = torch.where(efield == (1 << fmt.ebits) - 1, special, value)
    sign = (c >> (fmt.bits - 1)) << 31
    return (value.view(torch.int32) | sign).view(torch.float32)


def decode_scales(scales: Tensor) -> Tensor:
    """E8M0 codes (uint8) to fp32 2^(code - 127); 0xFF is NaN (OCP MX v1.0 §5.4.1)."""
    s = scales.to(torch.int32)
    return torch.where(s == E8M0_NAN, float("nan"), _pow2(s - E8M0_BIAS))


def pack_codes(codes: Tensor, fmt: ElementFormat) -> Tensor:
    """Pack unpacked codes along the last axis: fp4 two per byte (first element in the low
    nibble), fp6 four per three bytes (little-endian 24-bit word, first element in the low bits).
    The last axis must already be a multiple of the packing group (2 or 4)."""
    if fmt.bits == 8:
        return codes
    c = codes.to(torch.int32)
    if fmt.bits == 4:
        pairs = c.reshape(*c.shape[:-1], -1, 2)
        return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8)
    quads = c.reshape(*c.shape[:-1], -1, 4)
    word = quads[..., 0] | (quads[..., 1] << 6) | (quads[..., 2] << 12) | (quads[..., 3] << 18)
    triple = torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=-1)
    return triple.reshape(*c.shape[:-1], -1).to(torch.uint8)


def unpack_codes(packed: Tensor, fmt: ElementFormat) -> Tensor:
    """Inverse of `pack_codes`."""
    if fmt.bits == 8:
        return packed
    p = packed.to(torch.int32)
    if fmt.bits == 4:
        pairs = torch.stack([p & 0xF, p >> 4], dim=-1)
        return pairs.reshape(*p.shape[:-1], -1).to(torch.uint8)
    triple = p.reshape(*p.shape[:-1], -1, 3)
    word = triple[..., 0] | (triple[..., 1] << 8) | (triple[..., 2] << 16)
    quads = torch.stack([word & 0x3F, (word >> 6) & 0x3F, (word >> 12) & 0x3F, word >> 18], dim=-1)
    return quads.reshape(*p.shape[:-1], -1).to(torch.uint8)


def packing_group(fmt: ElementFormat) -> int:
    """Codes per packing group: 2 for fp4, 4 for fp6, 1 for 8-bit formats."""
    return {4: 2, 6: 4, 8: 1}[fmt.bits]


def packed_length(n_codes, fmt: ElementFormat):
    """Bytes that `n_codes` codes take once padded to the packing group and packed."""
    group = packing_group(fmt)
    groups = (n_codes + group - 1) // group
    return groups * group * fmt.bits // 8


def _blocked_codes(
    x: Tensor, fmt: ElementFormat, block_size: int, scale_mode: str, rounding: str, seed: int, flush_subnormals: bool
) -> tuple[Tensor, Tensor]:
    """Shared front half of quantization: (codes, scales) shaped (..., n_blocks, block_size / 1)."""
    bits = x.to(torch.float32).view(torch.int32)  # bf16/fp16 -> fp32 is exact; all math in fp32
    if flush_subnormals:
        bits = torch.where(((bits >> 23) & 0xFF) == 0, bits & _F32_SIGN, bits)
    n_blocks = (x.shape[-1] + block_size - 1) // block_size
    pad = n_blocks * block_size - x.shape[-1]
    if pad:  # a partial trailing block is padded with zeros, which never change max|V|
        bits = torch.nn.functional.pad(bits, (0, pad))
    blocks = bits.reshape(*bits.shape[:-1], n_blocks, block_size)
    amax_bits = (blocks & _F32_ABS).amax(dim=-1, keepdim=True)
    scales = shared_exponent(amax_bits, fmt, scale_mode)
    scaled = blocks.view(torch.float32) * _pow2(E8M0_BIAS - scales.to(torch.int32))  # V / X, exact
    return encode_elements(scaled, fmt, rounding, seed), scales


def quantize_last_axis(
    x: Tensor,
    elem_format: str,
    block_size: int,
    scale_mode: str = "floor",
    rounding: str = "even",
    seed: int = 0,
    flush_subnormals: bool = False,
) -> tuple[Tensor, Tensor]:
    """Quantize along the last axis: returns (packed element codes, E8M0 scale codes), uint8.

    codes: (..., packed_length(n_blocks * block_size)); scales: (..., n_blocks), with
    n_blocks = ceil(n / block_size).
    """
    fmt = get_format(elem_format)
    codes, scales = _blocked_codes(x, fmt, block_size, scale_mode, rounding, seed, flush_subnormals)
    # A NaN/Inf block decodes to NaN through its 0xFF scale; its element codes are zero.
    codes = torch.where(scales == E8M0_NAN, 0, codes).to(torch.uint8)
    codes = codes.reshape(*codes.shape[:-2], -1)
    group_pad = (-codes.shape[-1]) % packing_group(fmt)
    if group_pad:
        codes = torch.nn.functional.pad(codes, (0, group_pad))
    return pack_codes(codes, fmt), scales.squeeze(-1)


def dequantize_last_axis(
    codes: Tensor, scales: Tensor, elem_format: str, block_size: int, n: int, dtype: torch.dtype
) -> Tensor:
    """Inverse of `quantize_last_axis`: the first `n` values along the last axis, in `dtype`."""
    fmt = get_format(elem_format)
    n_blocks = scales.shape[-1]
    values = decode_elements(unpack_codes(codes, fmt), fmt)[..., : n_blocks * block_size]
    values = values.reshape(*values.shape[:-1], n_blocks, block_size)
    out = values * decode_scales(scales).unsqueeze(-1)  # X * P_i, exact in fp32
    return out.reshape(*out.shape[:-2], n_blocks * block_size)[..., :n].to(dtype)


def fake_quantize_last_axis(
    x: Tensor,
    elem_format: str,
    block_size: int,
    scale_mode: str = "floor",
    rounding: str = "even",
    seed: int = 0,
    flush_subnormals: bool = False,
) -> Tensor:
    """Quantize then dequantize along the last axis, returning x's dtype.

    Skips packing (a bijection) so that Inductor emits one simple fused kernel.
    """
    fmt = get_format(elem_format)
    codes, scales = _blocked_codes(x, fmt, block_size, scale_mode, rounding, seed, flush_subnormals)
    out = decode_elements(codes, fmt) * decode_scales(scales)
    out = out.reshape(*out.shape[:-2], -1)
    return out[..., : x.shape[-1]].to(x.dtype)
