"""Sensitivity: metric definitions against hand computations, the four modes, candidates, attention
sites, resume fingerprints, sharding over 2 gloo ranks, the plot, and the CLI command."""

import json
import math
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import mxfx
from mxfx.analysis.metrics import MetricAccumulator
from mxfx.analysis.sensitivity import SensitivityReport, parse_candidates
from mxfx.testing.models import MLP, FragileMLP, NanoGPT

TESTS = os.path.dirname(os.path.abspath(__file__))  # for subprocesses: model_zoo lives here

FORMATS = ["fp8_e4m3", "fp4_e2m1"]


def fragile():
    torch.manual_seed(0)
    return FragileMLP(), [torch.randn(32, 64) for _ in range(2)]


def tiny_mlp():
    torch.manual_seed(0)
    return MLP(d=32, hidden=32, out=8), [torch.randn(4, 32) for _ in range(2)]


def nano(flash=True):
    torch.manual_seed(0)
    return NanoGPT(n_layer=1, flash=flash), torch.randint(0, 256, (2, 16))


# --- metrics -----------------------------------------------------------------------------------


def test_metrics_match_hand_computation():
    torch.manual_seed(1)
    # two batches with different token counts: averages must weigh every token / row the same
    pairs = [(torch.randn(2, 3, 5), None), (torch.randn(1, 5), None)]
    pairs = [(r, r + 0.3 * torch.randn_like(r)) for r, _ in pairs]
    acc = MetricAccumulator(kl=True)
    for r, t in pairs:
        acc.add(r, t)
    got = acc.result()

    kls, cosines, signal, noise, count = [], [], 0.0, 0.0, 0
    for r, t in pairs:
        for ref_row, test_row in zip(r.reshape(-1, 5).tolist(), t.reshape(-1, 5).tolist()):
            zr, zt = sum(math.exp(v) for v in ref_row), sum(math.exp(v) for v in test_row)
            p = [math.exp(v) / zr for v in ref_row]
            q = [math.exp(v) / zt for v in test_row]
            kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
            dot = sum(a * b for a, b in zip(ref_row, test_row))
            cosines.append(dot / math.sqrt(sum(a * a for a in ref_row) * sum(b * b for b in test_row)))
            signal += sum(a * a for a in ref_row)
            noise += sum((a - b) ** 2 for a, b in zip(ref_row, test_row))
            count += 5
    assert len(kls) == 7
    assert got["kl"] == pytest.approx(sum(kls) / 7, rel=1e-6)
    assert got["cosine"] == pytest.approx(sum(cosines) / 7, rel=1e-6)
    assert got["mse"] == pytest.approx(noise / count, rel=1e-6)
    assert got["sqnr"] == pytest.approx(10 * math.log10(signal / noise), rel=1e-6)
    assert got["rel_error"] == pytest.approx(math.sqrt(noise / signal), rel=1e-6)
    # and the same per-token KL through torch's kl_div on the first batch alone
    one = MetricAccumulator(kl=True)
    one.add(*pairs[0])
    r, t = (x.reshape(-1, 5).double() for x in pairs[0])
    by_torch = F.kl_div(t.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="batchmean").item()
    assert one.result()["kl"] == pytest.approx(by_torch, rel=1e-6)


def test_metrics_not_computed_are_none_and_identical_is_exact():
    acc = MetricAccumulator(kl=False)
    x = torch.randn(3, 4)
    acc.add(x, x.clone())
    got = acc.result()
    assert got["kl"] is None and got["sqnr"] == math.inf and got["mse"] == 0.0 and got["cosine"] == 1.0
    assert MetricAccumulator().result() == dict.fromkeys(["sqnr", "mse", "cosine", "kl", "rel_error"])
    zeros = MetricAccumulator()
    zeros.add(torch.zeros(2, 4), torch.zeros(2, 4))
    assert zeros.result()["cosine"] == 1.0  # identical zero rows, not similarity 0


# --- modes -------------------------------------------------------------------------------------


