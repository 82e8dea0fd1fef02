"""GPTQ resume (`mxfx.prepare(..., gptq_resume=dir)`, mxfx/recovery/gptq_resume.py): each site's
result is saved as it is computed; a later prepare with the same directory loads the saved sites,
computes only the others (bitwise the same model as an uninterrupted run), skips calibration when
every site is saved, and refuses a directory written by another run.

Which sites were computed is counted by wrapping the `gptq_quantize` name each pass module calls.
"""

from __future__ import annotations

import logging

import pytest
import torch
from mxfx.passes import gptq_experts, gptq_weights

import mxfx
from mxfx.graph.config import MXSpec, QuantConfig, Rule
from mxfx.testing.models import MLP

SPEC = MXSpec("fp4_e2m1")
CONFIG = QuantConfig((Rule(".*", weight=SPEC, weight_rounding="gptq"),))


def _mlp() -> tuple[torch.nn.Module, list[torch.Tensor]]:
    """Three GPTQ sites: net.0 (64, 64), net.2 (64, 64), net.4 (32, 64)."""
    g = torch.Generator().manual_seed(0)
    model = MLP(64, 64, 32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / 8)
    return model, [torch.randn(16, 64, generator=g) for _ in range(2)]


def _prepare(model, batches, config=CONFIG, **kwargs) -> torch.fx.GraphModule:
    return mxfx.prepare(model, config, (batches[0],), calibration=batches, **kwargs)


def _count_calls(monkeypatch, module) -> list[tuple[int, ...]]:
    """The weight shapes `module`'s gptq_quantize is called with, from now on."""
    calls, real = [], module.gptq_quantize

    def counted(weight, hessian, spec, *args, **kwargs):
        calls.append(tuple(weight.shape))
        return real(weight, hessian, spec, *args, **kwargs)

    monkeypatch.setattr(module, "gptq_quantize", counted)
    return calls


def _stop_after(sites: int):
    """A progress callback that interrupts the run after `sites` GPTQ sites (calibration batches do not count)."""
    finished = []

    def callback(done, total, elapsed, label):
        if not label.startswith("batch"):
            finished.append(label)
            if len(finished) == sites:
                raise KeyboardInterrupt

    return callback


def _outputs_equal(a, b, batches) -> bool:
    with torch.no_grad():
        return all(torch.equal(a(x), b(x)) for x in batches)


def test_an_interrupted_run_resumed_computes_only_the_remaining_sites(tmp_path, monkeypatch, caplog):
    model, batches = _mlp()
    reference = _prepare(model, batches, progress=False)
    resume = tmp_path / "gptq"
    with pytest.raises(KeyboardInterrupt):
        _prepare(model, batches, progress=_stop_after(2), gptq_resume=resume)
    assert len(list(resume.glob("*.pt"))) == 2  # net.0 and net.2, saved before the interrupt
    calls = _count_calls(monkeypatch, gptq_weights)
    with caplog.at_level(logging.INFO, logger="mxfx.passes.gptq_weights"):
        resumed = _prepare(model, batches, progress=False, gptq_resume=resume)
    assert calls == [(32, 64)]  # only net.4
    assert "2 of 3 sites resumed" in caplog.text
    assert resumed.mxfx_report.rewrites["GPTQWeightsPass"] == 3
    assert _outputs_equal(resumed, reference, batches)


def test_a_complete_directory_skips_gptq_and_calibration(tmp_path, monkeypatch):
    model, batches = _mlp()
    resume = tmp_path / "gptq"
    first = _prepare(model, batches, progress=False, gptq_resume=resume)
    calls = _count_calls(monkeypatch, gptq_weights)
    monkeypatch.setattr(gptq_weights._Recorder, "run_batch", lambda self, inputs: pytest.fail("calibration ran"))
    again = _prepare(model, batches, progress=False, gptq_resume=resume)
    assert calls == []
    assert _outputs_equal(again, first, batches)


@pytest.mark.parametrize("change, differs", [
    ("batches", "the calibration batches"),
    ("weights", "the model's parameters and buffers"),
    ("spec", "the weight's MXSpec"),
])
def test_a_directory_of_another_run_is_refused(tmp_path, change, differs):
    model, batches = _mlp()
    resume = tmp_path / "gptq"
    _prepare(model, batches, progress=False, gptq_resume=resume)
    config = CONFIG
    if change == "batches":
        batches = [b + 1 for b in batches]
    elif change == "weights":
        with torch.no_grad():
            model.net[2].weight[0, 0] += 1
    else:
        config = QuantConfig((Rule(".*", weight=MXSpec("fp4_e2m1", scale_mode="mse"), weight_rounding="gptq"),))
    with pytest.raises(mxfx.ResumeError, match=r"site net\.0: differing " + differs) as error:
        _prepare(model, batches, config, progress=False, gptq_resume=resume)
    assert str(resume) in str(error.value) and "Delete the file" in str(error.value)


def test_a_saved_site_whose_hessian_differs_is_refused(tmp_path):
    """Same batches and weights, but the saved Hessian digest is not this run's (e.g. a reduction
    in another order): once calibration runs, the saved site is refused by its Hessian."""
    model, batches = _mlp()
    resume = tmp_path / "gptq"
    _prepare(model, batches, progress=False, gptq_resume=resume)
    (net0,) = resume.glob("net.0-*.pt")
    saved = torch.load(net0, weights_only=True)
    saved["site"]["hessian"] = "0" * 16
    torch.save(saved, net0)
    next(resume.glob("net.4-*.pt")).unlink()  # a site left to compute: calibration runs
    with pytest.raises(mxfx.ResumeError, match=r"site net\.0: differing the Hessian"):
        _prepare(model, batches, progress=False, gptq_resume=resume)


def test_a_file_as_the_resume_path_is_refused(tmp_path):
    model, batches = _mlp()
    path = tmp_path / "gptq.pt"
    path.write_bytes(b"")
    with pytest.raises(mxfx.ResumeError, match="names a directory"):
        _prepare(model, batches, progress=False, gptq_resume=path)


class TwoExpertSites(torch.nn.Module):
    """Two stacked expert parameters batched against x.view(E, -1, in) (Llama 4's form): two expert sites."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(4, 64, 96, generator=g) / 8)
        self.w2 = torch.nn.Parameter(torch.randn(4, 96, 64, generator=g) / 8)

    def forward(self, x):
        h = torch.relu(torch.bmm(x.view(4, -1, 64), self.w1))
        return torch.bmm(h, self.w2).view(-1, 64)


def test_expert_sites_resume_per_site(tmp_path, monkeypatch):
    model = TwoExpertSites()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4 * 6, 64, generator=g),) for _ in range(2)]
    config = QuantConfig((Rule(".*", weight=MXSpec("fp8_e4m3"), weight_storage="simulated", weight_rounding="gptq"),))

    def prepare(**kwargs):
        return mxfx.prepare(model, config, batches[0], calibration=batches, dynamic_shapes=None, **kwargs)

    reference = prepare(progress=False)
    assert reference.mxfx_report.rewrites["GPTQExpertsPass"] == 2
    resume = tmp_path / "gptq"
    with pytest.raises(KeyboardInterrupt):
        prepare(progress=_stop_after(1), gptq_resume=resume)
    calls = _count_calls(monkeypatch, gptq_experts)
    resumed = prepare(progress=False, gptq_resume=resume)
    assert calls == [(64, 96)] * 4  # the 4 experts of w2 only
    with torch.no_grad():
        assert all(torch.equal(resumed(*b), reference(*b)) for b in batches)
    calls.clear()
    prepare(progress=False, gptq_resume=resume)
    assert calls == []
