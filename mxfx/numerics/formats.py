"""The MX element formats of OCP MX v1.0 (§5.3) and the E8M0 scale (§5.4), as one table.

Every number here is derived from four parameters (exponent bits, mantissa bits, bias, and the
special-value rules); the tests check each code point against an independent decoder.
"""

from __future__ import annotations

import dataclasses

from tabulate import tabulate

from mxfx.errors import FormatError

E8M0_BIAS = 127  # OCP MX v1.0 §5.4.1: X = 2^(code - 127)
E8M0_NAN = 0xFF  # the only special E8M0 code
SCALE_EXP_MIN, SCALE_EXP_MAX = -127, 127


@dataclasses.dataclass(frozen=True)
class ElementFormat:
    """One MX element format.

    Floating-point formats have `ebits` exponent and `mbits` mantissa bits with `bias`; INT8 is
    two's complement with an implicit scale of 2^-6 (OCP MX v1.0 §5.3.3), modelled here as a
    fixed-point format with `mbits = 6` fraction bits and `emax = 0`.
    """

    name: str  # canonical name, e.g. "fp8_e4m3"
    bits: int  # bits per element code
    ebits: int  # exponent bits (0 for int8)
    mbits: int  # mantissa (fraction) bits
    bias: int  # exponent bias (0 for int8)
    emax: int  # exponent of the largest normal binade: the spec's emax_elem
    max_normal: float  # largest finite magnitude
    has_inf: bool  # E5M2 only
    nan_codes: str  # human-readable description of NaN encodings
    is_int: bool = False

    @property
    def emin(self) -> int:
        """Exponent of the smallest normal binade (1 - bias); subnormals share it."""
        return 0 if self.is_int else 1 - self.bias

    @property
    def min_normal(self) -> float:
        return 2.0**-self.mbits if self.is_int else 2.0**self.emin

    @property
    def min_subnormal(self) -> float:
        return 2.0 ** (self.emin - self.mbits)


def _fp(name: str, ebits: int, mbits: int, *, has_inf: bool, nan_codes: str, max_mant: int) -> ElementFormat:
    bias = 2 ** (ebits - 1) - 1
    # Largest exponent field used by finite values: all ones unless the format reserves it
    # (E5M2 reserves it for Inf/NaN, IEEE style).
    top_field = 2**ebits - 1 - (1 if has_inf else 0)
    emax = top_field - bias
    max_normal = (1 + max_mant / 2**mbits) * 2.0**emax
    return ElementFormat(name, 1 + ebits + mbits, ebits, mbits, bias, emax, max_normal, has_inf, nan_codes)


FORMATS: dict[str, ElementFormat] = {
    # E4M3: S.1111.111 is NaN, so the largest mantissa in the top binade is 110 -> 448 (not 480).
    "fp8_e4m3": _fp("fp8_e4m3", 4, 3, has_inf=False, nan_codes="S.1111.111", max_mant=6),
    "fp8_e5m2": _fp("fp8_e5m2", 5, 2, has_inf=True, nan_codes="S.11111.{01,10,11}", max_mant=3),
    "fp6_e3m2": _fp("fp6_e3m2", 3, 2, has_inf=False, nan_codes="none", max_mant=3),
    "fp6_e2m3": _fp("fp6_e2m3", 2, 3, has_inf=False, nan_codes="none", max_mant=7),
    "fp4_e2m1": _fp("fp4_e2m1", 2, 1, has_inf=False, nan_codes="none", max_mant=1),
    # INT8: codes -127..127 from conversion (symmetric); 0x80 decodes to -2.0 (§5.3.3).
    "int8": ElementFormat("int8", 8, 0, 6, 0, 0, 127 / 64, False, "none", is_int=True),
}

_ALIASES: dict[str, str] = {}
for _canonical, _extra in {
    "fp8_e4m3": ["mxfp8_e4m3", "mxfp8", "float8_e4m3", "float8_e4m3fn", "e4m3", "fp8"],
    "fp8_e5m2": ["mxfp8_e5m2", "float8_e5m2", "e5m2"],
    "fp6_e3m2": ["mxfp6_e3m2", "float6_e3m2", "e3m2"],
    "fp6_e2m3": ["mxfp6_e2m3", "float6_e2m3", "e2m3", "mxfp6", "fp6"],
    "fp4_e2m1": ["mxfp4_e2m1", "mxfp4", "float4_e2m1", "float4_e2m1fn", "e2m1", "fp4"],
    "int8": ["mxint8"],
}.items():
    for _alias in [_canonical, *_extra]:
        _ALIASES[_alias] = _canonical


def get_format(name: str | ElementFormat) -> ElementFormat:
    """Look up an element format by canonical name or alias (case-insensitive, '-' == '_').

    Raises:
        FormatError: for an unknown name; the message lists the accepted names.
    """
    if isinstance(name, ElementFormat):
        return name
    if not isinstance(name, str):
        raise FormatError(f"element format must be a string such as 'fp8_e4m3', got {type(name).__name__}: {name!r}")
    key = name.strip().lower().replace("-", "_")
    try:
        return FORMATS[_ALIASES[key]]
    except KeyError:
        raise FormatError(
            f"unknown MX element format {name!r}; valid formats: {', '.join(FORMATS)} "
            f"(aliases: {', '.join(a for a in _ALIASES if a not in FORMATS)})"
        ) from None


def format_table(tablefmt: str = "github") -> str:
    """The format table (bits, bias, emax, max/min normal, min subnormal, specials) as text."""
    rows = [
        [
            f.name,
            f.bits,
            "-" if f.is_int else f.bias,
            f.emax,
            f.max_normal,
            "-" if f.is_int else f.min_normal,
            f.min_subnormal,
            "±Inf" if f.has_inf else "none",
            f.nan_codes,
        ]
        for f in FORMATS.values()
    ]
    headers = ["format", "bits", "bias", "emax", "max normal", "min normal", "min subnormal / step", "Inf", "NaN"]
    return tabulate(rows, headers=headers, tablefmt=tablefmt)
