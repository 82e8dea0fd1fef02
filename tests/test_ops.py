"""The torch.ops.mxfx ops: opcheck, torch.export (by name, re-export, decompositions, save/load),
and torch.compile (bitwise equal to eager, one fused kernel, no Python fallback)."""

import io

import pytest
import torch
from conftest import FORMAT_NAMES, bits_equal
from hypothesis import Phase, example, given, settings
from hypothesis import strategies as st

import mxfx
from mxfx._compat import run_and_get_code

OPTIONS = ("floor", "even", 0, False)  # scale_mode, rounding, seed, flush_subnormals


def sample_args():
    x = torch.randn(6, 64) * 10
    codes, scales = torch.ops.mxfx.quantize(x, "fp6_e3m2", 32, -1, *OPTIONS)
    a_codes, a_scales = torch.ops.mxfx.quantize(torch.randn(2, 5, 64), "fp8_e4m3", 32, -1, *OPTIONS)
    return {
        torch.ops.mxfx.quantize.default: [(x, "fp4_e2m1", 32, 0, "ceil", "stochastic", 3, False), (x, "int8", 7, -1, *OPTIONS)],
        torch.ops.mxfx.dequantize.default: [(codes, scales, "fp6_e3m2", 32, -1, [6, 64], torch.bfloat16)],
        torch.ops.mxfx.fake_quantize.default: [(x.requires_grad_(), "fp8_e5m2", 32, 1, *OPTIONS)],
        torch.ops.mxfx.linear.default: [
            (torch.randn(3, 64), codes, scales, torch.randn(6), "fp6_e3m2", 32, 64, "fp8_e4m3", 32, "floor", "even"),
            (torch.randn(3, 64), codes, scales, None, "fp6_e3m2", 32, 64, "", 32, "floor", "even"),
        ],
        torch.ops.mxfx.matmul.default: [(a_codes, a_scales, "fp8_e4m3", 32, codes, scales, "fp6_e3m2", 32, 64, torch.float32)],
        torch.ops.mxfx.attention.default: attention_args(),
    }


def attention_args():
    """(q, k, v, mask, is_causal, scale, enable_gqa, q/k/v/p specs): causal 4-D, a float mask with a
    scale and grouped-query heads, a boolean 3-D mask, and a bf16 call with no operand quantized."""
    q, k, v = torch.randn(2, 4, 10, 16), torch.randn(2, 4, 12, 16), torch.randn(2, 4, 12, 8)
    fp8, fp4 = "fp8_e4m3/16/floor/even", "fp4_e2m1/8/ceil/even"
    return [
        (q, k[..., :10, :], v[..., :10, :], None, True, None, False, fp8, fp8, fp8, fp8),
        (q, k[:, :2], v[:, :2], torch.randn(10, 12), False, 0.3, True, fp4, fp8, "", fp4),
        (q[0], k[0], v[0], torch.rand(4, 10, 12) > 0.2, False, None, False, "", fp8, fp4, ""),
        (q.bfloat16(), k.bfloat16(), v.bfloat16(), None, False, None, False, "", "", "", ""),
    ]


@pytest.mark.parametrize("op", list(sample_args()), ids=lambda op: str(op))
def test_opcheck(op):
    for args in sample_args()[op]:
        torch.library.opcheck(op, args)


class QuantizeEverything(torch.nn.Module):
    def forward(self, x, w):
        codes, scales = torch.ops.mxfx.quantize(x, "fp4_e2m1", 32, -1, *OPTIONS)
        y = torch.ops.mxfx.dequantize(codes, scales, "fp4_e2m1", 32, -1, list(x.shape), x.dtype)
        y = torch.ops.mxfx.fake_quantize(y + 1, "int8", 32, -1, *OPTIONS)
        w_codes, w_scales = torch.ops.mxfx.quantize(w, "fp6_e2m3", 32, -1, *OPTIONS)
        z = torch.ops.mxfx.linear(y, w_codes, w_scales, None, "fp6_e2m3", 32, w.shape[1], "fp8_e4m3", 32, "floor", "even")
        return torch.ops.mxfx.matmul(codes, scales, "fp4_e2m1", 32, codes, scales, "fp4_e2m1", 32, x.shape[-1], x.dtype), z


def mxfx_targets(gm):
    return sorted(str(n.target) for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("mxfx."))


EXPECTED_OPS = ["mxfx.dequantize.default", "mxfx.fake_quantize.default", "mxfx.linear.default",
                "mxfx.matmul.default", "mxfx.quantize.default", "mxfx.quantize.default"]


