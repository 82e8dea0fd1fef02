"""Per-site sensitivity: which linear and attention sites can take which MX formats.

    report = mxfx.sensitivity(model, batches, candidates=[("fp4_e2m1", "fp8_e4m3"), ("fp8_e4m3", "fp8_e4m3")],
                              mode="gradient")
    print(report.table())                        # most sensitive (site, candidate) first

A *candidate* is a (weight format, activation format) pair; None keeps that operand in high
precision; `formats=["fp8_e4m3", ...]` is shorthand for `[(f, f), ...]`. A linear site quantizes
its weight and its input with the pair. An attention site has no weight: the candidate's
*activation* format quantizes Q, K, V and P together (the weight format is unused there), and a
candidate without an activation format leaves it exactly unchanged (its row says so: zero error,
nothing measured).

Modes (each row's `loss` is the mode's additive estimate of the damage to the model output, the
quantity a mixed-precision search minimizes):
- `local`: one high-precision pass records every site's inputs; each (site, candidate) output is
  recomputed with quantized operands and compared with the high-precision one. No model re-runs.
  Metrics describe the site's own output (`kl` is None: a site output is not a distribution);
  `loss` = that site-output MSE (not weighted by how much the model output cares).
- `isolated`: one model run per (site, candidate) with only that site quantized; metrics compare
  the model's primary output; `loss` = model-output MSE.
- `all-but-one`: every measured site quantized with the candidate except one; metrics compare the
  model's primary output of that mix; `loss` = the site's marginal damage, MSE(all quantized) -
  MSE(all but this site) (can be slightly negative); sorting puts the exclusion that helps most first.
- `gradient`: one forward + backward per batch (per projection, see below) records every site's
  inputs and the gradient G = dL/dY of a scalar L with respect to the site's output Y; each
  (site, candidate) is scored from its own output error, no model re-runs (a second-order Taylor
  expansion with the Fisher information for the Hessian, as NVIDIA ModelOpt's auto_quantize):
  `loss` = sum over batches of sum(G^2 * (Yq - Y)^2). L is `loss_fn(output, batch)` when given;
  by default, 4 fixed-seed random projections s_r = <p_r, output> of the primary output, p_r with
  N(0, 1/numel) entries, each differentiated on its own and the scores averaged: for G = J^T p,
  E[G_i^2] = (J^T J)_ii / numel, so the score is the diagonal approximation of the first-order
  model-output MSE |J (Yq - Y)|^2 / numel that the quantization error of the site causes: it needs
  no labels and works for any model. Other metric columns describe the site's own output, as in
  `local`; `kl` is None.

Noise floor (`noise=N`, isolated and all-but-one modes): a row's number is a model-output
measurement, and a last-bit difference in a non-MX op (compiled vs eager, another batch size)
can move it (`mxfx.noise`). For each candidate, the model with *every* measured site quantized
with it (all-but-one's reference, the configuration with the most quantizers any row measures)
is re-measured under N 1-ulp jitters of every MX quantizer's input (plus a batch split) and the
spread of each metric is recorded; the `loss` floor is the spread of its MSE. A row is *within
the floor* when |loss| <= that floor: its damage (isolated: the model-output MSE against the
unquantized model; all-but-one: MSE(all) - MSE(all but this site)) cannot be told from no change.
Then every metric of the row is marked `~` in `table()`/`to_markdown()` (the CSV has a
`within_floor` column, the plot greys the cell). Why this definition: the unquantized model has
no MX quantizer, so its own spread under jitter is 0 and says nothing; the all-quantized model's
spread bounds the noise of any configuration with fewer quantizers. The test is made on the
loss, which is linear in the error energy, because that is what the spread transfers for: SQNR
and rel_error are the log and square root of the error energy, and their spreads at the
all-quantized operating point do not carry over to a near-zero error. `local` and `gradient`
re-run no model: their floor is None with the reason, never 0.

Metric definitions: `mxfx.analysis.metrics`. Runs can be resumed (`resume=path`): the file records
everything that defines the run and a changed run is refused. Work is sharded over
`torch.distributed` ranks when run under torchrun (`mxfx.distributed`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from mxfx.analysis import distributed
from mxfx.analysis.batches import as_batches
from mxfx.analysis.candidates import Candidate, candidate_label, normalize_candidates, parse_candidates  # noqa: F401  (public here)
from mxfx.analysis.metrics import METRICS
from mxfx.analysis.noise import check_arguments
from mxfx.analysis.resume import ResumeWriter, read_resume, run_fingerprint
from mxfx.analysis.sensitivity_modes import measure_local, measure_model, noise_floors
from mxfx.analysis.sensitivity_report import SensitivityReport
from mxfx.analysis.site_switch import explicit_support, measured_targets
from mxfx.errors import MXTypeError, MXValueError
from mxfx.graph.export import export
from mxfx.graph.prepare import find_sites
from mxfx.graph.sites import ATTENTION, KINDS, LINEAR
from mxfx.progress import Progress

MODES = ("local", "isolated", "all-but-one", "gradient")
SORT_KEYS = ("loss", *METRICS)


def sensitivity(
    model: torch.nn.Module,
    inputs,
    formats: Iterable[str] | None = None,
    *,
    candidates: Iterable[Sequence] | None = None,
    mode: str = "local",
    metric: str = "loss",
    sites: Iterable[str] | None = None,
    kinds: Sequence[str] = (LINEAR, ATTENTION),
    block_size: int = 32,
    loss_fn: Callable[[Any, tuple], torch.Tensor] | None = None,
    activations: bool = True,
    strict: bool = False,
    progress: Progress = True,
    resume: str | Path | None = None,
    noise: int = 0,
    noise_sources: Sequence[str] = ("jitter", "split"),
) -> SensitivityReport:
    """Measure how much each linear and attention site loses under each candidate MX format pair.

    Args:
        model: the model (not modified; exported once, in eval mode).
        inputs: one batch (a tensor or a tuple of positional inputs) or an iterable of batches;
            metrics aggregate over all of them.
        formats: element formats f, shorthand for the candidates (f, f) (default: fp8_e4m3,
            fp6_e2m3, fp4_e2m1, int8).
        candidates: (weight format, activation format) pairs; None keeps an operand in high
            precision. Attention sites use the activation format for Q, K, V and P.
        mode: "local", "isolated", "all-but-one" or "gradient" (see the module docstring).
        metric: the sort key: "loss" (the mode's damage estimate) or sqnr, mse, cosine, kl, rel_error.
        sites: only these site names (default: every site of `kinds`).
        kinds: which site kinds to measure: "linear", "attention".
        block_size: MX block size of every quantized operand.
        loss_fn: gradient mode's scalar, `loss_fn(output, batch)` with the model's output structure
            (default: random projections of the primary output, see the module docstring).
        activations: with `formats`, False makes the candidates (f, None) (weight-only).
        strict: torch.export's strict mode.
        progress: True (a tqdm bar on a terminal, else log lines), False, or a callable
            progress(done, total, elapsed_s, label) (`mxfx.progress`), after each unit of work of this
            process: a batch in local and gradient modes, a (site, candidate) in the others.
        resume: a JSON path: if it exists it must come from the same run (mode, candidates, block
            size, sites, kinds, compared outputs, loss_fn, batches, parameters), else MXValueError
            names what differs; its rows are reused and the file is rewritten as each unit of work
            completes (an interrupted run resumed repeats at most the unit it was in).
        noise: 0 (default): no noise floor. N >= 1: for each candidate, measure the model with every
            measured site quantized under N 1-ulp jitters (+ `noise_sources`) and keep each
            metric's spread (`report.noise`; a row whose |loss| is within the loss floor is marked
            `~`, see the module docstring). local/gradient modes record floor None with the reason.
            Every rank of a sharded run measures the floors itself (they are small: N + 2 model
            runs per candidate).
        noise_sources: perturbations among "jitter", "split", "compiled" (`mxfx.noise`).

    Returns:
        SensitivityReport with one row per (site, candidate), sites in graph order.

    Raises:
        MXValueError: unknown mode/metric/kind, no sites, a bad candidate, a resume file of another run.
    """
    if mode not in MODES:
        raise MXValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if metric not in SORT_KEYS:
        raise MXValueError(f"unknown metric {metric!r}; valid: {', '.join(SORT_KEYS)}")
    if isinstance(kinds, str) or not kinds or set(kinds) - set(KINDS):
        raise MXValueError(f"kinds must be a non-empty list of {', '.join(KINDS)}, got {kinds!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise MXValueError(f"block_size must be a positive integer, got {block_size!r}")
    if loss_fn is not None and mode != "gradient":
        raise MXValueError("loss_fn is used by mode='gradient' only")
    if not isinstance(model, torch.nn.Module):
        raise MXTypeError(f"sensitivity takes an nn.Module, got {type(model).__name__}")
    noise_sources = tuple(noise_sources)
    if noise:
        check_arguments(noise, noise_sources)
    cands = normalize_candidates(formats, candidates, activations)
    batches = as_batches(inputs)
    program = export(model, batches[0], strict=strict)
    base = program.module()
    find_sites(base)  # annotate only
    targets, unmeasured = measured_targets(base, kinds, sites)
    if mode in ("local", "gradient"):
        why = {id(t): explicit_support(t, base) for t in targets if t.kind == ATTENTION and t.form != "sdpa"}
        for t in targets:
            if why.get(id(t)) is not None:
                unmeasured.append({"site": t.fqn, "kind": t.kind, "reason": f"{mode} mode cannot recompute {why[id(t)]}"})
        targets = [t for t in targets if why.get(id(t)) is None]
        if not targets:
            raise MXValueError(f"no sites the {mode} mode can measure: {unmeasured}")
    fingerprint = run_fingerprint(model, batches, mode, cands, block_size, targets, kinds, loss_fn, noise, noise_sources)
    floors = noise_floors(program, base, targets, cands, batches, mode, block_size, noise, noise_sources) if noise else {}
    path = None if resume is None else Path(resume)
    items = [(t, c) for t in targets for c in cands]
    with distributed.process_group() as (rank, world):
        done = read_resume(path, fingerprint) if path is not None else {}
        distributed.barrier(world)  # every rank reads the same files before any rank writes
        todo = [(i, t, c) for i, (t, c) in enumerate(items) if (t.kind, t.fqn, *c) not in done]
        mine = [(i, t, c) for n, (i, t, c) in enumerate(todo) if n % world == rank]
        measure = measure_model if mode in ("isolated", "all-but-one") else measure_local
        writer = ResumeWriter(path, fingerprint, mode, metric, cands, unmeasured, rank, world, done, floors)
        results = measure(program, base, targets, mine, batches, mode, block_size, loss_fn, progress, writer) if mine else {}
        results = distributed.gather(results, world)
        rows = []
        for i, (t, c) in enumerate(items):
            row = done.get((t.kind, t.fqn, *c)) or results[i]
            rows.append(row)
        report = SensitivityReport(rows, mode, metric, cands, unmeasured, fingerprint, floors)
        writer.finish(report)
    return report