def test_local_rows_match_a_hand_written_hook_and_kl_is_none():
    model, batches = tiny_mlp()
    seen = []
    handle = model.net[2].register_forward_hook(lambda m, args, out: seen.append((args[0].detach(), out.detach())))
    with torch.no_grad():
        for b in batches:
            model(b)
    handle.remove()
    report = mxfx.sensitivity(model, batches, candidates=[("fp4_e2m1", "fp8_e4m3")], mode="local", progress=None)
    row = next(r for r in report.rows if r["site"] == "net.2")
    w, bias = model.net[2].weight.detach(), model.net[2].bias.detach()
    wq = mxfx.fake_quantize(w, "fp4_e2m1")
    noise = sum((F.linear(mxfx.fake_quantize(x, "fp8_e4m3"), wq, bias) - y).double().square().sum().item() for x, y in seen)
    count = sum(y.numel() for _, y in seen)
    assert row["mse"] == pytest.approx(noise / count, rel=1e-5) and row["loss"] == row["mse"]
    assert row["kl"] is None and all(r["kl"] is None for r in report.rows)
    assert row["weight_numel"] == 32 * 32 and row["activation_numel"] == sum(x.numel() for x, _ in seen)
    assert (row["weight_format"], row["activation_format"], row["mode"]) == ("fp4_e2m1", "fp8_e4m3", "local")


def test_isolated_row_equals_evaluate_of_the_same_config():
    model, batches = tiny_mlp()
    report = mxfx.sensitivity(model, batches, ["fp4_e2m1"], mode="isolated", sites=["net.0"], progress=None)
    (row,) = report.rows
    config = mxfx.QuantConfig((mxfx.Rule(match=r"net\.0", weight=mxfx.MXSpec("fp4_e2m1"), activation=mxfx.MXSpec("fp4_e2m1")),))
    expected = mxfx.evaluate(model, batches, config)
    assert {k: row[k] for k in expected} == expected
    assert row["kl"] is not None and row["kl"] > 0 and row["loss"] == row["mse"]


@pytest.mark.parametrize("mode", ["local", "isolated", "gradient"])
def test_fragile_layer_comes_out_most_sensitive(mode):
    model, batches = fragile()
    report = mxfx.sensitivity(model, batches, FORMATS, mode=mode, progress=None)
    assert len(report.rows) == 4 * 2
    assert report.sorted_rows()[0]["site"] == "b"
    worst = max((r for r in report.rows if r["weight_format"] == "fp4_e2m1"), key=lambda r: r["loss"])
    assert worst["site"] == "b"


def test_all_but_one_lists_the_most_helpful_exclusion_first():
    model, batches = fragile()
    report = mxfx.sensitivity(model, batches, ["fp4_e2m1"], mode="all-but-one", progress=None)
    assert report.sorted_rows()[0]["site"] == "b"
    assert report.sorted_rows("sqnr")[0]["site"] == "b"  # leaving b out gives the best SQNR


def test_all_but_one_loss_is_the_marginal_damage():
    model, batches = tiny_mlp()
    report = mxfx.sensitivity(model, batches, ["fp4_e2m1"], mode="all-but-one", progress=None)
    spec = mxfx.MXSpec("fp4_e2m1")
    rule = lambda name: mxfx.Rule(match=name, weight=spec, activation=spec)  # noqa: E731
    everything = mxfx.evaluate(model, batches, mxfx.QuantConfig((rule(r"net\.\d"),)))["mse"]
    row = next(r for r in report.rows if r["site"] == "net.2")
    without = mxfx.evaluate(model, batches, mxfx.QuantConfig((rule(r"net\.[04]"),)))
    assert row["mse"] == without["mse"] and row["kl"] == without["kl"]
    assert row["loss"] == pytest.approx(everything - without["mse"], rel=1e-12)


def _spearman(a, b):
    ranks = lambda v: {k: i for i, k in enumerate(sorted(v, key=v.get))}  # noqa: E731
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((ra[k] - rb[k]) ** 2 for k in a) / (n * (n * n - 1))


