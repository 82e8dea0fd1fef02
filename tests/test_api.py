"""The eager API: MXData layout and storage, matmul/linear semantics, bad input, and properties."""

import sys

import pytest
import torch
from conftest import FORMAT_NAMES, bits_equal
from hypothesis import given, settings
from hypothesis import strategies as st

import mxfx
from mxfx.numerics.reference import pack_codes, unpack_codes


@pytest.mark.parametrize("name,bytes_per_32", [("fp8_e4m3", 32), ("fp6_e3m2", 24), ("fp4_e2m1", 16), ("int8", 32)])
def test_storage_sizes(name, bytes_per_32):
    q = mxfx.quantize(torch.randn(4, 128), name)
    assert q.codes.dtype == torch.uint8 and q.scales.dtype == torch.uint8
    assert q.codes.shape == (4, 4 * bytes_per_32) and q.scales.shape == (4, 4)
    assert q.nbytes == 4 * 4 * bytes_per_32 + 16


def test_fp4_low_nibble_first_and_fp6_layout():
    fp4, fp6 = mxfx.get_format("fp4_e2m1"), mxfx.get_format("fp6_e3m2")
    assert pack_codes(torch.tensor([0x1, 0xF], dtype=torch.uint8), fp4).tolist() == [0xF1]
    packed = pack_codes(torch.tensor([0x01, 0x02, 0x03, 0x3F], dtype=torch.uint8), fp6)
    word = 0x01 | 0x02 << 6 | 0x03 << 12 | 0x3F << 18
    assert packed.tolist() == [word & 0xFF, (word >> 8) & 0xFF, word >> 16]


def test_fp4_packing_does_not_depend_on_host_byte_order(monkeypatch):
    """The little-endian int16 view and the strided form (any host) pack the same bytes."""
    fp4 = mxfx.get_format("fp4_e2m1")
    codes = torch.randint(0, 16, (3, 64), dtype=torch.uint8)
    little = pack_codes(codes, fp4)
    monkeypatch.setattr(sys, "byteorder", "big")
    assert torch.equal(pack_codes(codes, fp4), little)
    assert pack_codes(codes[:, :0], fp4).shape == (3, 0)


@pytest.mark.parametrize("name", ["fp6_e2m3", "fp4_e2m1"])
def test_pack_unpack_round_trip_every_code(name):
    fmt = mxfx.get_format(name)
    codes = torch.arange(2**fmt.bits, dtype=torch.uint8).repeat(3).reshape(3, -1)
    assert torch.equal(unpack_codes(pack_codes(codes, fmt), fmt), codes)


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_quantize_dequantize_equals_fake_quantize(name):
    x = torch.randn(3, 5, 70)
    for axis in (0, 1, 2, -1):
        q = mxfx.quantize(x, name, block_size=16, axis=axis)
        assert bits_equal(q.dequantize(), mxfx.fake_quantize(x, name, block_size=16, axis=axis))
        assert bits_equal(mxfx.dequantize(q, torch.bfloat16), q.dequantize().bfloat16())


def test_axis_is_the_block_axis():
    x = torch.randn(64, 64)
    along_rows = mxfx.fake_quantize(x, "fp4_e2m1", axis=0)
    assert bits_equal(along_rows, mxfx.fake_quantize(x.t().contiguous(), "fp4_e2m1").t())
    assert not bits_equal(along_rows, mxfx.fake_quantize(x, "fp4_e2m1"))


def test_partial_trailing_block_is_zero_padded():
    x = torch.randn(2, 40)
    padded = torch.nn.functional.pad(x, (0, 24))
    assert bits_equal(mxfx.fake_quantize(x, "fp6_e2m3"), mxfx.fake_quantize(padded, "fp6_e2m3")[:, :40])
    small = torch.randn(3, 5)  # shorter than one block
    assert bits_equal(mxfx.quantize(small, "fp4_e2m1").dequantize(), mxfx.fake_quantize(small, "fp4_e2m1"))


