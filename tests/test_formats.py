"""The format table and every code point of every element format."""

import math

import pytest
import torch
from conftest import FORMAT_NAMES
from scalar_reference import decode_code, positive_grid

import mxfx
from mxfx.numerics.reference import decode_elements, decode_elements_by_table, encode_elements

SPEC_TABLE = {  # MX_SPEC.md: (max normal, min normal, min subnormal, emax)
    "fp8_e4m3": (448.0, 2.0**-6, 2.0**-9, 8),
    "fp8_e5m2": (57344.0, 2.0**-14, 2.0**-16, 15),
    "fp6_e3m2": (28.0, 0.25, 0.0625, 4),
    "fp6_e2m3": (7.5, 1.0, 0.125, 2),
    "fp4_e2m1": (6.0, 1.0, 0.5, 2),
    "int8": (127 / 64, 2.0**-6, 2.0**-6, 0),
}


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_table_matches_spec(name):
    f = mxfx.get_format(name)
    assert (f.max_normal, f.min_normal, f.min_subnormal, f.emax) == SPEC_TABLE[name]


@pytest.mark.parametrize(
    "alias,canonical",
    [("mxfp8_e4m3", "fp8_e4m3"), ("float8_e4m3", "fp8_e4m3"), ("E4M3", "fp8_e4m3"), ("mxfp4", "fp4_e2m1"),
     ("mxint8", "int8"), ("float6_e3m2", "fp6_e3m2"), ("mxfp6-e2m3", "fp6_e2m3"), ("e5m2", "fp8_e5m2")],
)
def test_aliases(alias, canonical):
    assert mxfx.get_format(alias).name == canonical


def test_unknown_format_lists_valid_names():
    with pytest.raises(mxfx.FormatError, match="valid formats: fp8_e4m3, fp8_e5m2"):
        mxfx.get_format("fp7")
    with pytest.raises(mxfx.FormatError, match="string"):
        mxfx.get_format(8)


def test_format_table_text():
    text = mxfx.format_table()
    for name in FORMAT_NAMES:
        assert name in text
    assert "448" in text and "57344" in text


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_every_code_point_decodes_to_spec_value(name):
    fmt = mxfx.get_format(name)
    codes = torch.arange(2**fmt.bits, dtype=torch.uint8)
    got = decode_elements(codes, fmt)
    for code in range(2**fmt.bits):
        want = decode_code(name, code)
        g = got[code].item()
        if math.isnan(want):
            assert math.isnan(g), (name, code)
        else:
            assert g == want and math.copysign(1, g) == math.copysign(1, want), (name, hex(code), g, want)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_eager_table_decode_has_the_bits_of_the_traced_decode(name):
    fmt = mxfx.get_format(name)
    codes = torch.arange(2**fmt.bits, dtype=torch.uint8).repeat(3).reshape(3, 1, -1)
    got = decode_elements_by_table(codes, fmt)
    assert got.shape == codes.shape and torch.equal(got.view(torch.int32), decode_elements(codes, fmt).view(torch.int32))
    assert torch.equal(decode_elements_by_table(codes[:, :, :0], fmt), torch.empty(3, 1, 0))


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_every_representable_value_encodes_to_its_code(name):
    fmt = mxfx.get_format(name)
    for value, code in positive_grid(name):
        for sign in (1, -1):
            if name == "int8" and sign == -1:
                want = (256 - code) & 0xFF
            else:
                want = code | ((1 << (fmt.bits - 1)) if sign < 0 else 0)
            got = encode_elements(torch.tensor([sign * float(value)]), fmt, "even")
            assert got.item() == want, (name, sign * float(value), got.item(), want)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_rounding_boundaries_round_half_to_even(name):
    """Each midpoint between neighbours goes to the even code; one fp32 ulp off goes to the nearer."""
    fmt = mxfx.get_format(name)
    grid = positive_grid(name)
    for (lo, lo_code), (hi, hi_code) in zip(grid, grid[1:]):
        mid = torch.tensor(float((lo + hi) / 2))
        assert mid.item() == (lo + hi) / 2  # midpoints of these grids are fp32-exact
        below, above = torch.nextafter(mid, torch.tensor(0.0)), torch.nextafter(mid, torch.tensor(math.inf))
        x = torch.stack([mid, below, above])  # fp32 neighbours of the tie
        codes = encode_elements(x, fmt, "even").tolist()
        even = lo_code if lo_code % 2 == 0 else hi_code
        assert codes == [even, lo_code, hi_code], (name, float(lo), float(hi), codes)
        away = encode_elements(x, fmt, "away").tolist()
        toward = encode_elements(x, fmt, "toward_zero").tolist()
        assert away == [hi_code, lo_code, hi_code] and toward == [lo_code, lo_code, lo_code]


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_saturation_above_max_normal(name):
    fmt = mxfx.get_format(name)
    x = torch.tensor([fmt.max_normal * 1.2, -fmt.max_normal * 3, 1e30])
    values = decode_elements(encode_elements(x, fmt, "even"), fmt)
    assert values.tolist() == [fmt.max_normal, -fmt.max_normal, fmt.max_normal]