def test_gradient_mode_agrees_with_isolated_on_a_small_transformer():
    model, idx = nano()
    cands = [("fp4_e2m1", "fp8_e4m3"), ("fp8_e4m3", "fp8_e4m3")]
    grad = mxfx.sensitivity(model, idx, candidates=cands, mode="gradient", progress=None)
    iso = mxfx.sensitivity(model, idx, candidates=cands, mode="isolated", progress=None)
    key = lambda r: (r["kind"], r["site"], r["weight_format"], r["activation_format"])  # noqa: E731
    g, i = {key(r): r["loss"] for r in grad.rows}, {key(r): r["loss"] for r in iso.rows}
    assert g.keys() == i.keys() and len(g) == 12
    assert _spearman(g, i) > 0.9
    assert [key(r) for r in grad.sorted_rows()[:3]] == [key(r) for r in iso.sorted_rows()[:3]]
    assert all(r["kl"] is None for r in grad.rows)


def test_gradient_score_with_a_loss_fn_matches_hand_computed_taylor_term():
    model, batches = tiny_mlp()
    loss_fn = lambda out, batch: out.square().sum()  # noqa: E731
    expected = 0.0
    for b in batches:
        store = {}

        def hook(module, args, out):
            store["x"] = args[0].detach()
            out.retain_grad()
            store["y"] = out

        handle = model.net[2].register_forward_hook(hook)
        loss_fn(model(b), (b,)).backward()
        handle.remove()
        w, bias = model.net[2].weight.detach(), model.net[2].bias.detach()
        yq = F.linear(mxfx.fake_quantize(store["x"], "fp6_e2m3"), mxfx.fake_quantize(w, "fp6_e2m3"), bias)
        expected += (store["y"].grad.double() ** 2 * (yq - store["y"].detach()).double() ** 2).sum().item()
    model.zero_grad()
    report = mxfx.sensitivity(model, batches, ["fp6_e2m3"], mode="gradient", loss_fn=loss_fn, sites=["net.2"], progress=None)
    assert report.rows[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were taken


# --- candidates, attention, ordering -----------------------------------------------------------


def test_equal_width_formats_and_deterministic_ties():
    model, batches = tiny_mlp()
    report = mxfx.sensitivity(model, batches, ["fp8_e4m3", "int8"], progress=None)
    assert {r["weight_format"] for r in report.rows} == {"fp8_e4m3", "int8"} and len(report.rows) == 6
    assert report.candidates == [("fp8_e4m3", "fp8_e4m3"), ("int8", "int8")]
    rows = [{"site": s, "kind": "linear", "weight_format": f, "activation_format": f, "loss": 1.0}
            for s in ("z", "a") for f in ("int8", "fp8_e4m3")]
    tied = SensitivityReport(rows, "local", "loss", [("int8", "int8"), ("fp8_e4m3", "fp8_e4m3")])
    assert [(r["site"], r["weight_format"]) for r in tied.sorted_rows()] == [("a", "int8"), ("a", "fp8_e4m3"), ("z", "int8"), ("z", "fp8_e4m3")]
    rows[0]["loss"] = None  # not computed: last, never treated as 0
    assert tied.sorted_rows()[-1] is rows[0]


def test_candidates_parse_and_validate():
    assert parse_candidates("fp4_e2m1:fp8_e4m3,fp8_e4m3,mxfp4:none") == [
        ("fp4_e2m1", "fp8_e4m3"), ("fp8_e4m3", "fp8_e4m3"), ("mxfp4", None)]
    model, batches = tiny_mlp()
    with pytest.raises(mxfx.MXValueError, match="not both"):
        mxfx.sensitivity(model, batches, ["int8"], candidates=[("int8", None)])
    with pytest.raises(mxfx.MXValueError, match="quantizes nothing"):
        mxfx.sensitivity(model, batches, candidates=[(None, None)])
    with pytest.raises(mxfx.MXValueError, match="twice"):
        mxfx.sensitivity(model, batches, candidates=[("int8", None), ("int8", None)])
    report = mxfx.sensitivity(model, batches, candidates=[("fp4_e2m1", None)], sites=["net.4"], progress=None)
    (row,) = report.rows
    assert row["activation_format"] is None and row["format"] == "fp4_e2m1:none"


def test_attention_rows_next_to_linears():
    model, idx = nano()
    cands = [("fp4_e2m1", "fp8_e4m3"), ("fp8_e4m3", None)]
    report = mxfx.sensitivity(model, idx, candidates=cands, mode="local", progress=None)
    attention = [r for r in report.rows if r["kind"] == "attention"]
    assert [r["site"] for r in attention] == ["transformer.h.0.attn"] * 2
    quantized, untouched = attention
    # Q, K, V (2 x 4 heads x 16 x 16 each) and P (2 x 4 x 16 x 16)
    assert quantized["activation_numel"] == 4 * 2 * 4 * 16 * 16 and quantized["weight_numel"] == 0
    assert 0 < quantized["loss"] and quantized["sqnr"] < math.inf
    assert untouched["loss"] == 0.0 and untouched["sqnr"] == math.inf  # nothing to quantize: exact
    linears = {r["site"] for r in report.rows if r["kind"] == "linear"}
    assert "transformer.h.0.attn.c_attn" in linears and "lm_head" in linears
    only = mxfx.sensitivity(model, idx, ["fp8_e4m3"], kinds=["attention"], progress=None)
    assert [r["kind"] for r in only.rows] == ["attention"]


def test_explicit_attention_is_recomputed_like_sdpa():
    # the same weights with nanoGPT's manual QK^T -> softmax -> PV path and with its SDPA path
    for mode in ("local", "gradient"):
        rows = []
        for flash in (True, False):
            model, idx = nano(flash=flash)
            report = mxfx.sensitivity(model, idx, ["fp4_e2m1"], kinds=["attention"], mode=mode, progress=None)
            assert report.unmeasured == [] and len(report.rows) == 1
            rows.append(report.rows[0])
        sdpa, explicit = rows
        assert explicit["activation_numel"] == sdpa["activation_numel"] == 4 * 2 * 4 * 16 * 16
        for key in ("loss", "mse", "sqnr"):
            assert explicit[key] == pytest.approx(sdpa[key], rel=1e-4)
        assert explicit["loss"] > 0


def test_unmeasured_sites_are_listed_in_the_table():
    report = SensitivityReport([], "local", candidates=[("int8", "int8")],
                               unmeasured=[{"site": "attn", "kind": "attention", "reason": "an einsum attention matmul"}])
    assert "not measured: attn (attention): an einsum attention matmul" in report.table()


# --- resume ------------------------------------------------------------------------------------


def test_resume_picks_up_an_interrupted_run_without_remeasuring(tmp_path):
    model, batches = fragile()
    path = tmp_path / "partial.json"
    seen = []

    def interrupt_after_three(done, total, elapsed, label):
        seen.append((done, total))
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mxfx.sensitivity(model, batches, FORMATS, mode="isolated", progress=interrupt_after_three, resume=path)
    assert seen[-1] == (3, 8) and len(json.loads(path.read_text())["rows"]) == 3
    calls = []
    full = mxfx.sensitivity(model, batches, FORMATS, mode="isolated", resume=path, progress=lambda *a: calls.append(a))
    assert len(full.rows) == 8 and len(calls) == 5 and calls[0][:2] == (4, 8) and calls[-1][:2] == (8, 8)
    again = []
    same = mxfx.sensitivity(model, batches, FORMATS, mode="isolated", resume=path, progress=lambda *a: again.append(a))
    assert again == [] and same.rows == full.rows
    fresh = mxfx.sensitivity(model, batches, FORMATS, mode="isolated", progress=None)
    assert full.rows == fresh.rows
    assert SensitivityReport.from_json(path.read_text()).rows == fresh.rows


@pytest.mark.parametrize("mode", ["local", "gradient", "all-but-one"])
def test_every_mode_resumes_after_an_interrupt_and_equals_an_uninterrupted_run(tmp_path, mode):
    """The unit of work is a batch in local/gradient modes and a (site, candidate) in the others; a
    run stopped after unit 2 resumes at unit 3 (nothing finished is measured again) and its report
    equals an uninterrupted run's, bit for bit."""
    model, batches = fragile()
    batches = list(batches) * 2 if mode != "all-but-one" else batches  # local/gradient: >= 3 batches
    path = tmp_path / f"{mode}.json"

    def interrupt_after_two(done, total, elapsed, label):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mxfx.sensitivity(model, batches, FORMATS, mode=mode, progress=interrupt_after_two, resume=path)
    calls = []
    resumed = mxfx.sensitivity(model, batches, FORMATS, mode=mode, resume=path, progress=lambda *a: calls.append(a))
    total = len(batches) if mode in ("local", "gradient") else 8
    assert [c[0] for c in calls] == list(range(3, total + 1)) and calls[0][1] == total
    fresh = mxfx.sensitivity(model, batches, FORMATS, mode=mode, progress=False)
    assert resumed.rows == fresh.rows
    assert not list(tmp_path.glob("*.batches*"))  # the per-batch state is gone once the run is done


def test_progress_takes_true_false_or_a_callable():
    model, batches = fragile()
    for progress in (True, False, None):
        assert mxfx.sensitivity(model, batches, ["fp8_e4m3"], mode="local", progress=progress).rows
    with pytest.raises(TypeError, match="progress"):
        mxfx.sensitivity(model, batches, ["fp8_e4m3"], mode="local", progress="yes")


def test_resume_refuses_a_changed_run(tmp_path):
    model, batches = tiny_mlp()
    path = tmp_path / "r.json"
    base = dict(mode="local", sites=["net.0", "net.2"], kinds=["linear"], block_size=32)
    mxfx.sensitivity(model, batches, ["int8"], progress=None, resume=path, **base)
    changes = {
        "mode": dict(base, mode="gradient"),
        "candidates": dict(base),
        "block_size": dict(base, block_size=16),
        "sites": dict(base, sites=["net.0"]),
        "kinds": dict(base, kinds=["linear", "attention"]),
    }
    for field, kwargs in changes.items():
        formats = ["fp8_e4m3"] if field == "candidates" else ["int8"]
        with pytest.raises(mxfx.MXValueError, match=f"differing: {field}"):
            mxfx.sensitivity(model, batches, formats, progress=None, resume=path, **kwargs)
    with pytest.raises(mxfx.MXValueError, match=r"batches \(contents\)"):
        mxfx.sensitivity(model, [b + 1 for b in batches], ["int8"], progress=None, resume=path, **base)
    with pytest.raises(mxfx.MXValueError, match=r"batches \(shapes"):
        mxfx.sensitivity(model, [b[:2] for b in batches], ["int8"], progress=None, resume=path, **base)
    saved = model.net[2].weight.detach().clone()
    with torch.no_grad():
        model.net[2].weight[0, 0] += 1.0
    with pytest.raises(mxfx.MXValueError, match="parameters .*'net.2.weight'"):
        mxfx.sensitivity(model, batches, ["int8"], progress=None, resume=path, **base)
    with torch.no_grad():
        model.net[2].weight.copy_(saved)
    # gradient mode: the loss_fn is part of the run
    grad_path = tmp_path / "g.json"
    mxfx.sensitivity(model, batches, ["int8"], mode="gradient", sites=["net.0"], progress=None, resume=grad_path)
    with pytest.raises(mxfx.MXValueError, match="differing: loss_fn"):
        mxfx.sensitivity(model, batches, ["int8"], mode="gradient", sites=["net.0"], progress=None, resume=grad_path,
                         loss_fn=lambda out, batch: out.sum())
    calls = []
    mxfx.sensitivity(model, batches, ["int8"], progress=lambda *a: calls.append(a), resume=path, **base)
    assert calls == []  # unchanged run: every row reused
    (tmp_path / "old.json").write_text(json.dumps({"rows": []}))
    with pytest.raises(mxfx.MXValueError, match="no run fingerprint"):
        mxfx.sensitivity(model, batches, ["int8"], progress=None, resume=tmp_path / "old.json", **base)


# --- sharding ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_RANKS_SCRIPT = """
import os, sys, torch, mxfx
from mxfx.testing.models import MLP
torch.manual_seed(0)
model, batches = MLP(d=32, hidden=32, out=8), [torch.randn(4, 32) for _ in range(2)]
for mode in ("isolated", "gradient"):
    calls = []
    report = mxfx.sensitivity(model, batches, ["fp8_e4m3", "fp4_e2m1"], mode=mode, progress=lambda *a: calls.append(a),
                              resume=os.path.join(sys.argv[1], mode + ".json"))
    with open(os.path.join(sys.argv[1], f"{mode}.rank{os.environ['RANK']}.out"), "w") as f:
        f.write(report.to_json())
    with open(os.path.join(sys.argv[1], f"{mode}.rank{os.environ['RANK']}.measured"), "w") as f:
        f.write(str(len(calls)))
"""


@pytest.mark.slow
def test_two_torchrun_ranks_give_the_single_process_report(tmp_path):
    # torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT): sensitivity initializes gloo itself
    (tmp_path / "ranks.py").write_text(_RANKS_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")])}  # model_zoo
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                             "--master-port", str(_free_port()), str(tmp_path / "ranks.py"), str(tmp_path)],
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    torch.manual_seed(0)
    model, batches = MLP(d=32, hidden=32, out=8), [torch.randn(4, 32) for _ in range(2)]
    for mode in ("isolated", "gradient"):
        single = mxfx.sensitivity(model, batches, ["fp8_e4m3", "fp4_e2m1"], mode=mode, progress=None)
        for rank in (0, 1):
            sharded = SensitivityReport.from_json((tmp_path / f"{mode}.rank{rank}.out").read_text())
            assert sharded.rows == single.rows  # same rows, same order, on every rank
            # isolated: half of 3 sites x 2 candidates; gradient's unit of work is a batch (2 batches, each rank its rows)
            assert (tmp_path / f"{mode}.rank{rank}.measured").read_text() == ("3" if mode == "isolated" else "2")
        assert SensitivityReport.from_json((tmp_path / f"{mode}.json").read_text()).rows == single.rows
    assert not list(tmp_path.glob("*.json.rank*"))  # partial files merged and removed


# --- output ------------------------------------------------------------------------------------


def test_reports_are_deterministic_and_round_trip():
    model, batches = tiny_mlp()
    a = mxfx.sensitivity(model, batches, FORMATS, progress=None)
    b = mxfx.sensitivity(model, batches, FORMATS, progress=None)
    assert a.to_json() == b.to_json()
    again = SensitivityReport.from_json(a.to_json())
    assert again.rows == a.rows and again.table() == a.table() and again.candidates == a.candidates
    assert a.to_markdown().startswith("| site") and a.to_csv().startswith("site,kind,weight_format")
    assert " - " in a.table() or "-\n" in a.table()  # kl shown as "-"
    assert a.value("net.0", "fp8_e4m3", "mse") == a.rows[0]["mse"]


def test_plot_uses_no_global_matplotlib_state(tmp_path, monkeypatch):
    matplotlib = pytest.importorskip("matplotlib")
    before = matplotlib.get_backend()
    monkeypatch.setattr(matplotlib, "use", lambda *a, **k: pytest.fail("plot switched the matplotlib backend"))
    model, idx = nano()
    report = mxfx.sensitivity(model, idx, candidates=[("fp4_e2m1", "fp8_e4m3"), ("fp8_e4m3", None)], progress=None)
    path = report.plot(tmp_path / "heat.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
    assert matplotlib.get_backend() == before


def test_bad_arguments():
    model, batches = tiny_mlp()
    with pytest.raises(mxfx.MXValueError, match="local, isolated, all-but-one, gradient"):
        mxfx.sensitivity(model, batches, mode="global")
    with pytest.raises(mxfx.FormatError):
        mxfx.sensitivity(model, batches, ["fp7"])
    with pytest.raises(mxfx.MXValueError, match="no measurable site named \\['nope'\\]"):
        mxfx.sensitivity(model, batches, sites=["nope"])
    with pytest.raises(mxfx.MXValueError, match="kinds"):
        mxfx.sensitivity(model, batches, kinds=["conv"])
    with pytest.raises(mxfx.MXValueError, match="gradient"):
        mxfx.sensitivity(model, batches, loss_fn=lambda o, b: o.sum())
    with pytest.raises(mxfx.MXValueError, match="no linear or attention sites"):
        mxfx.sensitivity(torch.nn.ReLU(), batches)


@pytest.mark.slow
def test_cli_sensitivity_gradient(tmp_path):
    (tmp_path / "fragile_models.py").write_text(textwrap.dedent("""
        import torch
        from mxfx.testing.models import FragileMLP
        def fragile():
            torch.manual_seed(0)
            return FragileMLP(), (torch.randn(32, 64),)
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), TESTS])}  # the factory, model_zoo
    run = lambda *a: subprocess.run([sys.executable, "-m", "mxfx", *a], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)  # noqa: E731
    result = run("sensitivity", "fragile_models:fragile", "--mode", "gradient", "--candidates",
                 "fp4_e2m1,fp8_e4m3:none", "--out", "r.json", "--md")
    assert result.returncode == 0, result.stderr
    # gradient mode's unit of work is a batch: one batch here
    assert result.stdout.splitlines()[2].startswith("| b ") and "mxfx: 1/1 batch 1/1" in result.stderr
    report = SensitivityReport.from_json((tmp_path / "r.json").read_text())
    assert report.mode == "gradient" and report.candidates == [("fp4_e2m1", "fp4_e2m1"), ("fp8_e4m3", None)]
    result = run("sensitivity", "fragile_models:fragile", "--mode", "local", "--formats", "int8", "--out", "r.json")
    assert result.returncode == 1 and "differing: mode" in result.stderr