def test_export_keeps_ops_by_name_through_reexport_decompositions_and_save_load():
    x, w = torch.randn(8, 64), torch.randn(16, 64)
    model = QuantizeEverything()
    want = model(x, w)
    ep = torch.export.export(model, (x, w))
    assert mxfx_targets(ep.graph_module) == EXPECTED_OPS
    again = torch.export.export(ep.module(), (x, w))
    decomposed = again.run_decompositions()
    assert mxfx_targets(decomposed.graph_module) == EXPECTED_OPS
    buffer = io.BytesIO()
    torch.export.save(decomposed, buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer)
    assert mxfx_targets(loaded.graph_module) == EXPECTED_OPS
    for got, expected in zip(loaded.module()(x, w), want):
        assert bits_equal(got, expected)


def kernel_count(code: str) -> int:
    return code.count("async_compile.cpp_pybinding(") + code.count("async_compile.triton(")


@pytest.mark.slow
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_compiled_fake_quantize_is_one_kernel_and_bitwise_equal(name, fresh_dynamo, kernel_path, monkeypatch):
    from mxfx.numerics import kernels

    x = torch.randn(64, 256) * torch.exp(torch.randn(64, 256) * 3)
    x[0, 0], x[1, 40], x[2, :32] = float("nan"), float("inf"), 0.0
    x[3, :32] = 1e-39
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        monkeypatch.setattr(kernels, "_KERNELS", {})  # the shared kernel compiles here, so its code is seen
        eager = mxfx.fake_quantize(xd, name)
        compiled, code = run_and_get_code(torch.compile(lambda t: mxfx.fake_quantize(t, name), fullgraph=True), xd)
        assert bits_equal(compiled, eager)
        if kernel_path == "native":  # the model's graph calls the shared op, which runs the C kernel
            assert kernel_count(code[0]) == 0 and "torch.ops.mxfx.shared_fake_quantize" in code[0], code[0]
            assert len(code) == 1 and kernels.compiled_kernels() == [], code
            continue
        if kernel_path == "shared":  # the model's graph calls the shared kernel, itself one fused kernel
            assert kernel_count(code[0]) == 0 and "torch.ops.mxfx.shared_fake_quantize" in code[0], code[0]
            code = code[1:]
        assert kernel_count(code[0]) == 1, code[0]
        assert "torch.ops.mxfx" not in code[0]  # decomposed: no call back into the Python kernel
        torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_compiled_quantize_is_bitwise_equal(name, fresh_dynamo, kernel_path):
    x = torch.randn(32, 200) * 5
    x[0, 0] = float("inf")
    eager = mxfx.quantize(x, name, block_size=32, axis=-1)
    fn = torch.compile(lambda t: torch.ops.mxfx.quantize(t, name, 32, -1, "rceil" if name == "int8" else "floor", "even", 0, False), fullgraph=True)
    codes, scales = fn(x)
    if name == "int8":
        eager = mxfx.quantize(x, name, scale_mode="rceil")
    assert torch.equal(codes, eager.codes) and torch.equal(scales, eager.scales)


@pytest.mark.slow
def test_compiled_roundings_and_axes_bitwise_equal(fresh_dynamo, kernel_path):
    x = torch.randn(3, 48, 40)  # a partial trailing block along the last axis
    for kwargs in (dict(rounding="stochastic", seed=5), dict(rounding="away", axis=1, block_size=16),
                   dict(scale_mode="even", rounding="toward_zero", axis=0, block_size=3)):
        eager = mxfx.fake_quantize(x, "fp6_e2m3", **kwargs)
        compiled = torch.compile(lambda t: mxfx.fake_quantize(t, "fp6_e2m3", **kwargs), fullgraph=True)(x)
        assert bits_equal(compiled, eager), kwargs
        torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_linear_and_matmul_match_eager(fresh_dynamo, fused_kernels):
    x, w, b = torch.randn(4, 10, 96), torch.randn(48, 96), torch.randn(48)
    wq = mxfx.quantize(w, "fp6_e3m2")
    eager = mxfx.linear(x, wq, b, activation_format="fp8_e4m3")
    compiled, code = run_and_get_code(torch.compile(lambda t: mxfx.linear(t, wq, b, activation_format="fp8_e4m3"), fullgraph=True), x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)  # GEMM order may differ
    assert "torch.ops.mxfx" not in code[0]
    q = mxfx.quantize(torch.randn(2, 4, 16, 64), "fp8_e4m3")
    k = mxfx.quantize(torch.randn(2, 4, 64, 16), "fp8_e4m3", axis=-2)
    eager = mxfx.matmul(q, k)
    compiled = torch.compile(lambda: mxfx.matmul(q, k), fullgraph=True)()
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


def test_fake_quantize_straight_through_gradient():
    x = torch.randn(4, 64, requires_grad=True)
    mxfx.fake_quantize(x, "fp4_e2m1").sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(3, 48, 40), (3, 4, 40), (1, 48, 40), (3, 48, 36), (3, 200), (5, 7)])
