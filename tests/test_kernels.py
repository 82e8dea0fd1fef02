"""Shared kernels (`mxfx.numerics.kernels`): under torch.compile on CPU every site of an op and
width calls one compiled kernel, bit for bit the eager reference and the inlined (fused) path.

These are the Inductor-compiled shared kernels, which run where the native C kernels do not
(`MXFX_NATIVE_KERNELS=0`, a failed build, the mse scale mode, stochastic rounding): the C kernels
are off in this module."""

import logging
import re

import pytest
import torch
from conftest import bits_equal

import mxfx
from mxfx._compat import run_and_get_code
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.numerics import kernels
from mxfx.testing.models import NanoGPT


@pytest.fixture(autouse=True)
def _inductor_shared_kernels(monkeypatch):
    monkeypatch.setenv("MXFX_NATIVE_KERNELS", "0")


def shared_calls(source: str) -> int:
    return len(re.findall(r"torch\.ops\.mxfx\.shared_\w+\.default\(", source))


def new_kernels(before: list[str]) -> list[str]:
    return [k for k in kernels.compiled_kernels() if k not in before]


@pytest.mark.slow
def test_layers_share_kernels_so_their_number_does_not_grow_with_depth(fresh_dynamo, monkeypatch):
    monkeypatch.setattr(kernels, "_KERNELS", {})  # this test's kernels only, whatever ran before it
    spec = MXSpec("fp6_e2m3")
    config = QuantConfig((Rule(match="lm_head", skip=True),
                          Rule(match=".*", weight=spec, activation=spec, attention=AttentionSpec(spec, spec, spec, spec)),))
    built, calls = {}, {}
    for layers in (1, 3):
        torch.manual_seed(0)
        model = NanoGPT(vocab=64, d=64, n_layer=layers, n_head=2, block_size=32).eval()
        ids = torch.randint(0, 64, (2, 32))
        prepared = mxfx.prepare(model, config, (ids,))
        before = kernels.compiled_kernels()
        with torch.no_grad():
            out, code = run_and_get_code(torch.compile(prepared), ids)
            torch.testing.assert_close(out, prepared(ids), rtol=1e-4, atol=1e-4)
        built[layers] = new_kernels(before) if layers == 1 else [k for k in kernels.compiled_kernels() if k in built[1]]
        calls[layers] = shared_calls(code[0])
        torch._dynamo.reset()
    # 4 linears per layer (activation fake-quantize and packed-weight dequantize each) + attention's
    # Q, K, P and V fake-quantizes (whole blocks: head_dim 32, 32 keys)
    assert calls[1] == 12 and calls[3] == 36, calls
    # one fake-quantize kernel for every width (64, 256: the MLP's wide input, 32: attention's
    # operands; a row per MX block) and one dequantize kernel: attention adds none of its own
    assert len(built[1]) == 2, built[1]
    assert not any("attention" in k for k in built[1]) and all("rows" in k for k in built[1])
    assert len(new_kernels(before)) == 0  # the 3-layer model compiled no kernel of its own


@pytest.mark.slow
def test_one_kernel_serves_every_row_count_and_width(fresh_dynamo):
    before = kernels.compiled_kernels()

    def fq(t):
        return torch.ops.mxfx.fake_quantize(t, "fp4_e2m1", 32, -1, "floor", "away", 0, False)

    # whole blocks: one row per MX block, so every width shares the kernel
    for shape in ((8, 96), (24, 64), (3, 5, 160), (2, 32)):
        x = torch.randn(shape) * 4
        assert bits_equal(torch.compile(fq, fullgraph=True)(x), fq(x)), shape
        torch._dynamo.reset()  # a fresh compile of the caller every time: only the kernel is shared
    assert len(new_kernels(before)) == 1, new_kernels(before)
    x = torch.randn(1, 32)  # one block: Dynamo specializes size 1, so a kernel of its own
    assert bits_equal(torch.compile(fq, fullgraph=True)(x), fq(x))
    torch._dynamo.reset()
    assert len(new_kernels(before)) == 2
    for shape in ((4, 80), (9, 80)):  # a partial block: (rows, n), a kernel per width
        x = torch.randn(shape) * 4
        assert bits_equal(torch.compile(fq, fullgraph=True)(x), fq(x)), shape
        torch._dynamo.reset()
    assert len(new_kernels(before)) == 3, new_kernels(before)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp6_e3m2", "fp8_e5m2"])