@pytest.mark.slow
def test_gradient_loss_fn_sees_a_hugging_face_output():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    idx = torch.randint(0, 128, (1, 16))
    seen = []

    def loss_fn(output, batch):
        seen.append(type(output).__name__)
        return F.cross_entropy(output.logits[0, :-1], batch[0][0, 1:])

    report = mxfx.sensitivity(model, idx, ["fp4_e2m1"], mode="gradient", loss_fn=loss_fn, progress=None)
    assert seen == ["CausalLMOutputWithPast"]
    assert {r["kind"] for r in report.rows} == {"linear", "attention"} and len(report.rows) == 9
    assert all(r["loss"] > 0 for r in report.rows)


class EinsumAttention(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, 16)).permute(2, 0, 3, 1, 4)
        scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / 4.0
        return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)


def _every_attention_form():
    from mxfx.testing import zoo as zoo_models

    torch.manual_seed(0)
    bloom, args, _ = zoo_models.bloom()  # baddbmm + bmm
    return {
        "sdpa": (NanoGPT(n_layer=1), [torch.randint(0, 256, (2, 16))]),
        "matmul": (NanoGPT(n_layer=1, flash=False), [torch.randint(0, 256, (2, 16))]),
        "einsum": (EinsumAttention(), [torch.randn(2, 8, 32)]),
        "baddbmm": (bloom, [args]),
    }


