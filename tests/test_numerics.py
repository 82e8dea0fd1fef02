"""mxfx.fake_quantize / quantize against the independent exact scalar reference, zero mismatches."""

import math

import pytest
import torch
from conftest import FORMAT_NAMES, bits_equal
from scalar_reference import fake_quantize_block

import mxfx


def reference(x: torch.Tensor, name: str, block: int, scale_mode="floor", rounding="even") -> torch.Tensor:
    """The scalar reference over the last axis of a 2-D tensor (rows of whole blocks), as fp32."""
    rows = x.float().tolist()
    out = []
    for row in rows:
        q = []
        for start in range(0, len(row), block):
            q.extend(fake_quantize_block(row[start : start + block], name, scale_mode, rounding))
        out.append(q)
    return torch.tensor(out, dtype=torch.float32)


def assert_matches(got: torch.Tensor, want: torch.Tensor, context):
    got = got.float()
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), (context, "NaN positions differ")
    g, w = got[~nan], want[~nan]
    mismatch = (g.view(torch.int32) != w.view(torch.int32)).nonzero().flatten()
    assert mismatch.numel() == 0, (context, f"{mismatch.numel()} mismatches, first: got {g[mismatch[:5]].tolist()} want {w[mismatch[:5]].tolist()}")


def all_bit_patterns(dtype: torch.dtype, shuffled: bool) -> torch.Tensor:
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    if shuffled:
        x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))]
    return x.reshape(-1, 32)


@pytest.mark.slow
@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_every_fp16_and_bf16_bit_pattern(name, dtype):
    for shuffled in (False, True):
        x = all_bit_patterns(dtype, shuffled)
        got = mxfx.fake_quantize(x, name).float()  # bf16/fp16 output: compare in that dtype
        want = reference(x, name, 32).to(dtype).float()
        assert_matches(got, want, (name, dtype, shuffled))


def adversarial_inputs() -> torch.Tensor:
    """Blocks designed to hit every branch: powers of two, ties, subnormals, huge, NaN/Inf."""
    g = torch.Generator().manual_seed(1)
    blocks = []
    for p in (-140, -127, -126, -100, -10, -1, 0, 1, 7, 8, 9, 15, 16, 100, 126, 127):
        base = 2.0**p
        for factor in (1.0, math.nextafter(1.0, 0), 1.0 + 2**-23, 1.5, 1.75, 1.875, 1.9375, 1.96875, 2 - 2**-23):
            amax = torch.tensor(base * factor, dtype=torch.float32)
            if not torch.isfinite(amax):
                continue
            rest = torch.randn(31, generator=g) * amax / 4
            blocks.append(torch.cat([amax.reshape(1), rest])[torch.randperm(32, generator=g)])
    blocks.append(torch.zeros(32))
    blocks.append(torch.full((32,), -0.0))
    blocks.append(torch.randn(32, generator=g) * 1e-39)  # fp32 subnormals
    blocks.append(torch.randn(32, generator=g) * 3e38)  # near fp32 max
    special = torch.randn(32, generator=g)
    special[3] = math.nan
    blocks.append(special)
    special = torch.randn(32, generator=g)
    special[5], special[9] = math.inf, -math.inf
    blocks.append(special)
    special = torch.randn(32, generator=g)
    special[0], special[1] = math.nan, math.inf
    blocks.append(special)
    blocks.append(torch.randn(32, generator=g))
    ties = torch.tensor([0.25, 0.75, 1.25, 2.5, 3.5, 5.0, 0.0625 * 3, 6.0] * 4) * torch.tensor([1.0, -1.0] * 16)
    blocks.append(ties)
    return torch.stack(blocks)


@pytest.mark.parametrize("name", FORMAT_NAMES)
@pytest.mark.parametrize("scale_mode", ["floor", "ceil", "even", "rceil"])
@pytest.mark.parametrize("rounding", ["even", "away", "toward_zero"])
def test_adversarial_blocks_all_modes(name, scale_mode, rounding):
    x = adversarial_inputs()
    got = mxfx.fake_quantize(x, name, scale_mode=scale_mode, rounding=rounding)
    assert_matches(got, reference(x, name, 32, scale_mode, rounding), (name, scale_mode, rounding))


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_random_with_outliers(name):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 96, generator=g) * torch.exp(torch.randn(64, 96, generator=g) * 3)
    assert_matches(mxfx.fake_quantize(x, name), reference(x, name, 32), name)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_nan_inf_zero_blocks(name):
    x = torch.randn(4, 64)
    x[0, 3] = math.nan
    x[1, 40] = math.inf
    x[2, :32] = 0.0
    q = mxfx.quantize(x, name)
    assert q.scales[0, 0] == 0xFF and q.scales[1, 1] == 0xFF and q.scales[2, 0] == 0x00
    d = q.dequantize()
    assert torch.isnan(d[0, :32]).all() and torch.isnan(d[1, 32:]).all()
    assert torch.isfinite(d[0, 32:]).all() and (d[2, :32] == 0).all()


