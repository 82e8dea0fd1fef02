"""Mixed-precision search: one (weight format, activation format) candidate per site under a bit budget.

    config, result = mxfx.search(model, batches, budget_bits=6.25, toml_path="mixed.toml")
    front = mxfx.search(model, batches, candidates=[("fp4_e2m1", "fp8_e4m3"), ("fp6_e2m3", "fp6_e2m3"),
                        ("fp8_e4m3", "fp8_e4m3")], budgets=[4.5, 5.25, 6.25], plot="front.png")
    print(front.table())

Each site gets a loss per candidate from a sensitivity measurement (`mode`, default "gradient":
the Taylor score sum((dL/dY * (Yq - Y))^2) over the calibration batches); an exact knapsack
(`mxfx.solver`) picks the candidates that minimize the summed loss within the budget; each
chosen config is then prepared from one `mxfx.export` program and evaluated end to end, next
to the uniform configs (each candidate at every site) as reference points.

Bits (what the budgets count; scales included, OCP MX v1.0 §5: one 8-bit E8M0 scale per block):
- an MX operand in format f with block size b costs `bits(f) + 8 / b` bits per element;
- a high-precision activation costs `HIGH_PRECISION_ACTIVATION_BITS` (16) bits per element;
- a high-precision weight costs the model's parameter width (32 for fp32 models).
`budget_bits` bounds the numel-weighted average over the searched linear sites' weights;
`act_budget_bits` the average over the searched sites' quantized activations (linear inputs;
Q, K, V and P of attention sites, which have no weight and take the candidate's activation format).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import tomllib
from collections.abc import Callable, Iterable, Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mxfx.analysis import sensitivity as sensitivity_module
from mxfx.analysis.batches import as_batches, primary_output
from mxfx.analysis.candidates import Candidate, candidate_label, normalize_candidates  # noqa: F401  (public here)
from mxfx.analysis.evaluation import config_evaluator
from mxfx.analysis.metrics import HIGHER_IS_BETTER
from mxfx.analysis.noise import (
    DEFAULT_SOURCES,
    NoiseFloor,
    check_arguments,
    noise_floor_of,
)
from mxfx.analysis.resume import VerifiedStore, batch_fingerprint, callable_identity, parameter_fingerprint
from mxfx.analysis.search_results import Front, FrontPoint, SearchResult  # noqa: F401  (public here)
from mxfx.analysis.solver import solve
from mxfx.errors import MXValueError
from mxfx.graph.config import QuantConfig, config_from_dict
from mxfx.graph.export import export
from mxfx.graph.prepare import prepare
from mxfx.graph.sites import ATTENTION, LINEAR
from mxfx.numerics.formats import get_format
from mxfx.progress import Progress, Reporter

log = logging.getLogger(__name__)
# the module, not the function `mxfx.sensitivity` that shadows it as a package attribute


HIGH_PRECISION_ACTIVATION_BITS = 16  # an unquantized activation, counted as bf16/fp16 for the act budget
DEFAULT_FORMATS = ("fp8_e4m3", "fp6_e2m3", "fp4_e2m1")
MODES = ("gradient", "local", "isolated", "all-but-one")


def bits_per_element(fmt: str | None, block_size: int = 32, high_precision_bits: int = HIGH_PRECISION_ACTIVATION_BITS) -> float:
    """Bits per element of an operand in MX format `fmt` (scales included), or `high_precision_bits` for None."""
    return float(_bits(fmt, block_size, high_precision_bits))


def _bits(fmt: str | None, block_size: int, high_precision_bits: int) -> Fraction:
    if fmt is None:
        return Fraction(high_precision_bits)
    return Fraction(get_format(fmt).bits) + Fraction(8, block_size)  # element bits + one E8M0 scale per block


# --- losses -------------------------------------------------------------------------------------


def causal_lm_loss(output: Any, batch: tuple) -> torch.Tensor:
    """Next-token cross-entropy of a causal LM on the batch's own tokens (the gradient-mode loss
    `search` uses for models that take integer token ids and return [B, T, vocab] logits)."""
    logits, tokens = primary_output(output), batch[0]
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(tokens.shape):
        raise MXValueError(f"causal_lm_loss needs [B, T, vocab] logits for [B, T] tokens, got {tuple(logits.shape)}")
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def _rows_from_report(report) -> list[dict]:
    """The rows of a SensitivityReport, checked for what a search reads."""
    needed = {"site", "kind", "weight_format", "activation_format", "weight_numel", "loss"}
    for row in report.rows:
        if needed - set(row):
            raise MXValueError(f"a sensitivity row lacks {sorted(needed - set(row))}: measure it with mxfx.sensitivity "
                               f"(candidates=...) first")
    return [dict(row) for row in report.rows]


def _is_causal_lm(model, batch: tuple) -> bool:
    """Integer token ids in and [B, T, vocab] logits out (one forward pass to look): the last axis
    must cover every token id (an encoder's [B, T, hidden] states do not), and a Hugging Face
    model must be able to generate (a masked LM's logits are not next-token predictions)."""
    tokens = batch[0] if batch else None
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.dim() != 2:
        return False
    if callable(getattr(model, "can_generate", None)) and not model.can_generate():
        return False
    with torch.no_grad():
        out = primary_output(model(*batch))
    return out.dim() == 3 and tuple(out.shape[:2]) == tuple(tokens.shape) and out.shape[-1] > int(tokens.max())


def measure(model, batches, candidates, *, mode="gradient", sites=None, block_size=32, loss_fn=None,
            progress: Progress = True, resume: str | Path | None = None) -> list[dict]:
    """The per-(site, candidate) loss rows a search minimizes, from `mxfx.sensitivity`.

    In gradient mode without a `loss_fn`, a causal LM gets `causal_lm_loss` (next-token
    cross-entropy: the Fisher of the quantity perplexity measures, as ModelOpt's auto_quantize);
    other models get sensitivity's default (random projections of the output). Sites the mode
    cannot measure are logged and left out of the search (they get no rule).
    """
    if mode not in MODES:
        raise MXValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    batches = as_batches(batches, "search")
    if mode == "gradient" and loss_fn is None and _is_causal_lm(model, batches[0]):
        loss_fn = causal_lm_loss
    report = sensitivity_module.sensitivity(model, batches, candidates=candidates, mode=mode, sites=sites,
                                             block_size=block_size, progress=progress, resume=resume,
                                             **({"loss_fn": loss_fn} if mode == "gradient" else {}))
    for row in getattr(report, "unmeasured", []):
        log.warning("search: site %s (%s) not measured, left out: %s", row.get("site"), row.get("kind"), row.get("reason"))
    return _rows_from_report(report)


# --- configs ------------------------------------------------------------------------------------


def _spec(fmt: str, block_size: int) -> str:
    return f'{{ format = "{fmt}", block_size = {block_size} }}'


def to_toml(assignment: dict[str, Candidate], kinds: dict[str, str], block_size: int, header: Sequence[str] = ()) -> str:
    """One explicit rule per site: weight and activation specs (linear), or an attention table."""
    lines = ["# Written by mxfx.search: one explicit rule per searched site; other sites match no rule.",
             *(f"# {h}" for h in header), ""]
    for site, (weight, activation) in assignment.items():
        lines += ["[[rule]]", f"match = '{re.escape(site)}'"]
        if kinds.get(site) == ATTENTION:
            if activation is None:
                lines.append("skip = true")
            else:
                spec = _spec(activation, block_size)
                lines.append(f"attention = {{ query = {spec}, key = {spec}, value = {spec}, probs = {spec} }}")
        elif weight is None and activation is None:
            lines.append("skip = true")
        else:
            if weight is not None:
                lines.append(f"weight = {_spec(weight, block_size)}")
            if activation is not None:
                lines.append(f"activation = {_spec(activation, block_size)}")
        lines.append("")
    return "\n".join(lines)


def search(
    model: torch.nn.Module,
    inputs,
    formats: Iterable[str] | None = None,
    *,
    candidates: Iterable[Sequence] | None = None,
    budget_bits: float | None = None,
    budgets: Iterable[float] | None = None,
    act_budget_bits: float | None = None,
    mode: str = "gradient",
    sites: Iterable[str] | None = None,
    report=None,
    block_size: int = 32,
    toml_path: str | Path | None = None,
    plot: str | Path | None = None,
    progress: Progress = True,
    resume: str | Path | None = None,
    loss_fn: Callable[[Any, tuple], torch.Tensor] | None = None,
    eval_fn: Callable[[torch.nn.Module], float] | None = None,
    eval_inputs=None,
    metric: str | None = None,
    higher_is_better: bool | None = None,
    noise: int = 0,
    noise_sources: Sequence[str] = DEFAULT_SOURCES,
) -> tuple[QuantConfig, SearchResult] | Front:
    """Choose a candidate per site minimizing the summed loss within a bit budget; verify end to end.

    Args:
        model: the model (not modified).
        inputs: calibration: one batch or an iterable of batches (losses sum over them).
        formats: shorthand for candidates [(f, f), ...] (default E4M3, E2M3, E2M1).
        candidates: (weight format, activation format) pairs; None keeps that operand in high
            precision. Attention sites use the activation format for Q, K, V and P.
        budget_bits: one budget: returns (QuantConfig, SearchResult).
        budgets: several budgets: returns a Front with the uniform configs as reference points.
        act_budget_bits: optional bound on the average activation bits.
        mode: how losses are measured: "gradient" (default), "local" or "isolated".
        sites: restrict the search to these site names; other sites get no rule (stay as they are).
        report: a SensitivityReport to use instead of measuring (its rows need `loss`, or `mse`).
        block_size: MX block size of every spec.
        toml_path: write the (single-budget) config here.
        plot: write the front's plot here (budgets only).
        progress: True (a tqdm bar on a terminal, else log lines), False, or a callable
            progress(done, total, elapsed_s, label) (`mxfx.progress`), during measurement and evaluation.
        resume: a path: the sensitivity measurement resumes from it (`mxfx.sensitivity`'s resume),
            and each verified config's measurement is written to `<path>.verified.json` as it
            finishes; a rerun of the same search skips what is there (a file of another search is
            refused with MXValueError).
        loss_fn: loss_fn(output, batch) -> scalar for mode="gradient" (default: see `measure`).
        eval_fn: eval_fn(prepared) -> float, the end-to-end metric (e.g. held-out perplexity);
            default: model-output metrics vs the unquantized model on `eval_inputs`.
        eval_inputs: batches for the default evaluation (default: `inputs`).
        metric: the name of the front's metric ("mse" by default; "eval" with eval_fn).
        higher_is_better: the metric's direction (default from the name; False for eval_fn).
        noise: 0 (default): evaluate each config once. N >= 1: also evaluate every searched and
            uniform config under `mxfx.analysis.noise.noise_floor` (N 1-ulp jitters of every MX
            quantizer's input, plus each other source in `noise_sources`; with `eval_fn`, the
            batch split cannot run and is listed as skipped): `result.spread` / `point.spread`
            hold the spread, and `Front.table()` marks a searched point within the larger spread
            of its reference uniform config with `~` (`Front.plot` draws it hollow, with error bars).
        noise_sources: perturbations among "jitter", "split", "compiled" (`mxfx.noise`).

    Returns:
        (QuantConfig, SearchResult) for budget_bits; a Front for budgets.

    Raises:
        MXValueError: bad arguments, unknown sites, or an infeasible budget (naming the minimum).
    """
    if (budget_bits is None) == (budgets is None):
        raise MXValueError("pass exactly one of budget_bits (one config) or budgets (a front)")
    if plot is not None and budgets is None:
        raise MXValueError("plot draws a front: pass budgets=[...]")
    if eval_fn is None:
        metric = metric or "mse"
        if metric not in HIGHER_IS_BETTER:
            raise MXValueError(f"unknown metric {metric!r}; valid: {', '.join(HIGHER_IS_BETTER)} (or pass eval_fn)")
        higher_is_better = HIGHER_IS_BETTER[metric] if higher_is_better is None else higher_is_better
    else:
        metric, higher_is_better = metric or "eval", bool(higher_is_better)
    noise_sources = tuple(noise_sources)
    if noise:
        check_arguments(noise, noise_sources)
    candidates = normalize_candidates(formats, candidates, default=DEFAULT_FORMATS)
    batches = as_batches(inputs, "search")
    wanted = None if sites is None else list(dict.fromkeys(sites))
    rows = _rows_from_report(report) if report is not None else measure(
        model, batches, candidates, mode=mode, sites=wanted, block_size=block_size, loss_fn=loss_fn, progress=progress,
        resume=resume)
    table = _loss_table(rows, candidates, wanted)
    hp_weight_bits = next((p.dtype.itemsize * 8 for p in model.parameters() if p.is_floating_point()), 32)
    program = export(model, batches[0])
    eval_batches = as_batches(eval_inputs, "search") if eval_inputs is not None else batches
    evaluate = _evaluator(program, batches[0], eval_batches, eval_fn, metric, noise, noise_sources)
    common = dict(table=table, block_size=block_size, hp_weight_bits=hp_weight_bits, act_budget_bits=act_budget_bits,
                  mode=mode if report is None else getattr(report, "mode", mode))
    if budget_bits is not None:
        config, result = _solve_one(budget_bits, **common)
        _measure_into(result, evaluate(config))
        if toml_path is not None:
            Path(toml_path).write_text(result.toml)
        return config, result
    points = []
    budgets = sorted(float(b) for b in budgets)
    plans = [(f"search {b:g}", "search", _solve_one(b, **common)) for b in budgets]
    plans += [(f"uniform {candidate_label(c)}", "uniform", _uniform(c, **common)) for c in candidates]
    verified = VerifiedStore(resume, {"metric": metric, "eval_fn": callable_identity(eval_fn), "noise": noise,
                                      "noise_sources": list(noise_sources) if noise else [],
                                      "eval_batches": batch_fingerprint(eval_batches),
                                      "parameters": parameter_fingerprint(model)})
    reporter = Reporter(progress, len(plans), "search: verifying", done=sum(verified.has(r.toml) for *_, (_, r) in plans))
    for label, kind, (config, result) in plans:
        measured = verified.get(result.toml)
        if measured is None:
            measured = evaluate(config)
            verified.put(result.toml, measured)
            reporter.update(label)
        _measure_into(result, measured)
        points.append(FrontPoint(label, kind, result.average_bits, result.average_activation_bits,
                                 result.measured[metric], result, config,
                                 spread=None if result.spread is None else result.spread[metric]))
    reporter.close()
    front = Front(points, metric, higher_is_better, noise, noise_sources if noise else ())
    if plot is not None:
        front.plot(plot)
    return front


@dataclasses.dataclass
class _Table:
    sites: list[str]
    kinds: dict[str, str]
    candidates: list[Candidate]
    loss: list[list[float]]
    weight_numel: list[int]
    activation_numel: list[int | None]


def _loss_table(rows: list[dict], candidates: list[Candidate], wanted: list[str] | None) -> _Table:
    by_site: dict[str, dict[Candidate, dict]] = {}
    for row in rows:
        key = (row["weight_format"], row["activation_format"])
        by_site.setdefault(row["site"], {})[key] = row
    if wanted is not None:
        unknown = [s for s in wanted if s not in by_site]
        if unknown:
            raise MXValueError(f"unknown sites {unknown[:5]}; the measured sites are {sorted(by_site)[:10]}...")
    sites = [s for s in by_site if wanted is None or s in wanted]
    if not sites:
        raise MXValueError("no sites to search over")
    loss, kinds, weight_numel, activation_numel = [], {}, [], []
    for site in sites:
        missing = [c for c in candidates if c not in by_site[site]]
        if missing:
            raise MXValueError(f"the sensitivity rows have no loss for site {site!r} and candidates {missing}")
        measured = [by_site[site][c] for c in candidates]
        if any(r["loss"] is None for r in measured):
            raise MXValueError(f"site {site!r}: a candidate's loss was not computed")
        loss.append([float(r["loss"]) for r in measured])
        kinds[site] = measured[0].get("kind", LINEAR)
        weight_numel.append(int(measured[0].get("weight_numel") or 0))
        numel = measured[0].get("activation_numel")
        activation_numel.append(None if numel is None else int(numel))
    return _Table(sites, kinds, candidates, loss, weight_numel, activation_numel)


def _averages(table: _Table, choice: Sequence[int], block_size: int, hp_weight_bits: int) -> tuple[float, float | None]:
    wtotal = sum(table.weight_numel)
    wbits = sum(n * _bits(table.candidates[k][0], block_size, hp_weight_bits)
                for n, k, site in zip(table.weight_numel, choice, table.sites) if table.kinds[site] == LINEAR)
    if any(n is None for n in table.activation_numel):
        return float(wbits / wtotal) if wtotal else 0.0, None
    atotal = sum(table.activation_numel)
    abits = sum(n * _bits(table.candidates[k][1], block_size, HIGH_PRECISION_ACTIVATION_BITS)
                for n, k in zip(table.activation_numel, choice))
    return (float(wbits / wtotal) if wtotal else 0.0), (float(abits / atotal) if atotal else None)


def _finish(table: _Table, choice: Sequence[int], *, block_size, hp_weight_bits, budget_bits, act_budget_bits, mode,
            exact=True) -> tuple[QuantConfig, SearchResult]:
    assignment = {site: table.candidates[k] for site, k in zip(table.sites, choice)}
    wbits, abits = _averages(table, choice, block_size, hp_weight_bits)
    loss = sum(table.loss[i][k] for i, k in enumerate(choice))
    header = [f"budget {budget_bits} bits per weight" if budget_bits is not None else "uniform reference",
              f"average weight bits {wbits:.4f}" + ("" if abits is None else f", activation bits {abits:.4f}"),
              f"sensitivity mode {mode}, predicted loss {loss:.6g}"]
    text = to_toml(assignment, table.kinds, block_size, header)
    config = config_from_dict(tomllib.loads(text), "mxfx.analysis.search")  # the TOML is the source of truth
    return config, SearchResult(assignment, wbits, abits, {"loss": loss}, {}, text, budget_bits, act_budget_bits, exact, mode)


def _solve_one(budget_bits: float, *, table: _Table, block_size, hp_weight_bits, act_budget_bits, mode):
    wtotal = sum(table.weight_numel)
    if wtotal == 0:
        raise MXValueError("a weight budget needs linear sites among the searched sites")
    wcost = [[n * _bits(c[0], block_size, hp_weight_bits) if table.kinds[s] == LINEAR else 0 for c in table.candidates]
             for s, n in zip(table.sites, table.weight_numel)]
    acost = abudget = None
    if act_budget_bits is not None:
        if any(n is None for n in table.activation_numel):
            raise MXValueError("act_budget_bits needs activation_numel in the sensitivity rows")
        acost = [[n * _bits(c[1], block_size, HIGH_PRECISION_ACTIVATION_BITS) for c in table.candidates]
                 for n in table.activation_numel]
        abudget = Fraction(repr(float(act_budget_bits))) * sum(table.activation_numel)
    solution = solve(table.loss, wcost, Fraction(repr(float(budget_bits))) * wtotal, acost, abudget,
                     weight_total=wtotal, activation_total=sum(n or 0 for n in table.activation_numel) or 1)
    return _finish(table, solution.choice, block_size=block_size, hp_weight_bits=hp_weight_bits,
                   budget_bits=budget_bits, act_budget_bits=act_budget_bits, mode=mode, exact=solution.exact)


def _uniform(candidate: Candidate, *, table: _Table, block_size, hp_weight_bits, act_budget_bits, mode):
    k = table.candidates.index(candidate)
    return _finish(table, [k] * len(table.sites), block_size=block_size, hp_weight_bits=hp_weight_bits,
                   budget_bits=None, act_budget_bits=None, mode=mode)


def _measure_into(result: SearchResult, measured: dict | NoiseFloor) -> None:
    if isinstance(measured, NoiseFloor):
        result.measured, result.spread, result.noise = dict(measured.metrics), measured.spreads, measured
    else:
        result.measured = measured


def _evaluator(program, example: tuple, batches: list[tuple], eval_fn, metric: str, noise: int = 0,
               noise_sources: Sequence[str] = DEFAULT_SOURCES) -> Callable[[QuantConfig], dict | NoiseFloor]:
    """config -> metrics of the config prepared from one exported program (noise >= 1: a NoiseFloor)."""
    if eval_fn is not None:
        def measure_fn(module) -> dict:
            return {metric: float(eval_fn(module))}

        def evaluate_fn(config: QuantConfig):
            prepared = prepare(program, config, example)
            return noise_floor_of(prepared, measure_fn, noise, noise_sources) if noise else measure_fn(prepared)

        return evaluate_fn
    return config_evaluator(program, batches, noise, noise_sources, example)
