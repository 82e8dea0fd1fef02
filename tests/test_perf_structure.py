"""Structure of the code Inductor generates for quantized graphs: no recomputed producers, no
leftover calls into Python. Never timings (issue #15; the benchmarks measure time)."""

import re

import pytest
import torch
from conftest import bits_equal

import mxfx
from mxfx._compat import run_and_get_code
from mxfx.graph.config import MXSpec, QuantConfig, Rule

# These tests read the code of the inlined path (`mxfx.fused_kernels`); test_kernels.py covers the
# shared kernels that are the CPU default.
pytestmark = pytest.mark.usefixtures("fused_kernels")


def erf_count(code: list[str]) -> int:
    """GELU's erf evaluations in generated CPU code (vectorised and scalar spellings)."""
    return sum(c.count(".erf()") + c.count("std::erf(") for c in code)


@pytest.mark.slow
def test_producer_of_fake_quantize_is_computed_once(fresh_dynamo):
    # The quantizer reads each block twice (amax, then elements); an unrealized GELU used to be
    # inlined into both loops (two erf per element). Now it is realized once, as in fp32.
    x = torch.randn(64, 96)

    def gelu(t):
        return torch.nn.functional.gelu(t * 2.0)

    produced, gelu_code = run_and_get_code(torch.compile(gelu, fullgraph=True), x)
    assert erf_count(gelu_code) == 1, gelu_code
    torch._dynamo.reset()
    compiled, code = run_and_get_code(torch.compile(lambda t: mxfx.fake_quantize(gelu(t), "fp8_e4m3"), fullgraph=True), x)
    assert erf_count(code) == 1, code[0]
    assert "torch.ops.mxfx" not in code[0]  # the realize hint is lowered, never a Python call
    # Realizing changes no bit: the result is the reference kernel applied to the compiled GELU.
    assert bits_equal(compiled, mxfx.fake_quantize(produced, "fp8_e4m3"))


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["simulated", "packed"])
def test_prepared_mlp_computes_gelu_once(storage, fresh_dynamo):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).eval()
    x = torch.randn(2, 8, 64)
    spec = MXSpec("fp8_e4m3")
    config = QuantConfig((Rule(match=".*", weight=spec, activation=spec, weight_storage=storage),))
    prepared = mxfx.prepare(model, config, (x,))
    with torch.no_grad():
        eager = prepared(x)
        compiled, code = run_and_get_code(torch.compile(prepared), x)
    assert erf_count(code) == 1, code[0]
    assert "torch.ops.mxfx" not in code[0]
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)  # GEMM order may differ


def test_realize_hint_stays_out_of_eager_and_exported_graphs():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 64)).eval()
    spec = MXSpec("fp8_e4m3")
    config = QuantConfig((Rule(match=".*", weight=spec, activation=spec),))
    prepared = mxfx.prepare(model, config, (torch.randn(4, 64),))
    targets = {str(node.target) for node in prepared.graph.nodes}
    assert any("mxfx" in t for t in targets)  # the graph is quantized ...
    assert not any("realize" in t for t in targets)  # ... by the ops alone
    x = torch.randn(3, 64)
    assert torch.equal(torch.ops.mxfx.realize(x), x)  # the identity in eager


def loop_nests(code: list[str]) -> int:
    """Loop nests in generated CPU code (each nest's outermost loop runs over x0)."""
    return sum(c.count("for(int64_t x0=") for c in code)


