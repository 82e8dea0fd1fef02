"""The native C kernels (`mxfx.numerics.native`) against the reference math, bit for bit.

The eager ops run the C kernels on the CPU, so every test that checks `mxfx.quantize` or
`mxfx.fake_quantize` against the exact scalar reference (test_numerics, test_formats) checks them
too; here they meet `mxfx.numerics.reference` directly over every code point, every fp32 binade,
every bf16 bit pattern, each scale mode, rounding, input dtype and block size they cover, and the
ways they are switched off or fail to build."""

import itertools
import warnings

import pytest
import torch
from conftest import bits_equal

import mxfx
from mxfx.numerics import native, reference

FORMATS = list(mxfx.FORMATS)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@pytest.fixture(autouse=True)
def _built():
    if native.status() == "unbuilt":
        native.covers(torch.zeros(1), 32, "floor", "even")  # builds
    if native.status() != "built":
        pytest.skip(f"native kernels {native.status()} on this machine")


def every_binade(rows: int = 8) -> torch.Tensor:
    """fp32 values over every exponent field (subnormals, zero, ±), random mantissas, in blocks
    whose maxima differ, plus NaN and Inf blocks."""
    exponents = torch.arange(256, dtype=torch.int32).repeat(rows * 4)[: rows * 1024]
    mantissas = torch.randint(0, 1 << 23, exponents.shape, dtype=torch.int32)
    signs = torch.randint(0, 2, exponents.shape, dtype=torch.int32) << 31
    x = ((exponents << 23) | mantissas | signs).view(torch.float32).reshape(rows * 4, 256)
    x = torch.where(torch.isfinite(x), x, 1.0)
    x[0, 5], x[1, 77], x[2, :40] = float("nan"), float("-inf"), 0.0
    x[3, :32] = -0.0
    return x


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_and_fake_quantize_match_the_reference_over_every_binade(fmt):
    x32 = every_binade()
    # rescaled copies put whole blocks in each region of the element grid, not only at the extremes
    x32 = torch.cat([x32, x32 * 2.0**-100, torch.randn(16, 256) * torch.exp2(torch.randint(-140, 120, (16, 1)).float())])
    for dtype, scale_mode, rounding, flush, block in itertools.product(
            DTYPES, native._SCALE_MODES, native._ROUNDINGS, (False, True), (32, 5)):
        x = x32.to(dtype)
        codes, scales = native.native_quantize(x, fmt, block, scale_mode, rounding, flush)
        ref_codes, ref_scales = reference.quantize_last_axis(x, fmt, block, scale_mode, rounding, 0, flush)
        case = (dtype, scale_mode, rounding, flush, block)
        assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales), case
        out = native.native_fake_quantize(x, fmt, block, scale_mode, rounding, flush)
        assert bits_equal(out, reference.fake_quantize_last_axis(x, fmt, block, scale_mode, rounding, 0, flush)), case


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_matches_the_reference_for_every_code_and_scale(fmt, dtype):
    bits = mxfx.get_format(fmt).bits
    group = reference.packing_group(mxfx.get_format(fmt))
    scale_codes = torch.tensor([0, 1, 20, 100, 127, 128, 200, 253, 254, 255], dtype=torch.uint8)
    every = torch.arange(1 << bits, dtype=torch.uint8)
    block = max(32, len(every))
    codes = torch.zeros(len(scale_codes), block, dtype=torch.uint8)
    codes[:, : len(every)] = every
    codes = codes.reshape(len(scale_codes), block // group, group).flip(-1).reshape(len(scale_codes), block)
    packed = reference.pack_codes(codes, mxfx.get_format(fmt))
    scales = scale_codes.reshape(-1, 1)
    for n in (block, block - 3):  # a partial last block too
        out = native.native_dequantize(packed, scales, fmt, block, n, dtype)
        assert bits_equal(out, reference.dequantize_last_axis(packed, scales, fmt, block, n, dtype)), n


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_16_bit_pattern(dtype):
    x = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(dtype).reshape(-1, 64)
    for fmt in FORMATS:
        assert bits_equal(native.native_fake_quantize(x, fmt, 32, "floor", "even", False),
                          reference.fake_quantize_last_axis(x, fmt, 32)), fmt
        codes, scales = native.native_quantize(x, fmt, 32, "floor", "even", False)
        ref_codes, ref_scales = reference.quantize_last_axis(x, fmt, 32)
        assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales), fmt