def test_packed_codes_of_whole_blocks_round_trip_through_the_per_block_rows(fresh_dynamo, fmt):
    # quantize's packed codes are the blocks' bytes back to back (fp4: 16 bytes a block, fp6: 24),
    # so the per-block rows of the shared kernels must give eager's codes, scales and values
    x = torch.randn(3, 7, 96) * 8

    axis = 1 if fmt == "fp8_e5m2" else -1  # E5M2: blocks along a middle axis
    t = x.transpose(1, 2).contiguous() if axis == 1 else x  # (3, 96, 7): 96 along the block axis

    def round_trip(t):
        codes, scales = torch.ops.mxfx.quantize(t, fmt, 32, axis, "floor", "even", 0, False)
        return codes, scales, torch.ops.mxfx.dequantize(codes, scales, fmt, 32, axis, list(t.shape), torch.bfloat16)

    eager = round_trip(t)
    compiled, code = run_and_get_code(torch.compile(round_trip, fullgraph=True), t)
    assert shared_calls(code[0]) == 2, code[0]
    assert all(bits_equal(a, b) for a, b in zip(compiled, eager))


@pytest.mark.slow
@pytest.mark.parametrize("fmt, block, width", [("fp6_e3m2", 6, 12), ("fp4_e2m1", 1, 17)])
def test_blocks_whose_codes_do_not_fill_whole_bytes_keep_whole_rows(fresh_dynamo, fmt, block, width):
    # fp6 packs 4 codes into 3 bytes and fp4 2 into 1: a block of 6 (or 1) codes would pad each
    # per-block row to the packing group, so its codes are not the row's (hypothesis found fp6
    # with block 1: 3 bytes a block against 15 for 17 codes); these keep (rows, n)
    x = torch.randn(5, width) * 8

    def round_trip(t):
        codes, scales = torch.ops.mxfx.quantize(t, fmt, block, -1, "floor", "even", 0, False)
        return codes, scales, torch.ops.mxfx.dequantize(codes, scales, fmt, block, -1, [5, width], torch.float32)

    eager = round_trip(x)
    compiled, code = run_and_get_code(torch.compile(round_trip, fullgraph=True), x)
    assert shared_calls(code[0]) == 2, code[0]
    assert all(bits_equal(a, b) for a, b in zip(compiled, eager))


@pytest.mark.slow
def test_shared_ops_equal_eager_and_the_fused_path_bitwise(fresh_dynamo):
    torch.manual_seed(0)
    x = torch.randn(6, 10, 80, dtype=torch.bfloat16)  # a partial block; bf16 in and out
    w = mxfx.quantize(torch.randn(48, 80), "fp6_e3m2")
    q, k, v = (torch.randn(2, 4, 40, 32) for _ in range(3))
    mask = torch.randn(40, 40) > -1.0
    spec = "fp8_e4m3/32/floor/even"

    def ops(x, q, k, v):
        return (
            torch.ops.mxfx.fake_quantize(x, "fp8_e5m2", 32, 1, "even", "stochastic", 7, False),
            *torch.ops.mxfx.quantize(x, "int8", 16, -1, "rceil", "even", 0, True),
            torch.ops.mxfx.dequantize(w.codes, w.scales, "fp6_e3m2", 32, -1, [48, 80], torch.bfloat16),
            torch.ops.mxfx.linear(x.float(), w.codes, w.scales, None, "fp6_e3m2", 32, 80, "fp4_e2m1", 32, "floor", "even"),
            torch.ops.mxfx.attention(q, k, v, mask, False, None, False, spec, spec, spec, spec),
        )

    eager = ops(x, q, k, v)
    shared, code = run_and_get_code(torch.compile(ops, fullgraph=True), x, q, k, v)
    assert shared_calls(code[0]) == 9, code[0]  # attention: its four operand quantizers
    torch._dynamo.reset()
    with mxfx.fused_kernels():
        fused, fused_code = run_and_get_code(torch.compile(ops, fullgraph=True), x, q, k, v)
    assert "torch.ops.mxfx" not in fused_code[0]
    for i, (a, b, c) in enumerate(zip(eager, shared, fused)):
        assert bits_equal(b, c), i  # the two compiled paths trace the same math
        if i < 4:  # quantizers: exact to eager; the GEMM and softmax may round differently from ATen
            assert bits_equal(a, b), i
        else:
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    # the attention output keeps SDPA's layout (the fake impl's strides) through the shared calls
    assert shared[5].stride() == eager[5].stride()
    # symbolic lengths: one attention kernel (the padding of a symbolic length is not static)
    torch._dynamo.reset()
    attention = torch.compile(lambda q, k, v: ops(x, q, k, v)[5], fullgraph=True, dynamic=True)
    out, code = run_and_get_code(attention, q, k, v)
    assert "torch.ops.mxfx.shared_attention.default(" in code[0], code[0]
    assert bits_equal(out, shared[5]) and out.stride() == eager[5].stride()