@pytest.mark.slow
@pytest.mark.parametrize("form", ["sdpa", "matmul", "einsum", "baddbmm"])
def test_isolated_rows_equal_evaluate_of_each_site_alone(form):
    # Issue #15: isolated mode switches sites inside one copy of the graph instead of preparing a
    # module per measurement; each row must still be what prepare + evaluate give for that site
    # alone, bit for bit, for every linear and every attention form.
    model, batches = _every_attention_form()[form]
    model.eval()
    candidate = ("fp4_e2m1", "fp6_e2m3")
    report = mxfx.sensitivity(model, batches, candidates=[candidate], mode="isolated", progress=None)
    kinds = {row["kind"] for row in report.rows}
    assert kinds == {"linear", "attention"}, kinds
    for row in report.rows:
        name = row["site"].replace(".", r"\.")
        if row["kind"] == "linear":
            rule = mxfx.Rule(match=name, weight=mxfx.MXSpec(candidate[0]), activation=mxfx.MXSpec(candidate[1]))
        else:
            spec = mxfx.MXSpec(candidate[1])
            rule = mxfx.Rule(match=name, attention=mxfx.AttentionSpec(spec, spec, spec, spec))
        expected = mxfx.evaluate(model, batches, mxfx.QuantConfig((rule,)))
        assert {k: row[k] for k in expected} == expected, (row["site"], row["kind"])