def test_results_do_not_depend_on_the_thread_count():
    x = torch.randn(301, 96)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.native_fake_quantize(x, "fp4_e2m1", 32, "floor", "even", False)
        torch.set_num_threads(max(2, threads))
        many = native.native_fake_quantize(x, "fp4_e2m1", 32, "floor", "even", False)
    finally:
        torch.set_num_threads(threads)
    assert bits_equal(one, many)


def test_the_ops_run_the_c_kernels_on_any_axis_and_layout(monkeypatch):
    calls = []
    for name in ("native_quantize", "native_fake_quantize", "native_dequantize"):
        original = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    x = torch.randn(40, 6, 70).transpose(0, 2)  # non-contiguous, a partial block
    for axis in (0, 1, 2):
        block = 4 if axis == 1 else 32
        data = mxfx.quantize(x, "fp6_e3m2", block_size=block, axis=axis)
        fake = mxfx.fake_quantize(x, "fp6_e3m2", block_size=block, axis=axis)
        moved = x.movedim(axis, -1)
        codes, scales = reference.quantize_last_axis(moved, "fp6_e3m2", block)
        assert torch.equal(data.codes, codes) and torch.equal(data.scales, scales)
        assert bits_equal(fake, reference.fake_quantize_last_axis(moved, "fp6_e3m2", block).movedim(-1, axis))
        assert bits_equal(mxfx.dequantize(data), fake)
    assert calls.count("native_quantize") == 3 and calls.count("native_fake_quantize") == 3
    assert calls.count("native_dequantize") == 3


def test_what_the_c_kernels_do_not_cover_runs_the_reference(monkeypatch):
    monkeypatch.setattr(native, "native_fake_quantize", lambda *a: pytest.fail("the C kernel ran"))
    x = torch.randn(4, 64)
    for kwargs in (dict(scale_mode="mse"), dict(rounding="stochastic", seed=3)):
        assert bits_equal(mxfx.fake_quantize(x, "fp4_e2m1", **kwargs),
                          reference.fake_quantize_last_axis(x, "fp4_e2m1", 32, **kwargs))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    monkeypatch.setattr(native, "native_fake_quantize", lambda *a: pytest.fail("the C kernel ran"))
    assert native.status() == "off"
    x = torch.randn(4, 64)
    assert bits_equal(mxfx.fake_quantize(x, "fp8_e4m3"), reference.fake_quantize_last_axis(x, "fp8_e4m3", 32))


def test_a_failed_build_warns_once_and_falls_back_to_the_same_bits(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_STATE", "unbuilt")
    monkeypatch.setattr(native, "_LIBRARY", None)
    monkeypatch.setenv("MXFX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(native.shutil, "which", lambda name: None)
    x = torch.randn(4, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = mxfx.fake_quantize(x, "fp6_e2m3")
        second = mxfx.fake_quantize(x, "fp6_e2m3")
    messages = [str(w.message) for w in caught if issubclass(w.category, mxfx.MXFXWarning)]
    assert len(messages) == 1 and "no C compiler" in messages[0] and native.ENV in messages[0], messages
    assert native.status() == "failed"
    expected = reference.fake_quantize_last_axis(x, "fp6_e2m3", 32)
    assert bits_equal(first, expected) and bits_equal(second, expected)


def test_a_build_lands_in_the_cache_and_is_reused(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_STATE", "unbuilt")
    monkeypatch.setattr(native, "_LIBRARY", None)
    monkeypatch.setenv("MXFX_CACHE_DIR", str(tmp_path))
    x = torch.randn(4, 64)
    out = native.fake_quantize_last_axis(x, "int8", 32)
    built = list(tmp_path.glob("mxfx_native_*.so"))
    assert native.status() == "built" and len(built) == 1
    assert bits_equal(out, reference.fake_quantize_last_axis(x, "int8", 32))
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **k: pytest.fail("rebuilt"))
    monkeypatch.setattr(native, "_STATE", "unbuilt")
    assert bits_equal(native.fake_quantize_last_axis(x, "int8", 32), out)


def test_an_unwritable_cache_directory_builds_in_a_temporary_one(monkeypatch, tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("")  # a file where the cache directory's parent should be: mkdir fails
    monkeypatch.setattr(native, "_STATE", "unbuilt")
    monkeypatch.setattr(native, "_LIBRARY", None)
    monkeypatch.setenv("MXFX_CACHE_DIR", str(blocked / "cache"))
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    x = torch.randn(4, 64)
    assert bits_equal(native.fake_quantize_last_axis(x, "fp4_e2m1", 32), reference.fake_quantize_last_axis(x, "fp4_e2m1", 32))
    assert native.status() == "built" and list((tmp_path / "tmp").glob("mxfx-*/mxfx_native_*.so"))