@pytest.mark.slow
def test_kernels_beyond_dynamos_recompile_limit_still_compile(fresh_dynamo, caplog):
    # Dynamo stops compiling a code object after 8 recompiles and runs it eagerly, silently but for
    # a log line: kernels are compiled without a Dynamo frame, so the tenth seed still compiles.
    x = torch.randn(4, 32)
    with caplog.at_level(logging.WARNING, logger="torch._dynamo"):
        for seed in range(10):
            def fq(t, seed=seed):
                return torch.ops.mxfx.fake_quantize(t, "fp8_e4m3", 32, -1, "floor", "stochastic", seed, False)

            assert bits_equal(torch.compile(fq, fullgraph=True)(x), fq(x))
    assert not [r for r in caplog.records if "recompile" in r.getMessage()], caplog.text


@pytest.mark.slow
def test_a_compiled_model_compiles_nothing_after_its_first_call(fresh_dynamo, monkeypatch):
    # An Inductor graph's first run calls its fallback ops in another dispatch state than later
    # runs: while kernels were Dynamo frames, its dispatch-key guard failed on the second call and
    # every shared kernel compiled again (~1 s each). Kernels now have no guards; this counts
    # their compiles and the model's.
    from torch._dynamo.utils import counters

    builds = []
    compile_rows_kernel = kernels._compat.compile_rows_kernel
    monkeypatch.setattr(kernels._compat, "compile_rows_kernel", lambda *a: builds.append(1) or compile_rows_kernel(*a))
    monkeypatch.setattr(kernels, "_KERNELS", {})
    torch.manual_seed(0)
    model = NanoGPT(vocab=64, d=64, n_layer=1, n_head=2, block_size=32).eval()
    ids = torch.randint(0, 64, (2, 32))
    spec = MXSpec("fp8_e5m2")
    config = QuantConfig((Rule(match="lm_head", skip=True), Rule(match=".*", weight=spec, activation=spec),))
    compiled = torch.compile(mxfx.prepare(model, config, (ids,)))
    with torch.no_grad():
        compiled(ids)
        frames, built = counters["stats"]["unique_graphs"], len(builds)
        assert frames >= 1 and built == 2  # the model; the fake-quantize and dequantize kernels
        compiled(ids)
        compiled(ids)
    assert counters["stats"]["unique_graphs"] == frames and len(builds) == built


def test_a_kernel_first_compiled_for_a_few_rows_still_runs_its_rows_in_parallel(fresh_dynamo, monkeypatch):
    # The row count is symbolic, and Inductor's CPU backend decides whether to split a loop over
    # threads from the size hint of the first call (its FX graph cache then hands that code to any
    # row count): a kernel first called on a handful of rows ran every later site on one thread
    # (a 2048x2048 fake-quantize, 2 threads: 3.6 ms vs 2.0 ms). Its outer loop is now always an
    # OpenMP loop over the rows, with the thread count read at run time.
    monkeypatch.setattr(kernels, "_KERNELS", {})
    x = torch.randn(2, 64)  # 4 rows of one block each
    out, code = run_and_get_code(torch.ops.mxfx.shared_fake_quantize, x, "fp8_e5m2", 32, -1, "floor", "even", 0, False)
    source = "\n".join(code)
    assert "#pragma omp parallel" in source and "num_threads(" not in source, source
    big = torch.randn(64, 256)
    assert bits_equal(torch.ops.mxfx.shared_fake_quantize(big, "fp8_e5m2", 32, -1, "floor", "even", 0, False),
                      torch.ops.mxfx.fake_quantize(big, "fp8_e5m2", 32, -1, "floor", "even", 0, False))
    assert len(kernels.compiled_kernels()) == 1 and bits_equal(out, torch.ops.mxfx.fake_quantize(
        x, "fp8_e5m2", 32, -1, "floor", "even", 0, False))


