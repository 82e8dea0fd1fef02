"""The measuring modes of `mxfx.sensitivity` (see that module's docstring for what each computes):
local and gradient recompute each site from recorded operands; isolated and all-but-one re-run the
model with switched sites; noise floors re-measure the all-quantized model under jitter.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from mxfx import _compat
from mxfx.analysis.batches import primary_output, structured_output
from mxfx.analysis.candidates import Candidate, candidate_label
from mxfx.analysis.metrics import MetricAccumulator
from mxfx.analysis.noise import noise_floor
from mxfx.analysis.site_switch import Recorder, Target, config_for, site_outputs, switched_graph
from mxfx.errors import MXValueError
from mxfx.graph.prepare import prepare
from mxfx.graph.sites import ATTENTION, LINEAR
from mxfx.progress import Reporter

pytree = _compat.pytree_module()  # torch.utils._pytree (private in torch 2.13/2.14)

PROJECTIONS, PROJECTION_SEED = 4, 0  # gradient mode's default scalar (mxfx.analysis.sensitivity's docstring)

log = logging.getLogger(__name__)


def _row(target: Target, candidate: Candidate, mode: str, activation_numel: int, metrics: dict, loss: float | None) -> dict:
    return {"site": target.fqn, "kind": target.kind, "weight_format": candidate[0], "activation_format": candidate[1],
            "format": candidate_label(candidate), "mode": mode,
            "weight_numel": target.weight_numel if target.kind == LINEAR else 0,
            "activation_numel": activation_numel, "loss": loss, **metrics}


def _unchanged(target: Target, candidate: Candidate, mode: str, numel: int, kl: bool) -> dict:
    """The exact row of an attention site under a candidate with no activation format: nothing is
    quantized, so the output is unchanged (known without measuring)."""
    metrics = {"sqnr": math.inf, "mse": 0.0, "cosine": 1.0, "kl": 0.0 if kl else None, "rel_error": 0.0}
    return _row(target, candidate, mode, numel, metrics, 0.0)


def measure_local(program, base, targets, mine, batches, mode, block_size, loss_fn, progress, writer) -> dict:
    """local and gradient modes: one recording pass per batch (gradient: with backward passes). The
    unit of work is a batch: after each one the running sums of every row go to the writer's partial
    state, so an interrupted run resumes at the next batch."""
    grad = mode == "gradient"
    items = [i for i, _, _ in mine]
    saved = writer.load_partial(items)
    accs = {i: MetricAccumulator(kl=False) for i in items}
    scores = {i: 0.0 for i in items}
    numel: dict[str, int] = {t.fqn: 0 for t in targets}
    first = 0
    if saved is not None:
        first = saved["batches_done"]
        accs = {i: MetricAccumulator.from_state(saved["accumulators"][str(i)]) for i in items}
        scores = {i: saved["scores"][str(i)] for i in items}
        numel = dict(saved["numel"])
        log.info("sensitivity: resuming %s mode after batch %d of %d", mode, first, len(batches))
    reporter = Reporter(progress, len(batches), f"sensitivity ({mode})", done=first)
    for b in range(first, len(batches)):
        batch = batches[b]
        recorder = Recorder(base, targets, keep=True, grad=grad)
        flat = pytree.tree_leaves(batch)
        with torch.set_grad_enabled(grad):
            output = recorder.run(*flat)
        for fqn, n in recorder.numel.items():
            numel[fqn] += n
        # gradient mode: mean over the scalars of G^2 per site output (score = sum(mean G^2 * err^2))
        fisher: list[torch.Tensor | None] = [None] * len(recorder.outputs)
        if grad and recorder.outputs:
            scalars = _scalars(structured_output(base, output), batch, loss_fn)
            for s in scalars:
                if not s.requires_grad:  # the output depends on no site: every score stays 0
                    continue
                grads = torch.autograd.grad(s, recorder.outputs, retain_graph=True, allow_unused=True)
                for k, g in enumerate(grads):
                    if g is not None:
                        term = g.detach().float().square() / len(scalars)
                        fisher[k] = term if fisher[k] is None else fisher[k] + term
                del grads
        index = {id(out): k for k, out in enumerate(recorder.outputs)}
        with torch.no_grad():
            for i, target, candidate in mine:
                if target.kind == ATTENTION and candidate[1] is None:
                    continue
                for record, out in recorder.records[target.fqn]:
                    reference, quantized = site_outputs(record, candidate, block_size)
                    accs[i].add(reference, quantized)
                    g2 = fisher[index[id(out)]] if grad else None
                    if g2 is not None:  # None: the scalar does not depend on this output (score 0)
                        scores[i] += (g2.double() * (quantized.double() - reference.double()).square()).sum().item()
        del recorder, fisher, output
        writer.save_partial({"batches_done": b + 1, "items": items, "numel": numel, "scores": {str(i): scores[i] for i in items},
                             "accumulators": {str(i): accs[i].state() for i in items}})
        reporter.update(f"batch {b + 1}/{len(batches)}")
    reporter.close()
    results = {}
    for i, target, candidate in mine:
        if target.kind == ATTENTION and candidate[1] is None:
            row = _unchanged(target, candidate, mode, numel[target.fqn], kl=False)
        else:
            metrics = accs[i].result()
            row = _row(target, candidate, mode, numel[target.fqn], metrics, scores[i] if grad else metrics["mse"])
        results[i] = row
        writer.add(row)
    return results


def _scalars(output: Any, batch: tuple, loss_fn: Callable | None) -> list[torch.Tensor]:
    """Gradient mode's scalars: the user's loss, or random projections of the primary output."""
    if loss_fn is not None:
        loss = loss_fn(output, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise MXValueError("loss_fn(output, batch) must return a one-element tensor that depends on the output")
        return [loss.reshape(())]
    primary = primary_output(output)
    generator = torch.Generator().manual_seed(PROJECTION_SEED)
    scalars = []
    for _ in range(PROJECTIONS):
        # entries N(0, 1/numel): E[G_i^2] = (J^T J)_ii / numel (module docstring); drawn on the CPU
        # so the projections are the same on every device.
        p = torch.randn(primary.shape, generator=generator, dtype=torch.float64) / math.sqrt(primary.numel())
        scalars.append((p.to(primary.device, primary.dtype) * primary).sum())
    return scalars


def measure_model(program, base, targets, mine, batches, mode, block_size, loss_fn, progress, writer) -> dict:
    """isolated and all-but-one modes: one switched copy of the exported graph (`switched_graph`, which
    shares the parameters) for the whole run; each work item sets its sites' switches and runs it."""
    references, numel = [], {t.fqn: 0 for t in targets}
    with torch.no_grad():
        for batch in batches:
            recorder = Recorder(base, targets, keep=False, grad=False)
            references.append(primary_output(structured_output(base, recorder.run(*pytree.tree_leaves(batch)))).detach())
            for fqn, n in recorder.numel.items():
                numel[fqn] += n

    switched, switches = switched_graph(program, targets, block_size)

    def run(chosen: dict[Target, Candidate]) -> dict:
        for switch in switches:
            candidate = chosen.get(switch.target)
            switch.candidate = None if candidate is None or candidate == (None, None) else candidate
        acc = MetricAccumulator(kl=True)
        try:
            with torch.no_grad():
                for batch, reference in zip(batches, references):
                    acc.add(reference, primary_output(switched(*batch)))
        finally:
            for switch in switches:
                switch.candidate = None
        return acc.result()

    everything: dict[Candidate, dict] = {}  # all-but-one: metrics with every site quantized, per candidate
    results = {}
    already = writer.resumed_rows  # counted as done: a resumed bar starts where the interrupted one stopped
    reporter = Reporter(progress, already + len(mine), f"sensitivity ({mode})", done=already)
    for i, target, candidate in mine:
        if mode == "all-but-one" and candidate not in everything:
            everything[candidate] = run(_all_but(targets, None, candidate))
        if target.kind == ATTENTION and candidate[1] is None:
            row = _unchanged(target, candidate, mode, numel[target.fqn], kl=True)
            if mode == "all-but-one":  # excluding a site the candidate leaves alone changes nothing
                row = _row(target, candidate, mode, numel[target.fqn], everything[candidate], 0.0)
        elif mode == "isolated":
            metrics = run({target: candidate})
            row = _row(target, candidate, mode, numel[target.fqn], metrics, metrics["mse"])
        else:
            metrics = run(_all_but(targets, target, candidate))
            row = _row(target, candidate, mode, numel[target.fqn], metrics, everything[candidate]["mse"] - metrics["mse"])
        results[i] = row
        writer.add(row)
        reporter.update(f"{target.fqn} {candidate_label(candidate)}")
    reporter.close()
    return results


