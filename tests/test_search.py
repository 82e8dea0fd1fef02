"""The budget solver (against brute force) and the mixed-precision search: fronts, sites, TOML, plot."""

import itertools
import os
import random
import sys
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

import mxfx
from mxfx.analysis.search import bits_per_element, measure, to_toml
from mxfx.analysis.solver import solve
from mxfx.testing.models import FragileMLP, NanoGPT

TESTS = os.path.dirname(os.path.abspath(__file__))  # for subprocesses: model_zoo lives here

PAIRS = [("fp4_e2m1", "fp8_e4m3"), ("fp6_e2m3", "fp6_e2m3"), ("fp8_e4m3", "fp8_e4m3"), ("int8", "int8")]


def fixture():
    torch.manual_seed(0)
    return FragileMLP(), [torch.randn(32, 64) for _ in range(2)]


def brute_force(losses, wcost, budget, acost=None, abudget=None):
    """The least loss over every assignment within the budgets (ties: least weight, then activation cost)."""
    best = None
    for combo in itertools.product(*(range(len(row)) for row in losses)):
        w = sum(wcost[i][k] for i, k in enumerate(combo))
        a = sum(acost[i][k] for i, k in enumerate(combo)) if acost else 0
        if w <= budget and (abudget is None or a <= abudget):
            key = (sum(losses[i][k] for i, k in enumerate(combo)), w, a)
            best = key if best is None or key < best else best
    return best


def random_instance(rng, activation):
    n, k = rng.randint(1, 5), rng.randint(1, 4)
    wbits = [Fraction(rng.choice([4, 6, 8, 32])) + Fraction(1, 4) for _ in range(k)]
    abits = [Fraction(rng.choice([4, 6, 8, 16])) + Fraction(1, 4) for _ in range(k)]
    wnumel = [rng.choice([32, 64, 96, 160]) for _ in range(n)]
    anumel = [rng.choice([16, 48, 64]) for _ in range(n)]
    losses = [[rng.choice([0.0, 1.0, 2.0, rng.random()]) for _ in range(k)] for _ in range(n)]
    wcost = [[m * b for b in wbits] for m in wnumel]
    acost = [[m * b for b in abits] for m in anumel] if activation else None
    budget = Fraction(rng.choice(["4.25", "5.25", "6.25", "8.25", "12"])) * sum(wnumel)
    abudget = Fraction(rng.choice(["4.25", "6.25", "9", "16.25"])) * sum(anumel) if activation else None
    return losses, wcost, budget, acost, abudget


@pytest.mark.parametrize("activation", [False, True])
def test_solver_matches_brute_force(activation):
    rng = random.Random(1 + activation)
    solved = 0
    for _ in range(150):
        losses, wcost, budget, acost, abudget = random_instance(rng, activation)
        best = brute_force(losses, wcost, budget, acost, abudget)
        if best is None:
            with pytest.raises(mxfx.MXValueError):
                solve(losses, wcost, budget, acost, abudget)
            continue
        solution = solve(losses, wcost, budget, acost, abudget)
        assert solution.exact
        assert solution.loss == pytest.approx(best[0], abs=1e-12)
        assert solution.weight_cost <= budget and (abudget is None or solution.activation_cost <= abudget)
        assert solution.weight_cost == sum(wcost[i][k] for i, k in enumerate(solution.choice))
        if solution.loss == best[0]:  # bit-equal losses: the documented tie-break
            assert (solution.weight_cost, solution.activation_cost or 0) == best[1:]
        solved += 1
    assert solved > 60  # most instances are feasible; the others checked the error


def test_solver_ties_and_equal_widths_are_deterministic():
    # E4M3 and INT8 are both 8.25 bits, E3M2 and E2M3 both 6.25: the old greedy divided by zero here.
    wcost = [[64 * Fraction(b) for b in ("8.25", "8.25", "6.25", "6.25")]] * 3
    losses = [[1.0, 1.0, 2.0, 2.0], [0.0, 0.0, 0.0, 0.0], [3.0, 1.0, 1.0, 5.0]]
    solution = solve(losses, wcost, Fraction("7.25") * 192)
    # least loss (2.0), then least weight cost: site 1 takes a 6.25-bit option (the earlier one),
    # site 2 takes the 6.25-bit option of equal loss, site 0 keeps 8.25 bits
    assert solution.choice == (0, 2, 2) and solution.loss == 2.0
    assert all(solve(losses, wcost, Fraction("7.25") * 192).choice == solution.choice for _ in range(3))