def test_flush_subnormals():
    x = torch.tensor([[1e-40, -1e-39, 1e-38, 0.0] * 8])
    kept = mxfx.fake_quantize(x, "fp8_e4m3")
    flushed = mxfx.fake_quantize(x, "fp8_e4m3", flush_subnormals=True)
    assert (kept != 0).any()
    assert (flushed == 0).all()


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_stochastic_rounding_is_seeded_and_unbiased(name):
    x = torch.randn(64, 256)
    a = mxfx.fake_quantize(x, name, rounding="stochastic", seed=7)
    b = mxfx.fake_quantize(x, name, rounding="stochastic", seed=7)
    c = mxfx.fake_quantize(x, name, rounding="stochastic", seed=8)
    assert bits_equal(a, b) and not bits_equal(a, c)
    # each result is one of the two neighbours that bracket the exact value
    down = mxfx.fake_quantize(x, name, rounding="toward_zero")
    up_or_down = (a == down) | (a.abs() > down.abs())
    assert up_or_down.all()
    # unbiased: v = 1 + 0.3 q lies between the grid points 1 and 1 + q (q = 2^-mbits: the block max
    # in [1, 2) gets scale 2^-emax, OCP MX v1.0 §6.3), so any deterministic rounding is off by
    # >= 0.3 q. Over 2048 draws the mean of an unbiased rounding is within 0.05 q of v (the
    # standard error is sqrt(0.21 / 2048) q ~ 0.01 q: 5 sigma).
    q = 2.0 ** -mxfx.get_format(name).mbits
    v = 1.0 + 0.3 * q
    y = (torch.tensor([v] + [0.01] * 31)).repeat(2048)[None]
    draws = mxfx.fake_quantize(y, name, rounding="stochastic").reshape(-1, 32)[:, 0].double()
    assert set(draws.tolist()) == {1.0, 1.0 + q}
    assert abs(draws.mean().item() - v) < 0.05 * q
    assert abs(mxfx.fake_quantize(y, name)[0, 0].item() - v) >= 0.3 * q - 1e-9  # what the bound rules out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_compute_in_fp32(dtype):
    x = torch.randn(8, 64).to(dtype)
    got = mxfx.fake_quantize(x, "fp6_e2m3")
    assert got.dtype == dtype
    assert bits_equal(got, mxfx.fake_quantize(x.float(), "fp6_e2m3").to(dtype))


@pytest.mark.parametrize("way", ["_pow2_floor_split", "_pow2_floor_bits"])
def test_pow2_floor_every_fp32_mantissa_and_binades(way):
    """Both ways (the CPU's Veltkamp one-bit split, other devices' bit mask) give 2^floor(log2 a)
    for every mantissa (scale-invariant)."""
    from mxfx.numerics import reference as numerics

    mantissas = torch.arange(2**23, dtype=torch.int32)
    for exponent in (-126, -20, 0, 1, 15, 100):  # the callers clamp a far below 2^127
        a = ((exponent + 127) << 23 | mantissas).view(torch.float32)
        assert (getattr(numerics, way)(a) == 2.0**exponent).all(), exponent


def test_reference_math_rejects_unknown_modes_with_format_error():
    """The numerics functions are public reference math: a bad mode is an MXFXError, not a bare ValueError."""
    from mxfx.numerics import reference as numerics

    fmt = mxfx.get_format("fp8_e4m3")
    with pytest.raises(mxfx.FormatError, match="unknown scale mode 'nearest'; valid: floor"):
        numerics.shared_exponent(torch.ones(4, dtype=torch.int32), fmt, "nearest")
    with pytest.raises(mxfx.FormatError, match="unknown rounding 'up'; valid: even"):
        numerics.round_elements(torch.ones(4), fmt, "up")