def noise_floors(program, base, targets, candidates, batches, mode, block_size, noise, sources) -> dict:
    """report.noise (see SensitivityReport): per candidate, the spread of every metric of the model
    with all measured sites quantized with it, under `mxfx.analysis.noise.noise_floor`."""
    out = {"runs": noise, "sources": list(sources), "floor": None, "reason": None, "measurements": {}}
    if mode not in ("isolated", "all-but-one"):
        out["reason"] = (f"{mode} mode compares each site's own output, recomputed from recorded inputs: no model "
                         "measurement to repeat under perturbations (use mode='isolated' or 'all-but-one')")
        log.info("sensitivity: noise floor not computed: %s", out["reason"])
        return out
    with torch.no_grad():
        references = [primary_output(base(*batch)).detach() for batch in batches]

    def measure(outputs: list) -> dict:
        acc = MetricAccumulator(kl=True)
        for reference, output in zip(references, outputs):
            acc.add(reference, primary_output(output))
        return acc.result()

    out["floor"] = {}
    for candidate in candidates:
        label = candidate_label(candidate)
        prepared = prepare(program, config_for(_all_but(targets, None, candidate), block_size))
        floor = noise_floor(prepared, batches, measure, noise, sources)
        spreads = floor.spreads
        out["floor"][label] = {"loss": spreads["mse"], **spreads}
        out["measurements"][label] = floor.to_dict()
    return out


def _all_but(targets: list[Target], excluded: Target | None, candidate: Candidate) -> dict[Target, Candidate]:
    return {t: candidate for t in targets if t is not excluded and not (t.kind == ATTENTION and candidate[1] is None)}


