"""Not-significant differences marked in search fronts and sensitivity reports (issue #17).

Planted cases: `Planted` feeds a linear inputs that sit exactly on MXFP8 E4M3 rounding midpoints
(ties), so a 1-ulp jitter flips about half of their roundings and the noise floor is large, while
its second site `b` has weights 1e-3 times smaller, so its effect on the output is far below that
floor. `OnGrid` feeds every quantizer values already on the E4M3 grid (no near ties): its floor
is exactly 0. Expected marks are computed here from the recorded run lists, not read from the
code under test.
"""

import math

import pytest
import torch

import mxfx
from mxfx.analysis.noise import NoiseFloor
from mxfx.analysis.search import Front, FrontPoint, SearchResult
from mxfx.analysis.sensitivity import SensitivityReport

FP8, FP4 = ("fp8_e4m3", "fp8_e4m3"), ("fp4_e2m1", "fp8_e4m3")
CANDIDATES = [FP8, FP4]
METRICS = ("sqnr", "mse", "cosine", "kl", "rel_error")


class Planted(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(64, 64, bias=False)
        self.b = torch.nn.Linear(64, 64, bias=False)
        with torch.no_grad():
            self.b.weight.mul_(1e-3)

    def forward(self, x):
        return self.a(x) + self.b(x)


def midpoints(rows: int = 16) -> torch.Tensor:
    """E4M3 rounding midpoints 1 + (2k+1)/16 in [1, 2) (ties between two grid points), each 32-block's
    first element 1.875 (on the grid, the block maximum: the shared scale never moves)."""
    generator = torch.Generator().manual_seed(0)
    k = torch.randint(0, 7, (rows, 64), generator=generator)
    sign = torch.where(torch.rand(rows, 64, generator=generator) < 0.5, -1.0, 1.0)
    x = (1 + (2 * k + 1) / 16.0) * sign
    x[:, ::32] = 1.875
    return x


class OnGrid(torch.nn.Module):
    """Two sites, each reading a model input directly: inputs on the E4M3 grid never tie."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a = torch.nn.Linear(64, 32, bias=False)
        self.b = torch.nn.Linear(64, 32, bias=False)

    def forward(self, x1, x2):
        return self.a(x1) + self.b(x2)


def on_grid(shape, seed):
    """Values on the E4M3 grid, none a power of two (a 1-ulp step down never crosses a binade)."""
    generator = torch.Generator().manual_seed(seed)
    mantissa = torch.tensor([1.125, 1.25, 1.375, 1.5, 1.625, 1.75])
    m = mantissa[torch.randint(0, 6, shape, generator=generator)]
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    return sign * m * torch.exp2(torch.randint(-3, 1, shape, generator=generator).float())


def planted_report(sites=("a", "b")) -> SensitivityReport:
    """Losses that make the solver keep `a` in E4M3 and give `b` E2M1 weights (a tie: fewest bits)."""
    rows = [{"site": s, "kind": "linear", "weight_format": c[0], "activation_format": c[1], "weight_numel": 4096,
             "loss": 1.0 if (s == "a" and c == FP4) else 0.0} for s in sites for c in CANDIDATES]
    return SensitivityReport(rows, "isolated", candidates=CANDIDATES)


def hand_spread(noise: NoiseFloor, metric: str) -> float:
    values = [noise.metrics[metric], *(run[metric] for _, run in noise.runs)]
    return max(values) - min(values)


def cells(table: str) -> dict[str, dict[str, str]]:
    """A github-format table as {first cell: {header: cell}}."""
    lines = [[c.strip() for c in line.split("|")[1:-1]] for line in table.splitlines() if line.startswith("| ")]
    return {row[0]: dict(zip(lines[0], row)) for row in lines[1:]}


def capture_figure(monkeypatch):
    """The Figure a plot method saves (its axes are inspected instead of the pixels)."""
    from matplotlib.figure import Figure

    saved = []
    original = Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda self, *a, **k: (saved.append(self), original(self, *a, **k))[1])
    return saved


# --- the front table, on hand-made points (rendering rules only) -----------------------------------------


def _point(label, source, bits, runs, budget=None) -> FrontPoint:
    noise = None if runs is None else NoiseFloor({"mse": runs[0]}, tuple((f"jitter seed {i}", {"mse": v})
                                                                         for i, v in enumerate(runs[1:])))
    result = SearchResult({}, bits, None, {"loss": 0.0}, {"mse": runs[0] if runs else 0.0}, "", budget_bits=budget,
                          spread=None if noise is None else noise.spreads, noise=noise)
    value = runs[0] if runs else 0.0
    return FrontPoint(label, source, bits, None, value, result, None, spread=None if noise is None else noise.spread("mse"))


def test_front_table_marks_points_within_the_larger_spread_of_their_reference():
    points = [
        _point("uniform fp4", "uniform", 4.25, [1.00, 1.02, 0.99]),  # spread 0.03
        _point("uniform fp8", "uniform", 8.25, [0.50, 0.50]),  # spread 0
        _point("search A", "search", 6.0, [1.01, 1.00], budget=6.25),  # ref fp4; |0.01| <= max(0.01, 0.03): ~
        _point("search B", "search", 6.25, [0.90, 0.90], budget=6.25),  # ref fp4; |0.10| > 0.03
        _point("search C", "search", 8.0, [0.52, 0.525], budget=8.25),  # ref fp8 (best <= 8.25); |0.02| > 0.005
        _point("search D", "search", 8.1, [0.51, 0.53], budget=8.25),  # ref fp8; |0.01| <= max(0.02, 0): ~ (own spread)
    ]
    front = Front(points, "mse", higher_is_better=False, noise=1, noise_sources=("jitter",))
    rows = cells(front.table())
    expected = {"search A": ("1.01~", "uniform fp4"), "search B": ("0.9", "uniform fp4"),
                "search C": ("0.52", "uniform fp8"), "search D": ("0.51~", "uniform fp8"),
                "uniform fp4": ("1", "-"), "uniform fp8": ("0.5", "-")}
    for label, (value, reference) in expected.items():
        assert (rows[label]["mse"], rows[label]["reference"]) == (value, reference), label
    assert rows["uniform fp4"]["spread"] == "0.03"
    assert [front.significant(p) for p in points] == [None, None, False, True, True, False]


def test_front_table_without_noise_makes_no_claim():
    points = [_point("uniform fp4", "uniform", 4.25, None), _point("search A", "search", 6.0, None, budget=6.25)]
    text = Front(points, "mse", higher_is_better=False).table()
    assert "~" not in text and "spread not measured" in text and "reference" not in text
    assert Front(points, "mse", False).significant(points[1]) is None


# --- search(noise=N) end to end ---------------------------------------------------------------------------


def test_search_marks_a_planted_insignificant_difference(monkeypatch, tmp_path):
    model, x = Planted(), midpoints()
    front = mxfx.search(model, x, candidates=CANDIDATES, budgets=[6.25, 8.25], report=planted_report(), noise=3,
                        progress=None)
    by_label = {p.label: p for p in front.points}
    for p in front.points:  # spreads are the runs' range, by hand
        assert p.spread == hand_spread(p.result.noise, "mse") == p.result.spread["mse"]
        assert [label for label, _ in p.result.noise.runs] == ["jitter seed 0", "jitter seed 1", "jitter seed 2",
                                                               "batch split"]
    u8, u4 = by_label["uniform fp8_e4m3"], by_label["uniform fp4_e2m1:fp8_e4m3"]
    s6, s8 = by_label["search 6.25"], by_label["search 8.25"]
    # both searched configs: a in E4M3, b with E2M1 weights; they differ from uniform E4M3 only by b
    assert s8.result.assignment == s6.result.assignment == {"a": FP8, "b": FP4}
    assert s8.value != u8.value and s8.spread > 0
    assert abs(s8.value - u8.value) <= max(s8.spread, u8.spread)  # the planted insignificant difference
    assert abs(s6.value - u4.value) > max(s6.spread, u4.spread)  # 6.25 bits: the reference is uniform E2M1
    table = front.table()
    rows = cells(table)
    assert rows["search 8.25"]["mse"] == f"{s8.value:.6g}~" and rows["search 8.25"]["reference"] == "uniform fp8_e4m3"
    assert rows["search 6.25"]["mse"] == f"{s6.value:.6g}" and rows["search 6.25"]["reference"] == u4.label
    assert table.count("~") == 2  # the one mark and the legend line
    assert "over the unperturbed run + 3 jitter(s) + batch split (mxfx.noise)" in table
    # the plot: error bars from each point's runs, the insignificant point hollow
    pytest.importorskip("matplotlib")
    saved = capture_figure(monkeypatch)
    front.plot(tmp_path / "front.png")
    ax = saved[-1].axes[0]
    hollow = [c for c in ax.collections if "not significant" in (c.get_label() or "")]
    assert len(hollow) == 1 and hollow[0].get_offsets().tolist() == [[s8.weight_bits, s8.value]]
    assert len(hollow[0].get_facecolors()) == 0  # facecolors="none"
    filled = [c for c in ax.collections if "beyond the spread" in (c.get_label() or "")]
    assert filled and filled[0].get_offsets().tolist() == [[s6.weight_bits, s6.value]]


def test_search_without_near_ties_has_zero_spread_and_no_marks():
    x1, x2 = on_grid((8, 64), 0), on_grid((8, 64), 1)
    front = mxfx.search(OnGrid(), (x1, x2), candidates=CANDIDATES, budgets=[6.25], report=planted_report(), noise=2,
                        progress=None)
    assert all(p.spread == 0.0 for p in front.points)
    assert all(p.result.spread == dict.fromkeys(METRICS, 0.0) for p in front.points)
    assert front.table().count("~") == 1  # the legend line only
    _, result = mxfx.search(OnGrid(), (x1, x2), candidates=CANDIDATES, budget_bits=6.25, report=planted_report(),
                            noise=1, progress=None)
    assert result.spread == dict.fromkeys(METRICS, 0.0)
    _, result = mxfx.search(OnGrid(), (x1, x2), candidates=CANDIDATES, budget_bits=6.25, report=planted_report(),
                            progress=None)
    assert result.spread is None and result.noise is None


def test_search_with_eval_fn_jitters_and_says_why_there_is_no_split():
    model, x = Planted(), midpoints()
    calls = []

    def eval_fn(prepared):
        calls.append(prepared)
        with torch.no_grad():
            return float((prepared(x) - model(x)).square().mean())

    _, result = mxfx.search(model, x, candidates=CANDIDATES, budget_bits=8.25, report=planted_report(), eval_fn=eval_fn,
                            noise=2, progress=None)
    front = Front([FrontPoint("uniform", "uniform", 8.25, None, result.measured["eval"], result, None,
                              spread=result.spread["eval"])], "eval", False, noise=2, noise_sources=("jitter", "split"))
    assert "(split skipped: the evaluation function runs its own inputs" in front.table()
    assert len(calls) == 3 and result.noise.skipped == (("split", "the evaluation function runs its own inputs: "
                                                                  "no batch to split"),)
    assert result.spread["eval"] == hand_spread(result.noise, "eval") > 0


# --- sensitivity(noise=N) -----------------------------------------------------------------------------------


def test_sensitivity_marks_rows_within_the_floor_of_no_change(monkeypatch, tmp_path):
    model, x = Planted(), midpoints()
    report = mxfx.sensitivity(model, x, candidates=CANDIDATES, mode="isolated", noise=3, progress=None)
    assert report.noise["runs"] == 3 and report.noise["floor"] is not None
    for candidate in CANDIDATES:  # the loss floor is the all-quantized model's MSE spread, from its runs
        label = candidate[0] if candidate[0] == candidate[1] else f"{candidate[0]}:{candidate[1]}"
        runs = NoiseFloor.from_dict(report.noise["measurements"][label])
        assert report.floor(candidate)["loss"] == hand_spread(runs, "mse") > 0
        assert report.floor(candidate)["sqnr"] == hand_spread(runs, "sqnr")
        # ... of the model with *every* site quantized: the same perturbations through mxfx.evaluate
        rule = mxfx.graph.config.Rule(match=".*", weight=mxfx.MXSpec(candidate[0]), activation=mxfx.MXSpec(candidate[1]))
        everything = mxfx.evaluate(model, x, mxfx.QuantConfig((rule,)), noise=3)
        assert report.floor(candidate)["loss"] == everything["spread"]["mse"]
    marks = {}
    for row in report.rows:
        floor = report.floor((row["weight_format"], row["activation_format"]))["loss"]
        marks[row["site"], row["weight_format"]] = abs(row["loss"]) <= floor
    assert marks == {("a", "fp8_e4m3"): False, ("a", "fp4_e2m1"): False, ("b", "fp8_e4m3"): True, ("b", "fp4_e2m1"): True}
    table = report.table()
    for line in table.splitlines()[2:6]:
        site, _, weight = line.split()[:3]
        assert (line.count("~") == 6) == marks[site, weight], line  # every metric of a marked row
        assert line.count("~") in (0, 6)
    assert "noise floor (3 jitter(s) + batch split;" in table and "~" in report.to_markdown()
    csv_rows = [line.split(",") for line in report.to_csv().splitlines()]
    assert csv_rows[0][-1] == "within_floor"
    assert {(r[0], r[2]): r[-1] == "True" for r in csv_rows[1:]} == marks
    float(csv_rows[1][8])  # numbers stay numbers
    again = SensitivityReport.from_json(report.to_json())
    assert again.noise == report.noise and again.table() == table and again.to_csv() == report.to_csv()
    pytest.importorskip("matplotlib")
    saved = capture_figure(monkeypatch)
    report.plot(tmp_path / "heat.png")
    grey = [p for p in saved[-1].axes[0].patches if p.get_facecolor()[:3] == (0.75, 0.75, 0.75)]
    assert len(grey) == sum(marks.values())


def test_sensitivity_without_near_ties_has_floor_zero_and_no_marks():
    x1, x2 = on_grid((8, 64), 0), on_grid((8, 64), 1)
    for mode in ("isolated", "all-but-one"):
        report = mxfx.sensitivity(OnGrid(), (x1, x2), candidates=CANDIDATES, mode=mode, noise=2, progress=None)
        assert all(report.floor(c) == {"loss": 0.0, **dict.fromkeys(METRICS, 0.0)} for c in CANDIDATES)
        assert all(row["loss"] != 0 and report.within_floor(row) is False for row in report.rows), mode
        assert "~" not in report.table().split("noise floor")[0]


def test_sensitivity_floor_not_computed_is_none_with_a_reason_and_no_noise_makes_no_claim():
    model, x = Planted(), midpoints()
    for mode in ("local", "gradient"):
        report = mxfx.sensitivity(model, x, candidates=CANDIDATES, mode=mode, noise=2, progress=None)
        assert report.noise["floor"] is None and f"{mode} mode compares each site's own output" in report.noise["reason"]
        assert report.floor(FP8) is None and all(report.within_floor(r) is None for r in report.rows)
        table = report.table()
        assert "~" not in table and "noise floor: not computed" in table
        assert "within_floor" not in report.to_csv()
    report = mxfx.sensitivity(model, x, candidates=CANDIDATES, mode="isolated", progress=None)
    assert report.noise == {} and "~" not in report.table() and "within_floor" not in report.to_csv()
    assert not math.isnan(report.rows[0]["loss"])


def test_resume_fingerprint_includes_noise(tmp_path):
    model, x = Planted(), midpoints()
    path = tmp_path / "r.json"
    mxfx.sensitivity(model, x, candidates=[FP8], mode="isolated", progress=None, resume=path)
    with pytest.raises(mxfx.MXValueError, match="noise"):
        mxfx.sensitivity(model, x, candidates=[FP8], mode="isolated", noise=1, progress=None, resume=path)
    import json

    data = json.loads(path.read_text())
    del data["run"]["noise"]  # a file written before the noise floor existed still resumes with noise=0
    path.write_text(json.dumps(data))
    assert mxfx.sensitivity(model, x, candidates=[FP8], mode="isolated", progress=None, resume=path).rows


def test_bad_noise_arguments():
    model, x = Planted(), midpoints()
    with pytest.raises(mxfx.MXValueError, match="noise must be"):
        mxfx.sensitivity(model, x, candidates=[FP8], mode="isolated", noise=-1, progress=None)
    with pytest.raises(mxfx.MXValueError, match="unknown noise source"):
        mxfx.search(model, x, candidates=CANDIDATES, budget_bits=6.25, noise=1, noise_sources=("nope",), progress=None)


def test_cli_noise_flags(tmp_path, monkeypatch, capsys):
    import inspect
    import json

    from mxfx.cli import main

    source = "\n".join(["import torch", "", inspect.getsource(Planted), inspect.getsource(midpoints),
                        "def planted():\n    return Planted(), (midpoints(),)\n"])
    (tmp_path / "noise_cli_models.py").write_text(source)
    monkeypatch.chdir(tmp_path)
    assert main(["sensitivity", "noise_cli_models:planted", "--candidates", "fp8_e4m3,fp4_e2m1:fp8_e4m3",
                 "--mode", "isolated", "--noise", "2", "--out", "r.json"]) == 0
    out = capsys.readouterr().out
    marked = {line.split()[0] for line in out.splitlines() if line.startswith(("a ", "b ")) and "~" in line}
    assert marked == {"b"} and "noise floor (2 jitter(s) + batch split;" in out
    assert json.loads((tmp_path / "r.json").read_text())["noise"]["floor"]["fp8_e4m3"]["loss"] > 0
    assert main(["search", "noise_cli_models:planted", "--candidates", "fp8_e4m3,fp4_e2m1:fp8_e4m3", "--budgets",
                 "6.25", "--mode", "isolated", "--noise", "1", "--out", "front.toml"]) == 0
    out = capsys.readouterr().out
    assert "| spread" in out and "| reference" in out and "over the unperturbed run + 1 jitter(s) + batch split (mxfx.noise)" in out
    assert main(["search", "noise_cli_models:planted", "--candidates", "fp8_e4m3,fp4_e2m1:fp8_e4m3", "--budget-bits",
                 "6.25", "--mode", "isolated", "--noise", "1", "--out", "one.toml"]) == 0
    assert "spread over the noise runs: MSE" in capsys.readouterr().out