def test_infeasible_budgets_name_the_minimum():
    wcost = [[64 * Fraction(b) for b in ("4.25", "8.25")]] * 2
    with pytest.raises(mxfx.MXValueError, match="minimum of 4.25 bits"):
        solve([[1.0, 0.0]] * 2, wcost, Fraction(4) * 128, weight_total=128)
    acost = [[16 * Fraction(b) for b in ("8.25", "4.25")]] * 2  # the narrow weights need wide activations
    with pytest.raises(mxfx.MXValueError, match="cannot be met together"):
        solve([[1.0, 0.0]] * 2, wcost, Fraction("4.25") * 128, acost, Fraction("4.25") * 32)


def test_coarsened_solver_stays_within_budget():
    rng = random.Random(3)
    wcost = [[rng.randint(100, 999) * Fraction(b) for b in ("4.25", "6.25", "8.25")] for _ in range(40)]
    losses = [[rng.random() * 3, rng.random(), 0.0] for _ in range(40)]
    budget = sum(row[1] for row in wcost)
    coarse = solve(losses, wcost, budget, max_choice_bytes=40 * 50)
    exact = solve(losses, wcost, budget)
    assert not coarse.exact and coarse.weight_cost <= budget
    assert exact.exact and exact.loss <= coarse.loss <= exact.loss * 1.5


def test_bits_per_element():
    assert bits_per_element("fp8_e4m3") == bits_per_element("int8") == 8.25
    assert bits_per_element("fp6_e3m2") == bits_per_element("fp6_e2m3") == 6.25
    assert bits_per_element("fp4_e2m1", 16) == 4.5 and bits_per_element(None) == 16


def test_gradient_losses_match_a_hand_computed_taylor_score():
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 16)
    x = torch.randn(8, 64)
    rows = measure(model, [(x,)], [("fp4_e2m1", "fp8_e4m3")], loss_fn=lambda out, batch: 0.5 * out.pow(2).sum(),
                   progress=None)
    with torch.no_grad():
        y = model(x)  # d(0.5 |y|^2)/dy = y
        yq = F.linear(mxfx.fake_quantize(x, "fp8_e4m3"), mxfx.fake_quantize(model.weight, "fp4_e2m1"), model.bias)
        expected = (y * (yq - y)).double().pow(2).sum().item()
    (row,) = rows
    assert row["loss"] == pytest.approx(expected, rel=1e-6) and row["loss"] > 0
    assert row["weight_numel"] == 64 * 16 and row["activation_numel"] == 8 * 64
    assert row["kl"] is None  # a site output is not a distribution: not computed, None (never 0)


def test_causal_lms_get_the_next_token_cross_entropy():
    torch.manual_seed(0)
    model = NanoGPT(vocab=64, d=32, n_layer=1, n_head=2, block_size=16)
    tokens = torch.randint(0, 64, (2, 16))
    rows = measure(model, [tokens], [("fp4_e2m1", "fp8_e4m3")], sites=["lm_head"], progress=None)
    seen = {}
    hook = model.lm_head.register_forward_hook(lambda module, args, out: seen.update(x=args[0], y=out))
    with torch.no_grad():
        model(tokens)
    hook.remove()
    x, y = seen["x"], seen["y"]
    # d(mean next-token cross-entropy)/d(logits), written out: (softmax - one_hot) / N, 0 at the last position
    grad = torch.zeros_like(y)
    grad[:, :-1] = (y[:, :-1].softmax(-1) - F.one_hot(tokens[:, 1:], 64)) / (2 * 15)
    yq = F.linear(mxfx.fake_quantize(x, "fp8_e4m3"), mxfx.fake_quantize(model.lm_head.weight, "fp4_e2m1"))
    expected = (grad * (yq - y)).double().pow(2).sum().item()
    assert rows[0]["site"] == "lm_head" and rows[0]["loss"] == pytest.approx(expected, rel=1e-4)


