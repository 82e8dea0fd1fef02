"""The CUDA path: the same numerics on the GPU as on the CPU, bit for bit, eager and compiled (Triton).

CI has no GPU, so these skip there; they run where one is lent (`pytest tests/test_cuda.py`). The
independent reference is the CPU eager op, itself checked against exact arithmetic elsewhere
(test_numerics): the ops are elementwise integer/float arithmetic with one rounding each, so any
device that follows IEEE 754 must give the same bits. On CUDA, torch.compile always inlines the ops
(`mxfx.kernels` shares kernels on the CPU only), so the compiled tests check Inductor's Triton code.
"""

import copy
import warnings

import pytest
import torch
from conftest import bits_equal

import mxfx
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.numerics import kernels
from mxfx.testing.models import NanoGPT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8"]


def every_bf16() -> torch.Tensor:
    """All 65536 bf16 bit patterns (NaN and Inf included), as a (2048, 32) tensor: 2048 blocks."""
    return torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(2048, 32)


def wide_fp32(seed: int = 0) -> torch.Tensor:
    """Random fp32 over a wide exponent range, with zeros, subnormals and a partial last block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 100, generator=g) * torch.exp2(torch.randint(-140, 120, (64, 1), generator=g).float())
    x[0, :7] = 0.0
    x[1, :5] = torch.tensor([1e-45, -1e-44, 1e-40, 3e-39, -1e-38])
    return x


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal but for NaNs, which need only be NaN in the same places: mxfx promises NaN
    for a NaN block (OCP MX v1.0 §6.3), not its sign or payload, and CUDA arithmetic returns
    its canonical NaN where the CPU propagates the input's."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and bits_equal(a.masked_fill(nan, 0), b.masked_fill(nan, 0))


def quantize_both(x: torch.Tensor, fmt: str, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # non-finite inputs warn; here they are on purpose
        return mxfx.quantize(x, fmt, **kw), mxfx.quantize(x.cuda(), fmt, **kw)


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_bf16_value_quantizes_to_the_same_bits_on_cuda(fmt):
    cpu, gpu = quantize_both(every_bf16(), fmt)
    assert torch.equal(gpu.codes.cpu(), cpu.codes) and torch.equal(gpu.scales.cpu(), cpu.scales)
    assert same_values(gpu.dequantize().cpu(), cpu.dequantize())


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("scale_mode,rounding", [("floor", "even"), ("ceil", "away"), ("rceil", "toward_zero"),
                                                 ("even", "stochastic")])
def test_fp32_quantize_matches_cpu_for_every_scale_mode_and_rounding(fmt, scale_mode, rounding):
    x = wide_fp32()
    cpu, gpu = quantize_both(x, fmt, scale_mode=scale_mode, rounding=rounding, seed=7, axis=0)
    assert torch.equal(gpu.codes.cpu(), cpu.codes) and torch.equal(gpu.scales.cpu(), cpu.scales)
    assert bits_equal(mxfx.fake_quantize(x.cuda(), fmt, scale_mode=scale_mode, rounding=rounding, seed=7,
                                         axis=0).cpu(),
                      mxfx.fake_quantize(x, fmt, scale_mode=scale_mode, rounding=rounding, seed=7, axis=0))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_triton_matches_eager_bitwise(fmt, dtype):
    x = wide_fp32(1).clamp(-1e30, 1e30).to(dtype).cuda()
    torch._dynamo.reset()
    before = kernels.compiled_kernels()

    def both(t):
        data = torch.ops.mxfx.quantize(t, fmt, 32, -1, "floor", "even", 0, False)
        return data[0], data[1], torch.ops.mxfx.fake_quantize(t, fmt, 32, -1, "floor", "even", 0, False)

    codes, scales, fq = torch.compile(both, fullgraph=True)(x)
    ref = both(x)
    assert torch.equal(codes, ref[0]) and torch.equal(scales, ref[1]) and bits_equal(fq, ref[2])
    assert kernels.compiled_kernels() == before  # inlined into Triton, no CPU shared kernel


def test_prepared_model_runs_compiled_on_cuda_and_agrees_with_the_cpu():
    torch.manual_seed(0)
    model = NanoGPT(vocab=128, d=128, n_layer=2, n_head=4, block_size=64).eval()
    ids = torch.randint(0, 128, (2, 64))
    spec = MXSpec("fp8_e4m3")
    config = QuantConfig((Rule(match="lm_head", skip=True),
                          Rule(match=".*", weight=spec, activation=spec, weight_storage="packed",
                               attention=AttentionSpec(spec, spec, spec, spec)),))
    cpu = mxfx.prepare(copy.deepcopy(model), config, (ids,))
    gpu = mxfx.prepare(copy.deepcopy(model).cuda(), config, (ids.cuda(),))
    with torch.no_grad():
        eager = gpu(ids.cuda())
        compiled = torch.compile(gpu)(ids.cuda())
        reference = cpu(ids)
        unquantized = model(ids)
    # GEMM and softmax reduce in a device-specific order, so only the quantizers are bitwise: a
    # logit differs by a few ulps, and a value near a rounding boundary then moves one code. Those
    # differences must stay far below the quantization error itself.
    error = (reference - unquantized).abs().mean()
    assert (eager.cpu() - reference).abs().mean() < 0.1 * error
    assert (compiled.cpu() - eager.cpu()).abs().mean() < 0.1 * error