def test_compiled_partial_blocks_bitwise_equal(shape, fresh_dynamo, kernel_path):
    x = torch.randn(shape)
    for rounding in ("even", "stochastic"):
        eager = mxfx.fake_quantize(x, "fp6_e2m3", rounding=rounding, seed=3)
        compiled = torch.compile(lambda t: mxfx.fake_quantize(t, "fp6_e2m3", rounding=rounding, seed=3), fullgraph=True)(x)
        assert bits_equal(compiled, eager), rounding
        torch._dynamo.reset()


@pytest.mark.slow
@settings(max_examples=6, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])  # a compile each
@example(shape=[44, 1], data=None, name="fp8_e4m3", block=1, dtype=torch.float32, rounding="stochastic", dynamic=True)
@given(shape=st.lists(st.integers(1, 70), min_size=1, max_size=3), data=st.data(),
       name=st.sampled_from(FORMAT_NAMES), block=st.integers(1, 48),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       rounding=st.sampled_from(["even", "away", "toward_zero", "stochastic"]), dynamic=st.booleans())
def test_property_compiled_equals_eager(shape, data, name, block, dtype, rounding, dynamic):
    """Random shapes, axes and block sizes (mostly with a partial trailing block), both ops."""
    axis = data.draw(st.integers(-len(shape), len(shape) - 1)) if data is not None else 0
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(block)) * 4).to(dtype)
    options = dict(block_size=block, axis=axis, rounding=rounding, seed=7)
    torch._dynamo.reset()
    fake = torch.compile(lambda t: mxfx.fake_quantize(t, name, **options), fullgraph=True, dynamic=dynamic)(x)
    assert bits_equal(fake, mxfx.fake_quantize(x, name, **options))
    packed = torch.compile(lambda t: mxfx.quantize(t, name, **options).codes, fullgraph=True, dynamic=dynamic)(x)
    assert torch.equal(packed, mxfx.quantize(x, name, **options).codes)
    torch._dynamo.reset()


@pytest.mark.slow
def test_frozen_weights_fold_the_packed_dequantize_bit_exactly(fresh_dynamo):
    # issue #15: packed weights are dequantized on every call unless the compile freezes them.
    from mxfx.graph.config import MXSpec, QuantConfig, Rule

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 40)).eval()
    spec = MXSpec("fp6_e3m2")  # packed four codes per three bytes: the longest decode
    config = QuantConfig((Rule(match=".*", weight=spec, activation=MXSpec("fp8_e4m3"), weight_storage="packed"),))
    x = torch.randn(5, 64)
    prepared = mxfx.prepare(model, config, (x,))
    with torch.no_grad():
        plain, plain_code = run_and_get_code(torch.compile(prepared), x)
        torch._dynamo.reset()
        with mxfx.frozen_weights():
            assert not torch.is_grad_enabled()
            frozen, frozen_code = run_and_get_code(torch.compile(prepared), x)
        again = torch.compile(prepared)(x)  # served by the frozen compile
    uint8_args = [c.count("dtype=torch.uint8)") for c in (plain_code[0], frozen_code[0])]
    assert uint8_args[0] >= 4 and uint8_args[1] == 0, uint8_args  # codes and scales are no longer inputs
    # ... nor any intermediate of their decode: the fold reaches the fp32 weight (no int32/bool constants)
    assert "dtype=torch.int32)" not in frozen_code[0] and "dtype=torch.bool)" not in frozen_code[0]
    assert bits_equal(frozen, plain) and bits_equal(again, frozen)
    # The folded weight is the eager dequantize; with the same GEMM the output is the eager one.
    assert bits_equal(frozen, prepared(x))


def test_op_arguments_binds_by_schema_name_positional_keyword_and_default():
    """Tools read mxfx op arguments through the schema: a keyword argument or a default reads the
    same as a positional one (a reader by position would see a shorter args tuple)."""
    import torch.fx as fx

    from mxfx.numerics.ops import op_arguments

    graph = fx.Graph()
    x = graph.placeholder("x")
    positional = graph.call_function(torch.ops.mxfx.fake_quantize.default, (x, "fp8_e4m3", 32, -1, "floor", "even", 0, False))
    keyword = graph.call_function(torch.ops.mxfx.fake_quantize.default, (x, "fp8_e4m3"),
                                  {"block_size": 32, "axis": -1, "scale_mode": "floor", "rounding": "even", "seed": 0,
                                   "flush_subnormals": False})
    linear = graph.call_function(torch.ops.aten.linear.default, (x, x))
    assert op_arguments(positional) == op_arguments(keyword)
    assert op_arguments(keyword)["block_size"] == 32 and op_arguments(keyword)["x"] is x
    assert op_arguments(linear)["bias"] is None  # the schema's default
    with pytest.raises(mxfx.MXTypeError, match="schema"):
        op_arguments(x)
    short = graph.call_function(torch.ops.mxfx.fake_quantize.default, (x, "fp8_e4m3"))
    with pytest.raises(mxfx.MXTypeError, match="missing"):
        op_arguments(short)
