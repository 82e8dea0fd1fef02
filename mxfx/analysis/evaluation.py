"""End-to-end evaluation of a config: the model-output metrics `mxfx.evaluate` reports and
`mxfx.search` verifies its configs with (one loop, one set of definitions: `mxfx.analysis.metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mxfx.analysis.batches import as_batches, primary_output
from mxfx.analysis.metrics import MetricAccumulator
from mxfx.analysis.noise import DEFAULT_SOURCES, NoiseFloor, noise_floor
from mxfx.graph.config import QuantConfig, load_config
from mxfx.graph.export import export
from mxfx.graph.prepare import prepare


def config_evaluator(program: torch.export.ExportedProgram, batches: list[tuple], noise: int = 0,
                     noise_sources: Sequence[str] = DEFAULT_SOURCES, example: tuple | None = None
                     ) -> Callable[[QuantConfig], dict | NoiseFloor]:
    """config -> model-output metrics (KL per token over the last axis) of that config prepared
    from `program`, against the unquantized program, over `batches`; noise >= 1 returns the
    `NoiseFloor` of those metrics under that many 1-ulp jitters (+ `noise_sources`). `example`: the
    inputs prepare sees (default: the first batch)."""
    reference = program.module()
    with torch.no_grad():
        references = [primary_output(reference(*b)).detach() for b in batches]

    def measure(outputs: list) -> dict:
        accumulator = MetricAccumulator(kl=True)
        for reference_output, output in zip(references, outputs):
            accumulator.add(reference_output, primary_output(output))
        return accumulator.result()

    def evaluate_config(config: QuantConfig) -> dict | NoiseFloor:
        prepared = prepare(program, config, batches[0] if example is None else example)
        if noise:
            return noise_floor(prepared, batches, measure, noise, noise_sources)
        with torch.no_grad():
            return measure([prepared(*batch) for batch in batches])

    return evaluate_config


def evaluate(model: torch.nn.Module, inputs, config, *, noise: int = 0,
             noise_sources: tuple[str, ...] = ("jitter", "split")) -> dict:
    """Model-output metrics (`mxfx.analysis.metrics`, KL per token over the last axis) of `config`
    against the unquantized model, over the batches.

        metrics = mxfx.evaluate(model, [x1, x2], "mxfp8")   # {"sqnr": ..., "mse": ..., "kl": ...}

    Args:
        model: the model (not modified).
        inputs: one batch or an iterable of batches.
        config: a QuantConfig, a preset name or a TOML path.
        noise: 0 (default): measure once. N >= 1: also measure under N 1-ulp input jitters and
            each other source in `noise_sources`, and add a "spread" entry (metric -> largest
            minus smallest value over all runs) and a "noise" entry (the `mxfx.analysis.noise.NoiseFloor`
            as a dict): a difference between two configs below the larger spread is not signal
            (`mxfx.analysis.noise.significant`).
        noise_sources: perturbations among "jitter", "split", "compiled" (see `mxfx.analysis.noise`).
    """
    batches = as_batches(inputs, "evaluate")
    result = config_evaluator(export(model, batches[0]), batches, noise, noise_sources)(load_config(config))
    if not noise:
        return result
    return {**result.metrics, "spread": result.spreads, "noise": result.to_dict()}
