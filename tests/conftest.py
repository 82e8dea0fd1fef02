import contextlib
import os
import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # scalar_reference, model_zoo

FORMAT_NAMES = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8"]


@pytest.fixture(autouse=True)
def _seeded(request):
    """Each test draws from its own seed (from its id): a result never depends on which tests ran
    before it in the same worker."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def fused_kernels():
    """Compile with the mxfx ops inlined into the graph's own kernels (for tests that read that code)."""
    import mxfx

    with mxfx.fused_kernels():
        yield


@pytest.fixture(params=["native", "shared", "fused"])
def kernel_path(request, monkeypatch):
    """Run a compiled-vs-eager test through each way mxfx ops run compiled on CPU (`mxfx.numerics.kernels`):
    "native", the default (the shared ops call the C kernels, as eager does); "shared" and "fused",
    with the C kernels off, so the Inductor-compiled reference math is compared with the eager reference."""
    import mxfx

    if request.param != "native":
        monkeypatch.setenv("MXFX_NATIVE_KERNELS", "0")
    with mxfx.fused_kernels() if request.param == "fused" else contextlib.nullcontext():
        yield request.param


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN == NaN, -0 != +0)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    view = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}.get(a.dtype)
    if view is None:
        return bool(torch.equal(a, b))
    return bool(torch.equal(a.view(view), b.view(view)))
