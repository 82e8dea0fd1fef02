"""Sensitivity reports (local / isolated / all-but-one), resume, search, and their CLI commands."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import mxfx
from mxfx.model_zoo import FragileMLP

FORMATS = ["fp8_e4m3", "fp6_e2m3", "fp4_e2m1"]


def fixture():
    torch.manual_seed(0)
    return FragileMLP(), [torch.randn(32, 64) for _ in range(2)]


@pytest.mark.parametrize("mode", ["local", "isolated"])
def test_fragile_layer_comes_out_most_sensitive(mode):
    model, batches = fixture()
    report = mxfx.sensitivity(model, batches, FORMATS, mode=mode, progress=None)
    assert len(report.rows) == 4 * 3
    assert report.sorted_rows()[0]["site"] == "b"
    # per format, b is the worst site
    for fmt in FORMATS[1:]:
        worst = min((r for r in report.rows if r["format"] == fmt), key=lambda r: r["sqnr"])
        assert worst["site"] == "b"
    assert set(report.rows[0]) >= {"sqnr", "mse", "cosine", "kl", "rel_error"}


def test_all_but_one_lists_the_most_helpful_exclusion_first():
    model, batches = fixture()
    report = mxfx.sensitivity(model, batches, ["fp4_e2m1"], mode="all-but-one", progress=None)
    assert report.sorted_rows()[0]["site"] == "b"  # leaving b out helps most


def test_reports_are_deterministic_and_round_trip():
    model, batches = fixture()
    a = mxfx.sensitivity(model, batches, FORMATS, progress=None)
    b = mxfx.sensitivity(model, batches, FORMATS, progress=None)
    assert a.to_json() == b.to_json()
    again = mxfx.SensitivityReport.from_json(a.to_json())
    assert again.rows == a.rows and again.table() == a.table()
    assert a.to_markdown().startswith("| site") and a.to_csv().startswith("site,format")


def test_progress_interrupt_and_resume(tmp_path):
    model, batches = fixture()
    path = tmp_path / "partial.json"
    seen = []

    def interrupt_after_five(done, total, elapsed, label):
        seen.append((done, total))
        if done == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mxfx.sensitivity(model, batches, FORMATS, mode="isolated", progress=interrupt_after_five, resume=path)
    assert seen[-1] == (5, 12) and len(json.loads(path.read_text())["rows"]) == 5
    calls = []
    full = mxfx.sensitivity(model, batches, FORMATS, mode="isolated", resume=path,
                            progress=lambda done, total, elapsed, label: calls.append(elapsed))
    assert len(full.rows) == 12 and len(calls) == 12
    fresh = mxfx.sensitivity(model, batches, FORMATS, mode="isolated", progress=None)
    assert full.rows == fresh.rows


def test_search_meets_budget_and_beats_uniform(tmp_path):
    model, batches = fixture()
    config, result = mxfx.search(model, batches, FORMATS, budget_bits=6.25, toml_path=tmp_path / "mixed.toml", progress=None)
    assert result.average_bits <= 6.25
    assert result.assignment["b"] == ("fp8_e4m3", "fp8_e4m3")  # the fragile layer keeps the widest format
    uniform = mxfx.QuantConfig((mxfx.Rule(match=".*", weight=mxfx.MXSpec("fp6_e2m3"), activation=mxfx.MXSpec("fp6_e2m3")),))
    assert result.measured["mse"] < mxfx.evaluate(model, batches, uniform)["mse"]
    loaded = mxfx.load_config(tmp_path / "mixed.toml")
    prepared = mxfx.prepare(model, loaded, (batches[0],))
    assert len([s for s in prepared.mxfx_report.sites if s.rule is not None]) == 4
    with pytest.raises(mxfx.MXValueError, match="below the narrowest"):
        mxfx.search(model, batches, FORMATS, budget_bits=3.0, progress=None)


def test_bad_arguments():
    model, batches = fixture()
    with pytest.raises(mxfx.MXValueError, match="local, isolated, all-but-one"):
        mxfx.sensitivity(model, batches, mode="global")
    with pytest.raises(mxfx.FormatError):
        mxfx.sensitivity(model, batches, ["fp7"])
    with pytest.raises(mxfx.MXValueError, match="no linear sites"):
        mxfx.sensitivity(model, batches, sites=["nope"])


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    model, batches = fixture()
    path = mxfx.sensitivity(model, batches, FORMATS, progress=None).plot(tmp_path / "heat.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_cli_sensitivity_and_search(tmp_path):
    (tmp_path / "fragile_models.py").write_text(textwrap.dedent("""
        import torch
        from mxfx.model_zoo import FragileMLP
        def fragile():
            torch.manual_seed(0)
            return FragileMLP(), (torch.randn(32, 64),)
    """))
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "mxfx", *a], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)  # noqa: E731
    result = run("sensitivity", "fragile_models:fragile", "--formats", "fp8_e4m3,fp4_e2m1", "--out", "r.json", "--md")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[2].startswith("| b ") and "8/8" in result.stderr
    result = run("search", "fragile_models:fragile", "--budget-bits", "6.25", "--out", "mixed.toml")
    assert result.returncode == 0, result.stderr
    assert "b: fp8_e4m3" in result.stdout and (tmp_path / "mixed.toml").is_file()
