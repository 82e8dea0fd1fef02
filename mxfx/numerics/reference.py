"""Reference MX conversion math (OCP MX v1.0 §6.3), written in plain ATen tensor ops.

These functions are the single source of truth: Inductor traces them as the `mxfx` ops'
decompositions, and the ops run them as their eager kernels except where the C kernels of
`mxfx.numerics.native` compute the same bits on the CPU (checked against these functions over
every code point in tests/test_native.py), so compiled and eager results agree bit for bit.

Why not reuse torchao's `to_mx`: it supports neither INT8, the `ceil`/`rceil` exact exponent for
fp32 subnormals, other rounding modes, any axis, partial blocks, nor a NaN scale for Inf blocks,
and it computes RCEIL with a floating-point log2. The tests cross-check it bit for bit where the
two overlap and document each difference.

Every step is exact:
- the block maximum is a NaN-propagating max of |x|; a NaN or Inf maximum gives the NaN scale;
- the shared exponent comes from the maximum's exponent bits (never a float `log2`);
- an element is rounded as an exact multiple of its quantum 2^(e - mbits) with float arithmetic
  (a Veltkamp split finds its binade); its code is that multiple plus the binade's exponent.
Per-element bit casts are kept to one (the quantum's exponent, for codes) and none on the
fake-quantize path: Inductor's CPU backend scalarizes them (measured: a bit-cast round trip
costs ~5x an fp32 multiply pass), while float ops vectorize.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
from torch import Tensor

from mxfx import _compat
from mxfx.errors import FormatError
from mxfx.numerics.formats import E8M0_BIAS, E8M0_NAN, SCALE_EXP_MAX, SCALE_EXP_MIN, ElementFormat, get_format

SCALE_MODES = ("floor", "ceil", "even", "rceil", "mse")
ROUNDINGS = ("even", "away", "toward_zero", "stochastic")

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
    else:  # validated by the callers; kept for direct use ("mse" needs the block: `_mse_scales`)
        raise FormatError(f"unknown scale mode {scale_mode!r}; valid: {', '.join(SCALE_MODES)}")
    code = exp.clamp(SCALE_EXP_MIN, SCALE_EXP_MAX) + E8M0_BIAS
    return torch.where(efield == 0xFF, E8M0_NAN, code).to(torch.uint8)


def _uniform(shape: tuple, seed: int, device: torch.device) -> Tensor:
    """Counter-based uniform numbers on the grid k * 2^-24 in [0, 1), one per element.

    A stateless integer hash of (seed, flat index) rather than torch's RNG, so stochastic
    rounding is reproducible for a seed and identical in eager and compiled code.
    """
    numel = 1
    for size in shape:
        numel = numel * size
    h = torch.arange(numel, device=device, dtype=torch.int64).reshape(shape)
    # The seed enters as an int64 tensor, not a Python int: under torch.compile(dynamic=True) a
    # symbolic int seed made Inductor's CPU vectoriser compute this hash in float (a C++ error).
    mixed_seed = torch.full((), (seed & 0x7FFFFFFF) * 0x6A09E667 + 0x3C6EF372, dtype=torch.int64, device=device)
    h = (h * 0x2545F491 + mixed_seed) & 0xFFFFFFFF
    # Multipliers stay below 2^31 so int64 products never overflow.
    for multiplier, shift in ((0x7FEB352D, 15), (0x446F8C9B, 13), (0x2C1B3C6D, 16)):
        h = h ^ (h >> shift)
        h = (h * multiplier) & 0xFFFFFFFF
    h = h ^ (h >> 16)
    return ((h >> 8) & 0xFFFFFF).to(torch.float32) * 2.0**-24


_VELTKAMP_ONE_BIT = float(2**23 + 1)


def _bits_are_cheap(t: Tensor) -> bool:
    """Whether bit casts on `t` cost no more than float arithmetic: true in eager ATen and in
    Triton; false in CPU code that Inductor generates (it runs bit casts through a scalar loop),
    where the math stays float-only. Both ways give the same bits."""
    return t.device.type != "cpu" or not _compat.is_traced(t)


def _pow2_floor_split(a: Tensor) -> Tensor:
    """2^floor(log2(a)) for normal fp32 a > 0 with float arithmetic only (see `_bits_are_cheap`).

    A Veltkamp split with s = 23 rounds `a` to one significant bit, giving 2^e or 2^(e+1)
    (checked over every fp32 mantissa in the tests); halving the latter gives 2^e. Needs
    fp-contract off (Inductor's CPU default) so that `c - (c - a)` is not fused: Triton fuses it
    into an FMA, which breaks the split (every compiled float-format code was wrong on CUDA)."""
    c = a * _VELTKAMP_ONE_BIT
    one_bit = c - (c - a)
    return torch.where(one_bit > a, one_bit * 0.5, one_bit)


def _pow2_floor_bits(a: Tensor) -> Tensor:
    """The exponent field of `a`'s bits alone (sign and mantissa masked out): 2^floor(log2|a|)
    for normal a."""
    return (a.view(torch.int32) & 0x7F800000).view(torch.float32)


def _round_to_multiples(scaled: Tensor, fmt: ElementFormat, rounding: str, seed: int) -> tuple[Tensor, Tensor | float]:
    """Round fp32 values V/X to the element grid as (signed integer multiple, quantum), both fp32.

    The value is multiple * quantum before saturation. Every step is exact: the quantum
    2^(e - mbits) is a power of two (e = the value's binade, floored at the smallest normal one
    and capped one binade above emax), so dividing by it and multiplying back are exact, and the
    fraction is split off exactly before it is compared (adding 0.5 or a random number to the
    multiple would round a second time).
    """
    if fmt.is_int:
        quantum = 2.0**-fmt.mbits  # fixed point: steps of 2^-6
    else:
        lowest, highest = 2.0**fmt.emin, 2.0 ** (fmt.emax + 1)  # no overflow below
        if _bits_are_cheap(scaled):
            # the exponent field alone is 2^floor(log2|V/X|) (the mask drops the sign: |.| for
            # free), and a power of two clamps to one. Subnormals and zeros give 0, clamped up as
            # the float way does; NaN/Inf give Inf, not NaN, but occur only in NaN-scale blocks,
            # whose outputs are the NaN scale and whose codes are 0 (§6.3).
            quantum = _pow2_floor_bits(scaled).clamp(lowest, highest) * 2.0**-fmt.mbits
        else:
            quantum = _pow2_floor_split(scaled.abs().clamp(lowest, highest)) * 2.0**-fmt.mbits
    multiple = scaled / quantum  # exact
    if rounding == "even":
        rounded = torch.round(multiple)  # round half to even
    elif rounding == "toward_zero":
        rounded = torch.trunc(multiple)
    elif rounding in ("away", "stochastic"):
        whole = torch.trunc(multiple)
        fraction = (multiple - whole).abs()  # exact
        if rounding == "away":
            up = fraction >= 0.5
        else:  # up with probability `fraction` (to 2^-24): u < fraction for u on a 2^-24 grid
            up = _uniform(tuple(scaled.shape), seed, scaled.device) < fraction
        # where(), not whole + 0, so that a negative value rounding to zero stays -0.0
        rounded = torch.where(up, whole + torch.where(multiple < 0, -1.0, 1.0), whole)
    else:
        raise FormatError(f"unknown rounding {rounding!r}; valid: {', '.join(ROUNDINGS)}")
    return rounded, quantum


# torch's own dtypes of the OCP FP8 element formats: the same encodings (E4M3: NaN at S.1111.111,
# no Inf; E5M2: IEEE-like), and their casts from fp32 round half to even, subnormals included.
_TORCH_FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def _torch_fp8(fmt: ElementFormat, rounding: str, t: Tensor) -> torch.dtype | None:
    """torch's fp8 dtype of `fmt` where its cast stands in for the arithmetic rounding: eager CPU
    data and round-half-even only (the traced form stays the float arithmetic Inductor fuses)."""
    if rounding != "even" or t.device.type != "cpu" or _compat.is_traced(t):
        return None
    return _TORCH_FP8.get(fmt.name)


def _saturated_fp8(scaled: Tensor, fmt: ElementFormat, dtype: torch.dtype) -> Tensor:
    """V/X clamped to ±max normal (§6.3 saturation) and cast to torch's fp8 `dtype` (RNE). The
    clamp comes first because torch's cast overflows to NaN (E4M3) or Inf (E5M2); clamping before
    or after rounding gives the same value, as max normal is on the grid and rounding is monotonic."""
    return scaled.clamp(-fmt.max_normal, fmt.max_normal).to(dtype)


def round_elements(scaled: Tensor, fmt: ElementFormat, rounding: str, seed: int = 0) -> Tensor:
    """Round fp32 values V/X to the element format's grid; returns the rounded values (fp32).

    Subnormals of the element format included; values beyond ±max normal saturate (§6.3); the
    sign of zero is kept for float formats. Eager FP8 with RNE on the CPU: torch's fp8 cast
    (`_torch_fp8`; the same bits, checked over every fp32 binade in the tests).
    """
    native = _torch_fp8(fmt, rounding, scaled)
    if native is not None:
        return _saturated_fp8(scaled, fmt, native).to(torch.float32)
    rounded, quantum = _round_to_multiples(scaled, fmt, rounding, seed)
    values = (rounded * quantum).clamp(-fmt.max_normal, fmt.max_normal)
    if fmt.is_int:  # two's complement has no -0
        values = torch.where(rounded == 0, 0.0, values)
    return values


def max_code_magnitude(fmt: ElementFormat) -> int:
    """The code of +max normal (E4M3: 0x7E, E5M2: 0x7B, fp6: 0x1F, fp4: 0x7, int8: 127)."""
    if fmt.is_int:
        return 127
    return int((fmt.emax + fmt.bias - 1) * 2**fmt.mbits + fmt.max_normal / 2.0 ** (fmt.emax - fmt.mbits))


def encode_elements(
    scaled: Tensor, fmt: ElementFormat, rounding: str, seed: int = 0, keep: Tensor | None = None
) -> Tensor:
    """Round fp32 values V/X and return their element codes (uint8, unpacked);
    where the boolean `keep` (broadcast) is False the code is 0.

    The code is built in float arithmetic with a single bit cast, of the quantum (a power of two)
    to read its exponent (torch.log2 would be exact too but costs more; Inductor's CPU backend
    runs bit casts through a small scalar loop, so the fewer the better). A float code's
    magnitude bits are (e + bias) * 2^mbits + mantissa, and the rounded multiple of the quantum
    2^(e - mbits) is 2^mbits + mantissa, so code = multiple + (e + bias - 1) * 2^mbits. A multiple
    that rounded up into the next binade (2^(mbits+1)) carries into the exponent field exactly as
    the encoding does; subnormals have e = emin = 1 - bias, so their code is the multiple itself.
    Codes are monotonic in the value, so saturating at max normal (§6.3) is a clamp of the code
    magnitude. INT8 codes are the multiple's two's complement.
    """
    native = _torch_fp8(fmt, rounding, scaled)
    if native is not None:  # eager: torch's fp8 cast, whose bytes are the codes (see round_elements)
        code = _saturated_fp8(scaled, fmt, native).view(torch.uint8)
        return code if keep is None else torch.where(keep, code, 0)
    rounded, quantum = _round_to_multiples(scaled, fmt, rounding, seed)
    if fmt.is_int:  # the multiple is in [-127, 127]; -0.0 < 0 is False, so it encodes as 0
        code = rounded.clamp(-127, 127)
        code = torch.where(code < 0, code + 256.0, code)
    else:
        # quantum = 2^(e - mbits) is a normal fp32 number: its exponent field is e - mbits + 127
        exponent = ((quantum.view(torch.int32) >> 23) + (fmt.mbits + fmt.bias - 1 - 127)).to(torch.float32)
        magnitude = (rounded.abs() + exponent * 2**fmt.mbits).clamp(max=max_code_magnitude(fmt))
        negative = torch.copysign(torch.ones_like(rounded), rounded) < 0  # -0.0 included
        code = magnitude + torch.where(negative, 2.0 ** (fmt.bits - 1), 0.0)
    if keep is not None:  # before the conversion, so Inductor keeps it in the encoding loop
        code = torch.where(keep, code, 0.0)
    # Straight from float: Inductor's CPU backend has a vectorised fp32 -> uint8 conversion, but
    # int32 -> uint8 goes element by element.
    return code.to(torch.uint8)


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


_DECODE_TABLES: dict[tuple[str, torch.device], Tensor] = {}


def decode_elements_by_table(codes: Tensor, fmt: ElementFormat) -> Tensor:
    """`decode_elements` as a lookup in the format's table of 2^bits values (the eager kernels).

    The table is `decode_elements` of every code, so the bits are the same by construction. Eager,
    the arithmetic form runs ~15 full-size integer ops one after another (a 1536x2304 MXFP8 weight:
    ~0.9 s on a loaded 2-core machine, against ~0.05 s for the lookup); under Inductor it fuses into
    its consumer and stays the traced form.
    """
    key = (fmt.name, codes.device)
    table = _DECODE_TABLES.get(key)
    if table is None:
        table = decode_elements(torch.arange(1 << fmt.bits, dtype=torch.uint8, device=codes.device), fmt)
        if type(codes) is torch.Tensor:  # never cache a fake or traced tensor
            _DECODE_TABLES[key] = table
    return torch.index_select(table, 0, codes.reshape(-1).to(torch.int32)).reshape(codes.shape)


def decode_scales(scales: Tensor) -> Tensor:
    """E8M0 codes (uint8) to fp32 2^(code - 127); 0xFF is NaN (OCP MX v1.0 §5.4.1)."""
    s = scales.to(torch.int32)
    return torch.where(s == E8M0_NAN, float("nan"), _pow2(s - E8M0_BIAS))


def pack_codes(codes: Tensor, fmt: ElementFormat) -> Tensor:
    """Pack unpacked codes along the last axis: fp4 two per byte (first element in the low
    nibble), fp6 four per three bytes (little-endian 24-bit word, first element in the low bits).
    The last axis must already be a multiple of the packing group (2 or 4).

    fp4 reads the uint8 codes as little-endian int16 pairs (`Tensor.view(dtype)`): the loads are
    contiguous, and Inductor must materialise the codes as bytes (picking pairs through strided
    slices made it materialise fp32 codes, 4x the traffic, and gather them). For fp6 the same
    trick (int32 quads, then three bytes) measured 1.4x slower than the strided form below.
    """
    if fmt.bits == 8:
        return codes
    c = codes.to(torch.uint8)
    if fmt.bits == 4:
        if c.numel() > 0 and sys.byteorder == "little":  # (an empty axis has no int16 view)
            pair = c.contiguous().view(torch.int16)  # c0 | c1 << 8
            return ((pair & 0xF) | ((pair >> 4) & 0xF0)).to(torch.uint8)
        pairs = c.reshape(*c.shape[:-1], c.shape[-1] // 2, 2)
        return pairs[..., 0] | (pairs[..., 1] << 4)  # codes < 16: no uint8 overflow
    # Widened only after the strided pick, so that what Inductor materialises is the uint8 codes.
    quads = c.reshape(*c.shape[:-1], c.shape[-1] // 4, 4).to(torch.int32)
    word = quads[..., 0] | (quads[..., 1] << 6) | (quads[..., 2] << 12) | (quads[..., 3] << 18)
    triple = torch.stack([(word & 0xFF).to(torch.uint8), ((word >> 8) & 0xFF).to(torch.uint8),
                          (word >> 16).to(torch.uint8)], dim=-1)
    return triple.reshape(*c.shape[:-1], c.shape[-1] // 4 * 3)


def unpack_codes(packed: Tensor, fmt: ElementFormat) -> Tensor:
    """Inverse of `pack_codes`."""
    if fmt.bits == 8:
        return packed
    p = packed.to(torch.int32)
    if fmt.bits == 4:
        pairs = torch.stack([p & 0xF, p >> 4], dim=-1)
        return pairs.reshape(*p.shape[:-1], p.shape[-1] * 2).to(torch.uint8)
    triple = p.reshape(*p.shape[:-1], p.shape[-1] // 3, 3)
    word = triple[..., 0] | (triple[..., 1] << 8) | (triple[..., 2] << 16)
    quads = torch.stack([word & 0x3F, (word >> 6) & 0x3F, (word >> 12) & 0x3F, word >> 18], dim=-1)
    return quads.reshape(*p.shape[:-1], p.shape[-1] // 3 * 4).to(torch.uint8)


def packing_group(fmt: ElementFormat) -> int:
    """Codes per packing group: 2 for fp4, 4 for fp6, 1 for 8-bit formats."""
    return {4: 2, 6: 4, 8: 1}[fmt.bits]


def packed_length(n_codes, fmt: ElementFormat):
    """Bytes that `n_codes` codes take once padded to the packing group and packed."""
    group = packing_group(fmt)
    groups = (n_codes + group - 1) // group
    return groups * group * fmt.bits // 8


def _pow2_f64(k: Tensor) -> Tensor:
    """Exactly 2^k in fp64 for integer k (int64) in [-1022, 1023], built from bits."""
    return ((k + 1023) << 52).view(torch.float64)


def _mse_scales(blocks: Tensor, amax: Tensor, fmt: ElementFormat, rounding: str) -> Tensor:
    """E8M0 scale codes (uint8, (..., n_blocks, 1)) minimizing each block's squared error.

    The candidates are the floor rule's exponent (OCP MX v1.0 §6.3) and its two neighbours:
    floor + 1 never clips, and every larger exponent is dominated by it (scaling by 2 maps the
    grid onto a subset of itself, and no value clips any more); floor - 1 trades clipping the
    block maximum for finer steps on the rest, which pays off mainly for fp4; lower exponents
    clip the maximum by more than it can win back in practice (the tests compare with a brute
    force over every exponent). Ties go to the floor rule, then to floor + 1.

    The error of a candidate is computed exactly and summed in a fixed order-free way, so that
    eager and compiled code choose alike: the element error q - v is exact in fp32 (q is within a
    factor of two of v, or zero), its square is exact in fp64 (48 significant bits), and it is
    summed as an int64 in units of 2^(2E + b - 54) (E = floor(log2(amax)), b = ceil(log2(block
    size))), below which each square is truncated: integer sums do not depend on the order.
    Elements are rounded with the spec's rounding, except that stochastic rounding chooses with
    round-to-nearest-even (a random error is no basis for a choice).
    """
    amax_bits = amax.view(torch.int32)
    floor = shared_exponent(amax_bits, fmt, "floor").to(torch.int32)
    finite = torch.isfinite(amax)
    log_block = max(blocks.shape[-1] - 1, 0).bit_length()  # ceil(log2(block size))
    exp = (((amax_bits >> 23) & 0xFF) - 127).to(torch.int64)  # amax < 2^(exp + 1), zero and subnormals too
    unit = _pow2_f64(54 - log_block - 2 * exp)  # |q - v| < 2^(exp + 1): each scaled square < 2^(56 - b)
    limit = float(2 ** (56 - log_block))
    choice = "even" if rounding == "stochastic" else rounding

    def error(code: Tensor) -> Tensor:
        scaled = blocks * _pow2(E8M0_BIAS - code)
        diff = (round_elements(scaled, fmt, choice) * _pow2(code - E8M0_BIAS) - blocks).to(torch.float64)
        square = diff * diff * unit
        square = torch.where(square < limit, square, limit)  # Inf/NaN (never chosen) stay in range
        return square.to(torch.int64).sum(dim=-1, keepdim=True)

    lowest, highest = E8M0_BIAS + SCALE_EXP_MIN, E8M0_BIAS + SCALE_EXP_MAX
    best_code, best_error = floor, error(floor.clamp(lowest, highest))
    for delta in (1, -1):
        code = (floor + delta).clamp(lowest, highest)
        candidate = error(code)
        better = (candidate < best_error) & finite
        best_code = torch.where(better, code, best_code)
        best_error = torch.where(better, candidate, best_error)
    return best_code.to(torch.uint8)


def _per_block(t: Tensor, hint: Callable[[Tensor], Tensor] | None) -> Tensor:
    """`hint(t)` for a per-block tensor (the identity where there is no hint)."""
    return t if hint is None else hint(t)


def _at_dtype_boundary(x32: Tensor, hint: Callable[[Tensor], Tensor] | None) -> Tensor:
    """`hint(x32)` for the fp32 side of a bf16/fp16 <-> fp32 conversion (the identity without a hint).

    Under Inductor the hint realizes the fp32 tensor, so the conversion is its own small kernel:
    a loop that mixes a 2-byte and a 4-byte dtype is generated twice as wide (VectorizedN<float, 2>
    and its int32/mask twins), and for these bit-manipulating kernels that form measured ~7x slower
    than the 16-lane fp32 one (compiled dequantize of a 2048x512 MXFP8 weight to bf16: 2.93 ms vs
    0.41 ms to fp32, one thread, 0.49 ms with the boundary realized; the plain fp32 -> bf16 conversion
    alone 0.11 ms; quantize of 2048x1024 bf16 3.96 -> 2.6-2.9 ms). fake_quantize keeps one kernel:
    realizing its boundaries measured slower (a bf16 activation is read once either way).
    """
    return x32 if hint is None else hint(x32)


def _pad_last(x: Tensor, pad: int) -> Tensor:
    """x with `pad` zeros appended along the last axis. A concatenation, not `F.pad`: traced on
    fake tensors without Dynamo (`mxfx.kernels`), the pad's C++ reads concrete sizes and so fixes
    a symbolic row count."""
    return torch.cat([x, x.new_zeros(*x.shape[:-1], pad)], dim=-1)


def _scaled_blocks(
    x: Tensor, fmt: ElementFormat, block_size: int, scale_mode: str, flush_subnormals: bool, rounding: str = "even",
    hint: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The front half of quantization: (V / X in fp32, shaped (..., n_blocks, block_size);
    E8M0 scale codes and the fp32 block maxima, both shaped (..., n_blocks, 1))."""
    x32 = x.to(torch.float32)  # bf16/fp16 -> fp32 is exact; all math in fp32 (MX_SPEC.md)
    if flush_subnormals:
        x32 = torch.where(x32.abs() < 2.0**-126, x32 * 0.0, x32)  # * 0.0 keeps the sign of zero
    n_blocks = (x.shape[-1] + block_size - 1) // block_size
    pad = n_blocks * block_size - x.shape[-1]
    if pad:  # a partial trailing block is padded with zeros, which never change max|V|
        x32 = _pad_last(x32, pad)
    blocks = x32.reshape(*x32.shape[:-1], n_blocks, block_size)
    # amax propagates NaN (eager and Inductor alike); only this per-block value is bit-cast.
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    if scale_mode == "mse":
        scales = _mse_scales(blocks, amax, fmt, rounding)
    else:
        scales = shared_exponent(amax.view(torch.int32), fmt, scale_mode)
    inverse = _pow2(E8M0_BIAS - scales.to(torch.int32))  # 1 / X, one per block
    return blocks * _per_block(inverse, hint), scales, amax  # V / X, exact


def quantize_last_axis(
    x: Tensor,
    elem_format: str,
    block_size: int,
    scale_mode: str = "floor",
    rounding: str = "even",
    seed: int = 0,
    flush_subnormals: bool = False,
    hint: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Quantize along the last axis: returns (packed element codes, E8M0 scale codes), uint8.

    codes: (..., packed_length(n_blocks * block_size)); scales: (..., n_blocks), with
    n_blocks = ceil(n / block_size).
    """
    fmt = get_format(elem_format)
    if x.dtype != torch.float32:  # (fake_quantize measured slower with this: it stays one kernel)
        x = _at_dtype_boundary(x.to(torch.float32), hint)
    scaled, scales, amax = _scaled_blocks(x, fmt, block_size, scale_mode, flush_subnormals, rounding, hint)
    # A NaN/Inf block decodes to NaN through its 0xFF scale; its element codes are zero. The test
    # is on amax, not on the scale code (the same blocks): where Inductor inlined the scale-code
    # test into the packing loop, re-deriving it per element cost 1.5-2x the whole kernel.
    codes = encode_elements(scaled, fmt, rounding, seed, keep=torch.isfinite(amax))
    codes = codes.reshape(*codes.shape[:-2], codes.shape[-2] * codes.shape[-1])
    group_pad = (-codes.shape[-1]) % packing_group(fmt)
    if group_pad:
        codes = _pad_last(codes, group_pad)
    if packing_group(fmt) > 1 and hint is not None:
        # Under Inductor, realize the one-byte codes before packing: inlined into the packing loop
        # (MXFP6 gathers four codes per three bytes), the encode ran ~7x slower (4096x4096 fp32
        # compiled quantize to MXFP6: 108 ms, 14-17 ms with the codes realized; MXFP4 unchanged).
        codes = hint(codes)
    return pack_codes(codes, fmt), scales.squeeze(-1)


def dequantize_last_axis(
    codes: Tensor, scales: Tensor, elem_format: str, block_size: int, n: int, dtype: torch.dtype,
    hint: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Inverse of `quantize_last_axis`: the first `n` values along the last axis, in `dtype`."""
    fmt = get_format(elem_format)
    n_blocks = scales.shape[-1]
    decode = decode_elements if hint is not None else decode_elements_by_table  # hint: traced for Inductor
    values = decode(unpack_codes(codes, fmt), fmt)[..., : n_blocks * block_size]
    values = values.reshape(*values.shape[:-1], n_blocks, block_size)
    scale = _per_block(decode_scales(scales), hint).unsqueeze(-1)
    # X * P_i, exact in fp32; eager, in place on the lookup's fresh output (one full-size buffer fewer)
    out = values * scale if hint is not None else values.mul_(scale)
    out = out.reshape(*out.shape[:-2], n_blocks * block_size)[..., :n]
    if dtype != torch.float32:
        out = _at_dtype_boundary(out, hint)
    # contiguous: a sliced (padded) weight would send F.linear down another GEMM path
    return out.to(dtype).contiguous()


def fake_quantize_last_axis(
    x: Tensor,
    elem_format: str,
    block_size: int,
    scale_mode: str = "floor",
    rounding: str = "even",
    seed: int = 0,
    flush_subnormals: bool = False,
    hint: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Quantize then dequantize along the last axis, returning x's dtype.

    Skips packing (a bijection) so that Inductor emits one simple fused kernel.
    """
    fmt = get_format(elem_format)
    scaled, scales, _ = _scaled_blocks(x, fmt, block_size, scale_mode, flush_subnormals, rounding, hint)
    scale = _per_block(decode_scales(scales), hint)
    # A NaN block is the scale's NaN, bit for bit: a NaN element times the NaN scale would give
    # either NaN operand's payload and sign, as the compiler orders the multiply (§6.3: NaN scale).
    out = round_elements(scaled, fmt, rounding, seed) * scale
    nan_scale = torch.isnan(scale)
    # (eager on the CPU: skip the select when no block is NaN, the usual case; a per-block check)
    if x.device.type != "cpu" or _compat.is_traced(x) or nan_scale.any():
        out = torch.where(nan_scale, scale, out)
    out = out.reshape(*out.shape[:-2], out.shape[-2] * out.shape[-1])
    return out[..., : x.shape[-1]].to(x.dtype)