@pytest.mark.slow
def test_hadamard_rotation_runs_inside_the_quantizer_loop(fresh_dynamo):
    # Issue #14: the online rotation is fused into the quantization kernel, not an extra pass
    # over memory. The butterfly as pointwise ops compiled to three more loop nests (Inductor
    # realized a buffer every two stages); the lowering computes it in the quantizer's own loop.
    x = torch.randn(64, 96)

    def fq(t):
        return torch.ops.mxfx.fake_quantize(t, "fp4_e2m1", 32, -1, "floor", "even", 0, False)

    plain, plain_code = run_and_get_code(torch.compile(fq, fullgraph=True), x)
    torch._dynamo.reset()
    rotated, code = run_and_get_code(torch.compile(lambda t: fq(torch.ops.mxfx.hadamard(t, 32, -1)), fullgraph=True), x)
    # The quantizer's own nests (block maxima, per-block scales, elements): the rotation is computed
    # inside the first and the last, and adds no nest and no buffer of its own.
    assert loop_nests(plain_code) == 3
    assert loop_nests(code) == loop_nests(plain_code), code[0]
    # no more buffers than the plain quantizer (its output and per-block scratch): the rotated
    # activation never goes to memory
    assert code[0].count("empty_strided_cpu(") == plain_code[0].count("empty_strided_cpu(")
    assert "torch.ops.mxfx" not in code[0]
    assert "Vectorized<float>" in code[0]
    assert bits_equal(rotated, fq(torch.ops.mxfx.hadamard(x, 32, -1)))
    assert bits_equal(plain, fq(x))


@pytest.mark.slow
def test_prepared_rotation_adds_no_loop_nest(fresh_dynamo):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)).eval()
    x = torch.randn(2, 8, 64)
    spec = MXSpec("fp4_e2m1")
    nests = {}
    for rotation in ("", "hadamard"):
        torch._dynamo.reset()
        config = QuantConfig((Rule(match=".*", weight=spec, activation=spec, rotation=rotation),))
        prepared = mxfx.prepare(model, config, (x,))
        with torch.no_grad():
            eager = prepared(x)
            compiled, code = run_and_get_code(torch.compile(prepared), x)
        nests[rotation] = loop_nests(code)
        assert "torch.ops.mxfx" not in code[0]
        torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)  # GEMM order may differ
    assert nests["hadamard"] <= nests[""], nests


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["isolated", "all-but-one"])
def test_model_run_modes_copy_the_graph_once_per_run_not_per_measurement(monkeypatch, mode):
    # issue #15: isolated and all-but-one modes switch sites inside one copy of the exported graph
    # (ExportedProgram.module(): the measured graph and the switched one), whatever the number of
    # measurements; no prepare per measurement, no deep copy of a module or a Parameter, and the
    # switched graph shares the model's parameter storage.
    import copy
    import importlib

    from mxfx.testing.models import MLP

    sensitivity = importlib.import_module("mxfx.analysis.sensitivity_modes")  # where the modes would call prepare

    torch.manual_seed(0)
    model = MLP().eval()
    originals = {p.untyped_storage().data_ptr() for p in model.parameters()}
    modules, prepares = [], []
    real_module, real_deepcopy = torch.export.ExportedProgram.module, copy.deepcopy

    def recording_module(self, *args, **kwargs):
        module = real_module(self, *args, **kwargs)
        modules.append(module)
        return module

    def guarded_deepcopy(value, *args, **kwargs):
        assert not isinstance(value, (torch.nn.Module, torch.nn.Parameter)), f"deep copy of a {type(value).__name__}"
        return real_deepcopy(value, *args, **kwargs)

    monkeypatch.setattr(torch.export.ExportedProgram, "module", recording_module)
    monkeypatch.setattr(sensitivity, "prepare", lambda *a, **k: prepares.append(a) or pytest.fail("prepare called"))
    monkeypatch.setattr(copy, "deepcopy", guarded_deepcopy)
    x = torch.randn(4, 64)
    report = mxfx.sensitivity(model, x, ["fp8_e4m3", "fp6_e2m3", "fp4_e2m1"], mode=mode, progress=None)
    assert len(report.rows) >= 6 and len(modules) == 2 and not prepares, (len(report.rows), len(modules))
    for module in modules:
        floats = [p for p in module.parameters() if p.is_floating_point()]
        assert floats and all(p.untyped_storage().data_ptr() in originals for p in floats)