@pytest.mark.slow
def test_linears_reading_one_input_share_its_activation_quantizer(fresh_dynamo):
    # HF attention blocks feed one normalised activation to the query, key and value linears:
    # identical quantizer calls on one buffer run once per compiled graph; a linear whose
    # activation format differs keeps its own call
    class QKV(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = torch.nn.LayerNorm(64)
            self.q, self.k, self.v = (torch.nn.Linear(64, 64) for _ in range(3))

        def forward(self, x):
            h = self.norm(x)
            return self.q(h) + self.k(h) * self.v(h)

    torch.manual_seed(0)
    model, x = QKV().eval(), torch.randn(2, 16, 64)
    fp8 = MXSpec("fp8_e4m3")
    for rules, calls in (((Rule(match=".*", weight=fp8, activation=fp8),), 1),
                         ((Rule(match="^k$", weight=fp8, activation=MXSpec("fp4_e2m1")),
                           Rule(match=".*", weight=fp8, activation=fp8)), 2)):
        prepared = mxfx.prepare(model, QuantConfig(rules), (x,))
        with torch.no_grad():
            shared, code = run_and_get_code(torch.compile(prepared), x)
            torch._dynamo.reset()
            with mxfx.fused_kernels():
                fused = torch.compile(prepared)(x)
            torch._dynamo.reset()
        assert code[0].count("torch.ops.mxfx.shared_fake_quantize.default(") == calls, code[0]
        assert bits_equal(shared, fused)  # the same values as three quantizers inlined


def test_a_kernel_compile_that_assumes_a_size_is_refused():
    # Kernels run with no guards, so a compile that fixed a symbolic size would silently give
    # wrong results for other sizes: only "these row counts are equal" is accepted.
    from mxfx import _compat

    def specializes(t):
        return t + 1 if t.shape[0] == 8 else t

    with pytest.raises(RuntimeError, match=r"assumed Eq\(s\d+, 8\)"):
        _compat.compile_rows_kernel(specializes, [torch.randn(8, 4)], True, {})
    scale = _compat.compile_rows_kernel(lambda t, s: t * s, [torch.randn(8, 4), torch.randn(8, 1)], True, {})
    t, s = torch.randn(20, 4), torch.randn(20, 1)
    assert torch.equal(scale(t, s), t * s)  # equal row counts (broadcasting): accepted, any count


def test_fused_kernels_inlines_the_ops_and_keys_the_caches_apart(fresh_dynamo):
    x = torch.randn(4, 64)

    def fq(t):
        return torch.ops.mxfx.fake_quantize(t, "fp8_e4m3", 32, -1, "floor", "even", 0, False)

    tag = torch.compiler.config.cache_key_tag
    with mxfx.fused_kernels():
        assert torch.compiler.config.cache_key_tag.startswith(tag) and torch.compiler.config.cache_key_tag != tag
        out, code = run_and_get_code(torch.compile(fq, fullgraph=True), x)
    assert torch.compiler.config.cache_key_tag == tag
    assert "torch.ops.mxfx" not in code[0] and bits_equal(out, fq(x))
    torch._dynamo.reset()
    out, code = run_and_get_code(torch.compile(fq, fullgraph=True), x)
    assert "torch.ops.mxfx.shared_fake_quantize" in code[0] and bits_equal(out, fq(x))


def test_a_failing_kernel_compile_falls_back_to_eager_math_and_names_the_kernel_and_the_switch(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "_KERNELS", {})
    monkeypatch.setattr(kernels._compat, "compile_rows_kernel", broken)
    monkeypatch.setattr(kernels._compat, "_BROKEN", set())
    x = torch.randn(4, 32)
    with pytest.warns(mxfx.MXFXWarning, match=r"fake_quantize_2d.*no C\+\+ compiler.*MXFX_SHARED_KERNELS=0"):
        out = torch.ops.mxfx.shared_fake_quantize(x, "fp8_e4m3", 32, -1, "floor", "even", 0, False)
    assert bits_equal(out, mxfx.fake_quantize(x, "fp8_e4m3"))  # the eager reference math
    assert not kernels.sharing(x)  # later compiles inline the ops


@pytest.mark.slow
def test_attention_reuses_the_activation_kernel_with_partial_blocks_padded(fresh_dynamo, monkeypatch):
    # Where whole blocks tile head_dim and the key axis, attention's four operand quantizers are
    # shared fake-quantize calls (one row per block): the kernel the linears' fp32 activations use,
    # so attention compiles no kernel of its own. A partial block (40 keys) is padded with zeros to
    # a whole one first: the same bits (the numerics pad so too), the same kernel.
    monkeypatch.setattr(kernels, "_KERNELS", {})
    spec = "fp8_e4m3/32/floor/even"
    torch.manual_seed(0)

    def attention(q, k, v, mask):
        return torch.ops.mxfx.attention(q, k, v, mask, False, None, False, spec, spec, spec, spec)

    def linear_input(x):
        return torch.ops.mxfx.fake_quantize(x, "fp8_e4m3", 32, -1, "floor", "even", 0, False)

    linear_input_compiled = torch.compile(linear_input, fullgraph=True)
    x = torch.randn(8, 96)
    assert bits_equal(linear_input_compiled(x), linear_input(x))
    assert len(kernels.compiled_kernels()) == 1
    q, k, v = (torch.randn(2, 3, 64, 32) for _ in range(3))
    mask = torch.randn(64, 64) > -1.0
    eager = attention(q, k, v, mask)
    shared, code = run_and_get_code(torch.compile(attention, fullgraph=True), q, k, v, mask)
    assert shared_calls(code[0]) == 4 and "shared_attention" not in code[0], code[0]
    assert len(kernels.compiled_kernels()) == 1, kernels.compiled_kernels()  # no new kernel
    torch._dynamo.reset()
    with mxfx.fused_kernels():
        fused = torch.compile(attention, fullgraph=True)(q, k, v, mask)
    assert bits_equal(shared, fused)  # the same math, compiled the same way around the quantizers
    torch.testing.assert_close(shared, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    # 40 keys: P's and V's second blocks are partial; stochastic rounding, whose counter runs over
    # the padded blocks, and a format whose kernel is new (so exactly one more)
    stochastic = "fp6_e2m3/32/floor/stochastic"

    def padded(q, k, v, mask):
        return torch.ops.mxfx.attention(q, k, v, mask, False, None, False, spec, spec, stochastic, stochastic)

    q, k, v = (torch.randn(2, 3, 40, 32) for _ in range(3))
    mask = torch.randn(40, 40) > -1.0
    shared, code = run_and_get_code(torch.compile(padded, fullgraph=True), q, k, v, mask)
    assert shared_calls(code[0]) == 4 and "shared_attention" not in code[0], code[0]
    assert len(kernels.compiled_kernels()) == 2, kernels.compiled_kernels()
    torch._dynamo.reset()
    with mxfx.fused_kernels():
        fused = torch.compile(padded, fullgraph=True)(q, k, v, mask)
    assert bits_equal(shared, fused)
    torch.testing.assert_close(shared, padded(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_a_padded_attention_operand_is_the_references_bits():
    # the operand quantizer alone, eager: padding + the per-block shared kernel == the reference's
    # own zero padding, bit for bit, along both axes attention quantizes, for every rounding
    from mxfx.numerics.attention import quantize_operand

    torch.manual_seed(0)
    x = torch.randn(2, 3, 45, 70) * 3
    for rounding in ("even", "away", "toward_zero", "stochastic"):
        spec = f"fp4_e2m1/32/floor/{rounding}"
        for axis in (-1, -2):
            ours = quantize_operand(x, spec, axis, quantizer=kernels._shared_operand)
            assert bits_equal(ours, quantize_operand(x, spec, axis)), (rounding, axis)

