"""mxfx.numerics.slabs: quantizing a tensor slab by slab gives the whole-tensor bits, and prepare's
peak memory stays near what it stores (the reason slabs exist)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import FORMAT_NAMES, bits_equal

import mxfx
from mxfx.graph.config import config_from_dict
from mxfx.numerics import api, slabs

CASES = [  # (shape, axis, max_elements): whole rows per slab, a partial last slab, single rows, 3-D
    ((70, 96), -1, 96 * 8),
    ((33, 100), 1, 150),  # a line (100) > half a slab: one row per slab; a partial trailing block
    ((5, 64, 40), 1, 300),  # stacked experts blocked along axis 1: lines cut inside each expert
    ((4, 6, 64), 0, 64),
]


@pytest.mark.parametrize("shape,axis,max_elements", CASES)
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_slabs_match_the_whole_tensor_bit_for_bit(shape, axis, max_elements, fmt):
    x = torch.randn(shape) * torch.logspace(-3, 3, shape[-1])
    x.view(-1)[7] = float("nan")
    whole = api.quantize(x, fmt, axis=axis)
    cut = slabs.quantize(x, fmt, axis=axis, max_elements=max_elements)
    assert torch.equal(cut.codes, whole.codes) and torch.equal(cut.scales, whole.scales)
    assert (cut.axis, cut.shape, cut.dtype, cut.elem_format) == (whole.axis, whole.shape, whole.dtype, whole.elem_format)
    fake = slabs.fake_quantize(x, fmt, axis=axis, max_elements=max_elements)
    assert bits_equal(fake, api.fake_quantize(x, fmt, axis=axis)) and fake.is_contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_mode,rounding", [("mse", "even"), ("rceil", "away"), ("floor", "stochastic")])
def test_slabs_keep_dtype_scale_modes_and_roundings(dtype, scale_mode, rounding):
    x = torch.randn(48, 80).to(dtype).t()  # non-contiguous, as a transposed Conv1D weight is read
    kwargs = {"scale_mode": scale_mode, "rounding": rounding}
    whole, cut = api.quantize(x, "fp6_e2m3", **kwargs), slabs.quantize(x, "fp6_e2m3", max_elements=256, **kwargs)
    assert torch.equal(cut.codes, whole.codes) and torch.equal(cut.scales, whole.scales) and cut.dtype == dtype
    fake = slabs.fake_quantize(x, "fp6_e2m3", max_elements=256, **kwargs)
    assert bits_equal(fake, api.fake_quantize(x, "fp6_e2m3", **kwargs)) and fake.dtype == dtype


def test_slab_indices_cover_every_line_once():
    moved = torch.empty(3, 7, 10)
    seen = torch.zeros(3, 7, dtype=torch.int64)
    for index in slabs.slab_indices(moved, 25):
        assert moved[index].numel() <= 25
        seen[index] += 1
    assert bool((seen == 1).all())


@pytest.mark.parametrize("storage", ["packed", "simulated"])
def test_prepare_stores_the_same_weights_whatever_the_slab_size(storage, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.GELU(), torch.nn.Linear(160, 64)).eval()
    config = config_from_dict({"rule": [{"match": ".*", "weight": "fp4_e2m1", "activation": "fp8_e4m3",
                                         "weight_storage": storage}]})
    x = torch.randn(2, 96)
    monkeypatch.setattr(slabs, "SLAB_ELEMENTS", 1 << 30)
    whole = mxfx.prepare(model, config, (x,), dynamic_shapes=None)
    monkeypatch.setattr(slabs, "SLAB_ELEMENTS", 200)
    cut = mxfx.prepare(model, config, (x,), dynamic_shapes=None)
    buffers = dict(whole.named_buffers())
    assert buffers and buffers.keys() == dict(cut.named_buffers()).keys()
    for name, tensor in cut.named_buffers():
        assert bits_equal(tensor, buffers[name]), name
    assert bits_equal(cut(x), whole(x))


_PEAK_SCRIPT = textwrap.dedent("""
    import gc, json, torch, mxfx
    from mxfx.graph.config import config_from_dict

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    config = config_from_dict({"rule": [{"match": ".*", "weight": "fp4_e2m1"}]})
    small = torch.nn.Sequential(torch.nn.Linear(64, 64)).eval()
    mxfx.prepare(small, config, (torch.randn(2, 64),), dynamic_shapes=None)  # imports, first-call caches
    # ~100 MB of fp32 parameters; the head (8000x1024, 33 MB) is the largest weight
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 1024),
                                torch.nn.ReLU(), torch.nn.Linear(1024, 4096), torch.nn.ReLU(),
                                torch.nn.Linear(4096, 1024), torch.nn.Linear(1024, 8000)).eval()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    prepared = mxfx.prepare(model, config, (torch.randn(2, 1024),), dynamic_shapes=None)
    stored = sum(b.numel() * b.element_size() for b in prepared.buffers())
    print(json.dumps({"params": params, "stored": stored, "peak": status("VmHWM") - before}))
""")


@pytest.mark.slow
def test_prepare_peak_memory_stays_near_what_it_stores(tmp_path):
    # A fresh process, so that no other test's allocations blur the peak. Loose on purpose: RSS
    # on a shared machine is not exact (allocator slack, lazily built caches), and the regression
    # this guards against was an order larger (whole-tensor quantization: ~10x the largest weight,
    # here some 330 MB, with the parameters at 100 MB).
    try:
        open("/proc/self/clear_refs", "w").close()
    except OSError:
        pytest.skip("this system does not let a process reset its VmHWM (/proc/self/clear_refs)")
    run = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    overhead = result["peak"] - result["stored"]
    assert overhead <= 0.5 * result["params"], result