def test_int8_0x80_decodes_to_minus_two_and_is_never_produced():
    fmt = mxfx.get_format("int8")
    assert decode_elements(torch.tensor([0x80], dtype=torch.uint8), fmt).item() == -2.0
    codes = encode_elements(torch.linspace(-2.0, 2.0, 4097), fmt, "even")
    assert 0x80 not in codes.tolist()


def _fp8_probe_values() -> torch.Tensor:
    """fp32 values across every binade an FP8 element sees (2^-20 .. 2^20), each binade's grid
    points, their midpoints (ties) and neighbours one ulp away, random mantissas, signed zeros,
    the saturation range and ±Inf."""
    g = torch.Generator().manual_seed(0)
    exps = torch.arange(-20, 21, dtype=torch.float32)
    mant = torch.cat([torch.arange(0, 16) / 16, torch.arange(0, 16) / 16 + 1 / 32, torch.rand(64, generator=g)])
    grid = ((1 + mant)[None, :] * torch.exp2(exps)[:, None]).flatten()
    ulp = torch.nextafter(grid, torch.full_like(grid, float("inf")))
    down = torch.nextafter(grid, torch.zeros_like(grid))
    extra = torch.tensor([0.0, 448.0, 464.0, 465.0, 480.0, 57344.0, 61440.0, 61441.0, 1e30, float("inf")])
    values = torch.cat([grid, ulp, down, extra])
    return torch.cat([values, -values])


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_eager_fp8_cast_rounds_and_encodes_as_the_arithmetic(name, monkeypatch):
    from mxfx.numerics import reference

    fmt = mxfx.get_format(name)
    x = _fp8_probe_values()
    assert reference._torch_fp8(fmt, "even", x) is not None  # the cast path is the one under test
    assert reference._torch_fp8(fmt, "away", x) is None and reference._torch_fp8(mxfx.get_format("fp6_e3m2"), "even", x) is None
    cast_values, cast_codes = reference.round_elements(x, fmt, "even"), reference.encode_elements(x, fmt, "even")
    monkeypatch.setattr(reference, "_torch_fp8", lambda *a: None)  # the arithmetic (traced) form
    want_values, want_codes = reference.round_elements(x, fmt, "even"), reference.encode_elements(x, fmt, "even")
    assert torch.equal(cast_values.view(torch.int32), want_values.view(torch.int32))
    assert torch.equal(cast_codes, want_codes)
    keep = torch.arange(x.numel()) % 3 != 0
    monkeypatch.undo()
    assert torch.equal(reference.encode_elements(x, fmt, "even", keep=keep), torch.where(keep, want_codes, 0))
