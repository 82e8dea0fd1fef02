"""An independent scalar MX reference in exact arithmetic (fractions), for the tests only.

Written from MX_SPEC.md without looking at mxfx.numerics: format grids are enumerated from
(ebits, mbits, bias), exponents come from math.frexp, rounding picks the nearest grid point.
"""

from __future__ import annotations

import bisect
import functools
import math
import struct
from fractions import Fraction

# name: (ebits, mbits, bias, NaN/Inf rules)
SPECS = {
    "fp8_e4m3": (4, 3, 7),
    "fp8_e5m2": (5, 2, 15),
    "fp6_e3m2": (3, 2, 3),
    "fp6_e2m3": (2, 3, 1),
    "fp4_e2m1": (2, 1, 1),
}


def decode_code(name: str, code: int) -> float:
    """The value of one element code, from the spec's definition of each format."""
    if name == "int8":
        return (code - 256 if code >= 128 else code) / 64
    ebits, mbits, bias = SPECS[name]
    bits = 1 + ebits + mbits
    sign = -1.0 if code >> (bits - 1) else 1.0
    e = (code >> mbits) & ((1 << ebits) - 1)
    m = code & ((1 << mbits) - 1)
    if name == "fp8_e4m3" and e == 15 and m == 7:
        return math.nan
    if name == "fp8_e5m2" and e == 31:
        return sign * math.inf if m == 0 else math.nan
    if e == 0:
        return sign * math.ldexp(m, 1 - bias - mbits)
    return sign * math.ldexp((1 << mbits) + m, e - bias - mbits)


@functools.cache
def positive_grid(name: str) -> list[tuple[Fraction, int]]:
    """All finite non-negative values of a format with their codes, ascending."""
    if name == "int8":
        return [(Fraction(k, 64), k) for k in range(128)]
    ebits, mbits, _ = SPECS[name]
    out = []
    for code in range(1 << (ebits + mbits)):
        v = decode_code(name, code)
        if math.isfinite(v):
            out.append((Fraction(v), code))
    return sorted(out)


EMAX = {"fp8_e4m3": 8, "fp8_e5m2": 15, "fp6_e3m2": 4, "fp6_e2m3": 2, "fp4_e2m1": 2, "int8": 0}
MBITS = {"fp8_e4m3": 3, "fp8_e5m2": 2, "fp6_e3m2": 2, "fp6_e2m3": 3, "fp4_e2m1": 1, "int8": 6}


def _f32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]


def _floor_log2(v: float) -> int:
    m, e = math.frexp(v)  # v = m * 2^e, 0.5 <= m < 1, exact for any float
    return e - 1


def _ceil_log2(v: float) -> int:
    fl = _floor_log2(v)
    return fl if Fraction(v) == Fraction(2) ** fl else fl + 1


def shared_exponent(amax: float, name: str, scale_mode: str) -> int | None:
    """Unbiased scale exponent, clamped to [-127, 127]; None for the NaN scale."""
    if not math.isfinite(amax):
        return None
    if amax == 0:
        return -127
    emax = EMAX[name]
    if scale_mode == "floor":
        e = _floor_log2(amax) - emax
    elif scale_mode == "ceil":
        e = _ceil_log2(amax) - emax
    elif scale_mode == "even":
        # round amax half-up at the element's mantissa width, then floor
        fl = _floor_log2(amax)
        ulp = Fraction(2) ** (fl - MBITS[name])
        rounded = (Fraction(amax) / ulp + Fraction(1, 2)).__floor__() * ulp
        e = _floor_log2(float(rounded)) - emax
        if fl < -126:  # fp32 subnormal amax: below every reachable scale
            e = -127 - emax
    elif scale_mode == "rceil":
        q = _f32(_f32(amax) / max_normal(name))
        e = -127 if q == 0 else _ceil_log2(q)
    else:
        raise ValueError(scale_mode)
    return max(-127, min(127, e))


def max_normal(name: str) -> float:
    return float(positive_grid(name)[-1][0])


@functools.cache
def _grid_values(name: str) -> list[Fraction]:
    return [v for v, _ in positive_grid(name)]


def round_to_grid(v: Fraction, name: str, rounding: str = "even") -> Fraction:
    """Round |v| to the format grid (saturating), keeping the sign."""
    grid = positive_grid(name)
    a = abs(v)
    sign = -1 if v < 0 else 1
    if a >= grid[-1][0]:
        return sign * grid[-1][0]
    i = bisect.bisect_right(_grid_values(name), a) - 1  # grid[i] <= a < grid[i + 1]
    (lo, lo_code), (hi, _) = grid[i], grid[i + 1]
    if rounding == "toward_zero":
        r = lo
    elif a - lo < hi - a:
        r = lo
    elif a - lo > hi - a:
        r = hi
    elif rounding == "away":
        r = hi
    else:  # ties to even: the code with an even last bit
        r = lo if lo_code % 2 == 0 else hi
    return sign * r


def fake_quantize_block(values: list[float], name: str, scale_mode: str = "floor", rounding: str = "even") -> list[float]:
    """quantize -> dequantize of one block, as Python floats (fp32-representable)."""
    amax = max((abs(v) if not math.isnan(v) else math.inf) for v in values)
    e = shared_exponent(amax, name, scale_mode)
    if e is None:
        return [math.nan] * len(values)
    scale = Fraction(2) ** e
    out = []
    for v in values:
        p = round_to_grid(Fraction(v) / scale, name, rounding)
        q = float(p * scale)
        if p == 0 and math.copysign(1, v) < 0 and name != "int8":
            q = -0.0
        out.append(q)
    return out