@pytest.mark.slow
def test_bf16_dequantize_bit_manipulation_stays_16_lanes_wide(fresh_dynamo):
    # Issue #15: a loop mixing bf16 and fp32 is generated twice as wide (VectorizedN<..., 2>), and
    # the decode's integer/mask ops in that form ran ~7x slower than in fp32. The decomposition
    # realizes the fp32 result, so the decode loop is pure fp32 and only the conversion is wide.
    w = torch.randn(64, 256, dtype=torch.bfloat16)
    data = mxfx.quantize(w, "fp8_e4m3")

    def dequantize(codes, scales):
        return torch.ops.mxfx.dequantize(codes, scales, "fp8_e4m3", 32, -1, [64, 256], torch.bfloat16)

    out, code = run_and_get_code(torch.compile(dequantize, fullgraph=True), data.codes, data.scales)
    assert "VectorizedN<int32_t,2>" not in code[0] and "VecMask<int32_t,2>" not in code[0]
    assert bits_equal(out, dequantize(data.codes, data.scales))


@pytest.mark.slow
def test_fp6_codes_are_realized_before_packing(fresh_dynamo):
    # Issue #15: inlined into MXFP6's packing loop (four codes gathered per three bytes), the encode
    # ran ~7x slower; the decomposition realizes the one-byte codes first: a (rows, n) uint8 buffer.
    x = torch.randn(64, 256)

    def quantize(t):
        return torch.ops.mxfx.quantize(t, "fp6_e2m3", 32, -1, "floor", "even", 0, False)

    (codes, scales), code = run_and_get_code(torch.compile(quantize, fullgraph=True), x)
    # a one-byte buffer of all 64 x 256 codes (before packing, 64 x 192 bytes)
    assert re.search(r"empty_strided_cpu\(\((64, 256|64, 8, 32)\), \([0-9, ]+\), torch\.uint8\)", code[0]), code[0]
    eager = quantize(x)
    assert torch.equal(codes, eager[0]) and torch.equal(scales, eager[1])


def test_eager_binade_reads_the_exponent_bits_and_cpu_compiled_code_stays_float(fresh_dynamo):
    # Eager ATen vectorises bit casts, so 2^floor(log2|V/X|) is one mask of the bits there (the
    # 5-op float split made bf16 eager ViT 2.5x of fp32, 1.9x with the mask); code Inductor
    # generates for the CPU runs bit casts through a scalar loop, so it keeps the float split.
    # (FP8 is rounded eagerly by torch's fp8 cast instead: checked last.)
    from torch.utils._python_dispatch import TorchDispatchMode

    from mxfx.numerics.reference import _VELTKAMP_ONE_BIT, fake_quantize_last_axis

    x = torch.randn(64, 256)

    class Record(TorchDispatchMode):  # the ATen ops that write an element-sized tensor
        def __init__(self):
            super().__init__()
            self.full_size = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.numel() == x.numel():
                self.full_size.append((func.overloadpacket.__name__, out.dtype))
            return out

    def fq(t, fmt="fp6_e3m2"):
        return torch.ops.mxfx.fake_quantize(t, fmt, 32, -1, "floor", "even", 0, False)

    with Record() as record:  # the op's eager implementation (the mode would see the custom op as one call)
        eager = fake_quantize_last_axis(x, "fp6_e3m2", 32)
    ops = [name for name, _ in record.full_size]
    assert bits_equal(eager, fq(x))
    assert "bitwise_and" in ops and "sub" not in ops and "where" not in ops, ops
    compiled, code = run_and_get_code(torch.compile(fq, fullgraph=True), x)
    assert bits_equal(compiled, eager)
    assert str(int(_VELTKAMP_ONE_BIT)) in code[0] and str(0x7F800000) not in code[0]
    with Record() as record:
        eager8 = fake_quantize_last_axis(x, "fp8_e4m3", 32)
    assert (("_to_copy", torch.float8_e4m3fn) in record.full_size and "bitwise_and" not in
            [name for name, _ in record.full_size]), record.full_size
    assert bits_equal(eager8, torch.compile(lambda t: fq(t, "fp8_e4m3"), fullgraph=True)(x))