def test_encoders_and_masked_lms_are_not_taken_for_causal_lms():
    from mxfx.analysis.search import _is_causal_lm

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    tokens = torch.randint(0, 100, (2, 8))
    assert _is_causal_lm(NanoGPT(vocab=128, d=32, n_layer=1, n_head=2, block_size=16), (tokens,))
    # an encoder's hidden states have the [B, T, *] shape of logits (hidden 32 < token ids up to 99)
    bert = dict(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    assert not _is_causal_lm(transformers.BertModel(transformers.BertConfig(**bert)).eval(), (tokens,))
    # a masked LM's logits cover the vocabulary but are not next-token predictions
    assert not _is_causal_lm(transformers.BertForMaskedLM(transformers.BertConfig(**bert)).eval(), (tokens,))


def test_single_budget_with_equal_widths_and_toml_round_trip(tmp_path):
    model, batches = fixture()
    config, result = mxfx.search(model, batches, ["fp8_e4m3", "int8", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1"],
                                 budget_bits=6.25, toml_path=tmp_path / "mixed.toml", progress=None)
    assert result.average_bits <= 6.25 and result.exact
    loaded = mxfx.load_config(tmp_path / "mixed.toml")
    fields = lambda c: [(r.match, r.weight, r.activation, r.attention, r.skip) for r in c.rules]  # noqa: E731
    assert fields(loaded) == fields(config) and len(loaded.rules) == 4
    sites = {s.fqn: s for s in mxfx.prepare(model, loaded, (batches[0],)).mxfx_report.sites}
    assert set(sites) == set(result.assignment)
    for fqn, (weight, activation) in result.assignment.items():
        assert (sites[fqn].weight.format, sites[fqn].activation.format) == (weight, activation)
    assert result.measured["mse"] == pytest.approx(mxfx.evaluate(model, batches, loaded)["mse"], rel=1e-9)


def test_sites_restriction_leaves_the_others_alone():
    model, batches = fixture()
    config, result = mxfx.search(model, batches, candidates=PAIRS, budget_bits=4.5, sites=["a", "b"], progress=None)
    assert set(result.assignment) == {"a", "b"}
    report = mxfx.prepare(model, config, (batches[0],)).mxfx_report
    assert {s.fqn for s in report.sites if s.quantized} == {"a", "b"}
    assert {s.fqn for s in report.unquantized} == {"c", "d"}
    with pytest.raises(mxfx.MXValueError, match="nope"):
        mxfx.search(model, batches, candidates=PAIRS, budget_bits=6.25, sites=["a", "nope"], progress=None)
    with pytest.raises(mxfx.MXValueError, match="minimum of 4.25 bits"):
        mxfx.search(model, batches, candidates=PAIRS, budget_bits=4.0, progress=None)


def test_front_is_monotone_has_uniform_references_and_reproducible_metrics(tmp_path):
    model, batches = fixture()
    front = mxfx.search(model, batches, candidates=PAIRS, budgets=[4.5, 5.25, 6.25], progress=None)
    assert sorted(p.label for p in front.uniform()) == sorted(
        f"uniform {s}" for s in ("fp4_e2m1:fp8_e4m3", "fp6_e2m3", "fp8_e4m3", "int8"))
    assert all(p.weight_bits == bits_per_element(p.result.assignment["a"][0]) for p in front.uniform())
    assert len(front.searched()) == 3
    points = front.front()
    assert points and all(a.weight_bits < b.weight_bits and a.value > b.value for a, b in zip(points, points[1:]))
    for p in front.points:  # dominated points are really dominated
        if not p.on_front:
            assert any(q.weight_bits <= p.weight_bits and q.value < p.value for q in points)
        assert p.value == pytest.approx(mxfx.evaluate(model, batches, p.config)["mse"], rel=1e-9)
    for p in front.searched():
        assert p.weight_bits <= p.result.budget_bits
    by_budget = {p.result.budget_bits: p for p in front.searched()}
    assert by_budget[6.25].value < next(p.value for p in front.uniform() if p.label.endswith("fp6_e2m3"))
    assert "| config" in front.table()


def test_search_resumes_after_an_interrupted_verification_and_equals_an_uninterrupted_run(tmp_path):
    """Sensitivity rows and each verified config are on disk as they finish: a search stopped after
    two verified configs resumes with the rest (no sensitivity row or config measured again), and
    its front equals an uninterrupted search's."""
    model, batches = fixture()
    path = tmp_path / "search.json"
    args = dict(candidates=PAIRS[:2], budgets=[4.5, 6.25], mode="isolated")

    def stop_after_two_verified(done, total, elapsed, label):
        if label.startswith(("search", "uniform")) and done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        mxfx.search(model, batches, progress=stop_after_two_verified, resume=path, **args)
    calls = []
    resumed = mxfx.search(model, batches, progress=lambda *a: calls.append(a), resume=path, **args)
    assert [(c[0], c[1], c[3].split()[0]) for c in calls] == [(3, 4, "uniform"), (4, 4, "uniform")]
    fresh = mxfx.search(model, batches, progress=False, **args)
    assert [(p.label, p.value) for p in resumed.points] == [(p.label, p.value) for p in fresh.points]
    other = dict(args, candidates=PAIRS[1:3])
    with pytest.raises(mxfx.MXValueError, match="another run"):
        mxfx.search(model, batches, progress=False, resume=path, **other)


def test_front_plot_writes_png_without_touching_the_backend(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    model, batches = fixture()
    backend, had_pyplot = matplotlib.get_backend(), "matplotlib.pyplot" in sys.modules
    front = mxfx.search(model, batches, candidates=PAIRS[:2], budgets=[5.25], plot=tmp_path / "front.png", progress=None)
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"
    assert front.plot(tmp_path / "again.png").read_bytes()[:4] == b"\x89PNG"
    assert matplotlib.get_backend() == backend
    assert had_pyplot or "matplotlib.pyplot" not in sys.modules


def test_attention_sites_get_an_attention_table():
    text = to_toml({"h.0.attn": (None, "fp8_e4m3"), "h.0.mlp": ("fp4_e2m1", None), "h.1.attn": ("fp4_e2m1", None)},
                   {"h.0.attn": "attention", "h.0.mlp": "linear", "h.1.attn": "attention"}, 32)
    import tomllib

    config = mxfx.graph.config.config_from_dict(tomllib.loads(text))
    attention, linear, skipped = config.rules
    assert attention.attention == mxfx.AttentionSpec(*[mxfx.MXSpec("fp8_e4m3")] * 4)
    assert (linear.weight, linear.activation) == (mxfx.MXSpec("fp4_e2m1"), None)
    assert skipped.skip and attention.matches("h.0.attn") and not attention.matches("h.0xattn")


def test_bad_arguments():
    model, batches = fixture()
    with pytest.raises(mxfx.MXValueError, match="exactly one of"):
        mxfx.search(model, batches, progress=None)
    with pytest.raises(mxfx.MXValueError, match="quantizes nothing"):
        mxfx.search(model, batches, candidates=[(None, None)], budget_bits=6.0, progress=None)
    with pytest.raises(mxfx.FormatError):
        mxfx.search(model, batches, ["fp7"], budget_bits=6.0, progress=None)
    with pytest.raises(mxfx.MXValueError, match="plot draws a front"):
        mxfx.search(model, batches, budget_bits=6.0, plot="x.png", progress=None)


@pytest.mark.slow
def test_cli_search_one_budget_and_a_front(tmp_path):
    import os
    import subprocess
    import textwrap

    (tmp_path / "fragile_models.py").write_text(textwrap.dedent("""
        import torch
        from mxfx.testing.models import FragileMLP, NanoGPT
        def fragile():
            torch.manual_seed(0)
            return FragileMLP(), (torch.randn(32, 64),)
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), TESTS])}  # the factory, model_zoo

    def run(*args):
        return subprocess.run([sys.executable, "-m", "mxfx", "search", "fragile_models:fragile", *args], capture_output=True,
                              text=True, cwd=tmp_path, env=env, timeout=600)

    result = run("--budget-bits", "6.25", "--out", "mixed.toml")
    assert result.returncode == 0, result.stderr
    assert "  b: fp8_e4m3" in result.stdout  # the planted fragile layer keeps the widest format
    assert len(mxfx.load_config(tmp_path / "mixed.toml").rules) == 4
    result = run("--budgets", "4.5,6.25", "--candidates", "fp4_e2m1:fp8_e4m3,fp6_e2m3,fp8_e4m3", "--plot", "front.png",
                 "--out", "front.toml")
    assert result.returncode == 0, result.stderr
    assert "uniform fp4_e2m1:fp8_e4m3" in result.stdout and "search 6.25" in result.stdout
    assert (tmp_path / "front.png").read_bytes()[:4] == b"\x89PNG"
    for budget in ("4.5", "6.25"):
        assert mxfx.load_config(tmp_path / f"front_{budget}bits.toml").rules
    result = run("--budget-bits", "3", "--out", "x.toml")
    assert result.returncode == 1 and "minimum of 4.25 bits" in result.stderr