def test_matmul_2d_to_4d_attention_and_broadcast():
    q, k, v = torch.randn(2, 4, 16, 64), torch.randn(2, 4, 16, 64), torch.randn(2, 4, 16, 64)
    qm, km = mxfx.quantize(q, "fp8_e4m3"), mxfx.quantize(k.transpose(-2, -1), "fp8_e4m3", axis=-2)
    scores = mxfx.matmul(qm, km)
    ref = mxfx.fake_quantize(q, "fp8_e4m3") @ mxfx.fake_quantize(k, "fp8_e4m3").transpose(-2, -1)
    torch.testing.assert_close(scores, ref, rtol=0, atol=1e-5)
    # P @ V: P blocked along the key axis (its last), V along the sequence axis (-2)
    p = scores.softmax(-1)
    out = mxfx.matmul(mxfx.quantize(p, "fp8_e4m3"), mxfx.quantize(v, "fp8_e4m3", axis=-2))
    ref = mxfx.fake_quantize(p, "fp8_e4m3") @ mxfx.fake_quantize(v, "fp8_e4m3", axis=-2)
    assert out.shape == (2, 4, 16, 64)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    # a 2-D operand broadcast against a batch of 3
    x, y = torch.randn(7, 64), torch.randn(3, 64, 5)
    a, b = mxfx.quantize(x, "int8"), mxfx.quantize(y, "fp4_e2m1", axis=-2)
    ref = mxfx.fake_quantize(x, "int8") @ mxfx.fake_quantize(y, "fp4_e2m1", axis=-2)
    assert ref.shape == (3, 7, 5)
    torch.testing.assert_close(mxfx.matmul(a, b), ref, rtol=0, atol=1e-5)
    low = mxfx.matmul(a, b, out_dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16 and torch.equal(low, mxfx.matmul(a, b).to(torch.bfloat16))


def test_linear_matches_hand_reference_with_separate_formats():
    x, w, b = torch.randn(4, 7, 96, dtype=torch.bfloat16), torch.randn(48, 96, dtype=torch.bfloat16), torch.randn(48, dtype=torch.bfloat16)
    got = mxfx.linear(x, w, b, weight_format="fp6_e3m2", activation_format="fp8_e4m3")
    ref = torch.nn.functional.linear(mxfx.fake_quantize(x, "fp8_e4m3"), mxfx.fake_quantize(w, "fp6_e3m2"), b)
    assert bits_equal(got, ref)
    weight_only = mxfx.linear(x, w, None, weight_format="fp4_e2m1", activation_format=None)
    assert bits_equal(weight_only, torch.nn.functional.linear(x, mxfx.fake_quantize(w, "fp4_e2m1")))


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: mxfx.quantize(torch.arange(32), "fp8_e4m3"), mxfx.MXTypeError, "int64"),
        (lambda: mxfx.quantize(torch.ones(32, dtype=torch.bool), "fp8_e4m3"), mxfx.MXTypeError, "bool"),
        (lambda: mxfx.quantize(torch.ones(32, dtype=torch.complex64), "fp8_e4m3"), mxfx.MXTypeError, "complex"),
        (lambda: mxfx.quantize(torch.ones(32, dtype=torch.float64), "fp8_e4m3"), mxfx.MXTypeError, r"\.float\(\)"),
        (lambda: mxfx.quantize([1.0, 2.0], "fp8_e4m3"), mxfx.MXTypeError, "torch.Tensor"),
        (lambda: mxfx.quantize(torch.tensor(1.0), "fp8_e4m3"), mxfx.MXValueError, "0-d"),
        (lambda: mxfx.quantize(torch.ones(32), "fp9"), mxfx.FormatError, "valid formats"),
        (lambda: mxfx.quantize(torch.ones(32), "fp8", block_size=0), mxfx.MXValueError, "positive"),
        (lambda: mxfx.quantize(torch.ones(32), "fp8", block_size=-4), mxfx.MXValueError, "positive"),
        (lambda: mxfx.quantize(torch.ones(32), "fp8", block_size=2.5), mxfx.MXValueError, "positive"),
        (lambda: mxfx.quantize(torch.ones(32), "fp8", axis=1), mxfx.MXValueError, "out of range"),
        (lambda: mxfx.quantize(torch.ones(32), "fp8", scale_mode="round"), mxfx.FormatError, "floor, ceil, even, rceil"),
        (lambda: mxfx.fake_quantize(torch.ones(32), "fp8", rounding="up"), mxfx.FormatError, "stochastic"),
        (lambda: mxfx.matmul(torch.ones(2, 32), mxfx.quantize(torch.ones(32, 2), "fp8", axis=0)), mxfx.MXTypeError, "MXData"),
        (lambda: mxfx.matmul(mxfx.quantize(torch.ones(2, 32), "fp8", axis=0), mxfx.quantize(torch.ones(32, 2), "fp8", axis=0)), mxfx.MXValueError, "last axis"),
        (lambda: mxfx.matmul(mxfx.quantize(torch.ones(2, 32), "fp8"), mxfx.quantize(torch.ones(32, 2), "fp8")), mxfx.MXValueError, "axis=-2"),
        (lambda: mxfx.matmul(mxfx.quantize(torch.ones(2, 32), "fp8"), mxfx.quantize(torch.ones(16, 2), "fp8", axis=0)), mxfx.MXValueError, "inner"),
        (lambda: mxfx.linear(torch.ones(2, 32), torch.ones(4, 16)), mxfx.MXValueError, "features"),
        (lambda: mxfx.dequantize(torch.ones(3)), mxfx.MXTypeError, "MXData"),
    ],
)
def test_bad_input_raises_clear_mxfx_error(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_errors_are_also_builtin_types():
    with pytest.raises(ValueError):
        mxfx.get_format("nope")
    with pytest.raises(TypeError):
        mxfx.quantize(torch.arange(3), "fp8")


def test_zero_size_and_non_contiguous_inputs():
    empty = torch.empty(0, 64)
    assert mxfx.fake_quantize(empty, "fp8_e4m3").shape == (0, 64)
    assert mxfx.quantize(torch.empty(4, 0), "fp4_e2m1").dequantize().shape == (4, 0)
    x = torch.randn(64, 96)
    assert bits_equal(mxfx.fake_quantize(x.t(), "int8"), mxfx.fake_quantize(x.t().contiguous(), "int8"))
    img = torch.randn(2, 32, 4, 4).to(memory_format=torch.channels_last)
    assert bits_equal(mxfx.fake_quantize(img, "fp8_e5m2", axis=1), mxfx.fake_quantize(img.contiguous(), "fp8_e5m2", axis=1))


shapes = st.lists(st.integers(1, 40), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(shape=shapes, data=st.data(), name=st.sampled_from(FORMAT_NAMES), block=st.integers(1, 48),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       mode=st.sampled_from(["floor", "ceil", "even", "rceil"]), log_scale=st.floats(-30, 30))
def test_property_axis_shape_block_dtype(shape, data, name, block, dtype, mode, log_scale):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    g = torch.Generator().manual_seed(len(shape) * 1000 + block)
    x = (torch.randn(shape, generator=g) * 2.0**log_scale).to(dtype)
    q = mxfx.quantize(x, name, block_size=block, axis=axis, scale_mode=mode)
    d = q.dequantize()
    assert d.shape == x.shape and d.dtype == dtype
    # any axis is the last axis after a move
    moved = mxfx.fake_quantize(x.movedim(axis, -1).contiguous(), name, block_size=block, scale_mode=mode).movedim(-1, axis)
    assert bits_equal(d, moved)
    # values never flip sign, and never exceed their block's max |x| by more than one element
    # step: the quantum of the format's top binade times the block scale, 2^(scale - 127 + emax - mbits)
    finite = torch.isfinite(x.float()) & torch.isfinite(d.float())
    assert ((d.float() * x.float())[finite] >= 0).all()
    n_blocks = -(-x.shape[axis] // block)
    assert q.scales.shape[-1] == n_blocks

    def blocks(t):  # (..., n_blocks, block) along the block axis, zero-padded
        t = t.double().movedim(axis, -1)
        return torch.nn.functional.pad(t, (0, n_blocks * block - t.shape[-1])).unflatten(-1, (n_blocks, block))

    fmt = mxfx.get_format(name)
    step = torch.pow(2.0, q.scales.double() - 127 + fmt.emax - fmt.mbits)
    # decoded in fp32: the bound is on the MX value (a "ceil"/"even"/"rceil" scale can round an
    # fp16 input near 65504 up to 65536, which is Inf once stored back in fp16)
    xb, db = blocks(x), blocks(q.dequantize(torch.float32))
    ok = torch.isfinite(xb).all(-1) & (q.scales != 0xFF)
    assert (db.abs().amax(-1)[ok] <= xb.abs().amax(-1)[ok] + step[ok]).all()
