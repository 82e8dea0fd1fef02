"""Per-layer sensitivity reports and a mixed-precision search over MX formats.

    report = mxfx.sensitivity(model, batch, formats=["fp8_e4m3", "fp4_e2m1"], mode="local")
    print(report.table())                        # most sensitive site first
    config, result = mxfx.search(model, batch, formats=[...], budget_bits=6.0, toml_path="mixed.toml")

Modes:
- `local`: one high-precision pass records every linear site's input; each site is then quantized
  alone and its own output compared (fast: no model re-runs).
- `isolated`: quantize one site at a time and compare the model's outputs.
- `all-but-one`: quantize every site but one and compare the model's outputs; the site whose
  exclusion helps most is listed first.
A site's format applies to its weight and (unless `activations=False`) its input activations.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import fx

from mxfx.api import fake_quantize
from mxfx.config import MXSpec, QuantConfig, Rule
from mxfx.errors import MXValueError
from mxfx.export import export
from mxfx.formats import get_format
from mxfx.prepare import pipeline
from mxfx.sites import LINEAR, find_sites, site_of

log = logging.getLogger(__name__)
MODES = ("local", "isolated", "all-but-one")
METRICS = ("sqnr", "mse", "cosine", "kl", "rel_error")
_HIGHER_IS_BETTER = {"sqnr": True, "cosine": True, "mse": False, "kl": False, "rel_error": False}


class _Accumulator:
    """Sums over calibration batches; SQNR and relative error from total energies."""

    def __init__(self) -> None:
        self.signal = self.noise = self.cosine = self.kl = 0.0
        self.count = self.batches = 0

    def add(self, reference: torch.Tensor, test: torch.Tensor, logits: bool) -> None:
        reference, test = reference.detach().double().flatten(1) if reference.dim() > 1 else reference.detach().double()[None], \
            test.detach().double().flatten(1) if test.dim() > 1 else test.detach().double()[None]
        self.signal += reference.pow(2).sum().item()
        self.noise += (reference - test).pow(2).sum().item()
        self.count += reference.numel()
        self.cosine += F.cosine_similarity(reference, test, dim=-1).mean().item()
        if logits:
            self.kl += F.kl_div(test.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean").item()
        self.batches += 1

    def metrics(self) -> dict:
        return {
            "sqnr": round(10 * math.log10(self.signal / self.noise), 4) if self.noise > 0 else math.inf,
            "mse": self.noise / max(self.count, 1),
            "cosine": self.cosine / max(self.batches, 1),
            "kl": self.kl / max(self.batches, 1),
            "rel_error": math.sqrt(self.noise / self.signal) if self.signal > 0 else math.inf,
        }


def _primary_output(output: Any) -> torch.Tensor:
    """The first floating-point tensor in a model output (logits, last_hidden_state, ...)."""
    for leaf in torch.utils._pytree.tree_leaves(output if not hasattr(output, "to_tuple") else output.to_tuple()):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise MXValueError("the model output holds no floating-point tensor to compare")


def _batches(inputs) -> list[tuple]:
    if isinstance(inputs, torch.Tensor):
        return [(inputs,)]
    if isinstance(inputs, tuple):
        return [inputs]
    batches = [b if isinstance(b, tuple) else (b,) for b in inputs]
    if not batches:
        raise MXValueError("sensitivity needs at least one input batch")
    return batches


@dataclasses.dataclass
class SensitivityReport:
    """Rows of {site, format, mode, sqnr, mse, cosine, kl, rel_error, weight_numel}."""

    rows: list[dict]
    mode: str
    metric: str = "sqnr"

    def sorted_rows(self) -> list[dict]:
        """Most sensitive first; in all-but-one mode, the site whose exclusion helps most first."""
        higher_better = _HIGHER_IS_BETTER[self.metric]
        reverse = higher_better if self.mode == "all-but-one" else not higher_better
        return sorted(self.rows, key=lambda r: r[self.metric], reverse=reverse)

    def table(self, tablefmt: str = "simple") -> str:
        rows = self.sorted_rows()
        headers = ["site", "format", "sqnr", "mse", "cosine", "kl", "rel_error"]
        return tabulate([[r[h] for h in headers] for r in rows], headers=headers, tablefmt=tablefmt, floatfmt=".4g")

    def to_markdown(self) -> str:
        return self.table("github")

    def to_csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(self.rows[0]) if self.rows else ["site"])
        writer.writeheader()
        writer.writerows(self.sorted_rows())
        return out.getvalue()

    def to_json(self) -> str:
        return json.dumps({"mode": self.mode, "metric": self.metric, "rows": self.rows}, indent=1, default=str)

    @classmethod
    def from_json(cls, text: str) -> SensitivityReport:
        data = json.loads(text)
        return cls([dict(r, sqnr=float(r["sqnr"])) for r in data["rows"]], data["mode"], data.get("metric", "sqnr"))

    def value(self, site: str, fmt: str, metric: str | None = None) -> float:
        metric = metric or self.metric
        return next(r[metric] for r in self.rows if r["site"] == site and r["format"] == fmt)

    def plot(self, path: str | Path) -> Path:
        """A heat map of sites x formats (the report's metric) to PNG/SVG; needs matplotlib."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            raise MXValueError("plot needs matplotlib: pip install matplotlib") from None
        sites = list(dict.fromkeys(r["site"] for r in self.rows))
        formats = list(dict.fromkeys(r["format"] for r in self.rows))
        grid = [[self.value(s, f) for f in formats] for s in sites]
        fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(formats), 0.8 + 0.35 * len(sites)))
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(formats)), formats, rotation=30, ha="right")
        ax.set_yticks(range(len(sites)), sites)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.3g}", ha="center", va="center", color="white", fontsize=7)
        fig.colorbar(image, label=self.metric)
        ax.set_title(f"mxfx sensitivity ({self.mode}, {self.metric})")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        plt.close(fig)
        return path


def _progress_logger(done: int, total: int, elapsed: float, label: str) -> None:
    eta = elapsed / done * (total - done) if done else float("nan")
    log.info("sensitivity %d/%d (%s), %.1f s elapsed, ~%.1f s left", done, total, label, elapsed, eta)


def _base_graph(model, example: tuple, strict: bool) -> fx.GraphModule:
    gm = export(model, example, strict=strict).module()
    find_sites(gm)  # annotate the sites only
    return gm


def _linear_sites(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if (site := site_of(n)) is not None and site.kind == LINEAR]


def _site_config(quantized: dict[str, str], block_size: int, activations: bool) -> QuantConfig:
    rules = [Rule(match=re.escape(site), weight=MXSpec(fmt, block_size),
                  activation=MXSpec(fmt, block_size) if activations else None) for site, fmt in quantized.items()]
    return QuantConfig(tuple(rules) or (Rule(match=".*", skip=True),))


def _prepared_from(base: fx.GraphModule, config: QuantConfig) -> fx.GraphModule:
    gm = copy.deepcopy(base)
    for pass_ in pipeline(config):
        pass_(gm)
    return gm


def sensitivity(
    model: torch.nn.Module,
    inputs,
    formats: Iterable[str] = ("fp8_e4m3", "fp6_e2m3", "fp4_e2m1", "int8"),
    *,
    mode: str = "local",
    metric: str = "sqnr",
    sites: Iterable[str] | None = None,
    activations: bool = True,
    block_size: int = 32,
    strict: bool = False,
    progress: Callable[[int, int, float, str], None] | None = _progress_logger,
    resume: str | Path | None = None,
) -> SensitivityReport:
    """Measure how much each linear site loses under each MX format.

    Args:
        model: the model (not modified).
        inputs: one batch (a tensor or a tuple of positional inputs) or an iterable of batches;
            metrics aggregate over all of them.
        formats: element formats to try.
        mode: "local", "isolated" or "all-but-one" (see the module docstring).
        metric: the sort key: sqnr, mse, cosine, kl (model logits) or rel_error.
        sites: only these site names (default: every linear site).
        activations: quantize the site's input activations too (with the same format).
        progress: called as progress(done, total, elapsed_s, label) after each measurement.
        resume: a JSON path: rows already there are reused and the file is updated after each
            measurement, so an interrupted run picks up where it stopped.

    Returns:
        SensitivityReport with one row per (site, format).
    """
    if mode not in MODES:
        raise MXValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if metric not in METRICS:
        raise MXValueError(f"unknown metric {metric!r}; valid: {', '.join(METRICS)}")
    formats = [get_format(f).name for f in formats]
    batches = _batches(inputs)
    base = _base_graph(model, batches[0], strict)
    nodes = _linear_sites(base)
    wanted = None if sites is None else set(sites)
    nodes = [n for n in nodes if wanted is None or site_of(n).fqn in wanted]
    names = list(dict.fromkeys(site_of(n).fqn for n in nodes))
    if not names:
        raise MXValueError("no linear sites to measure" + ("" if wanted is None else f" among {sorted(wanted)}"))
    done: dict[tuple, dict] = {}
    if resume is not None and Path(resume).is_file():
        for row in SensitivityReport.from_json(Path(resume).read_text()).rows:
            done[(row["site"], row["format"])] = row
    numel = {site_of(n).fqn: site_of(n).weight_numel for n in nodes}
    total, start = len(names) * len(formats), time.perf_counter()
    rows: list[dict] = []
    with torch.no_grad():
        references = [_primary_output(base(*b)) for b in batches]
        recorded = _record_linear_io(base, nodes, batches) if mode == "local" else None
        for site in names:
            for fmt in formats:
                key = (site, fmt)
                if key not in done:
                    acc = _Accumulator()
                    if mode == "local":
                        for x, w, b, y in recorded[site]:
                            xq = fake_quantize(x, fmt, block_size=block_size) if activations else x
                            acc.add(y, F.linear(xq, fake_quantize(w, fmt, block_size=block_size), b), logits=False)
                    else:
                        chosen = {site: fmt} if mode == "isolated" else {s: fmt for s in names if s != site}
                        prepared = _prepared_from(base, _site_config(chosen, block_size, activations))
                        for batch, reference in zip(batches, references):
                            acc.add(reference, _primary_output(prepared(*batch)), logits=True)
                    done[key] = {"site": site, "format": fmt, "mode": mode, **acc.metrics(), "weight_numel": numel[site]}
                    if resume is not None:
                        Path(resume).write_text(SensitivityReport(list(done.values()), mode, metric).to_json())
                rows.append(done[key])
                if progress is not None:
                    progress(len(rows), total, time.perf_counter() - start, f"{site} {fmt}")
    return SensitivityReport(rows, mode, metric)


def _record_linear_io(base: fx.GraphModule, nodes: list[fx.Node], batches: list[tuple]) -> dict:
    """Inputs, weights, biases and outputs of each linear site, over all batches (one fp pass each)."""
    wanted = {n.name: site_of(n).fqn for n in nodes}
    recorded: dict[str, list] = {fqn: [] for fqn in wanted.values()}

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if node.name in wanted:
                x, w = self.env[node.args[0]], self.env[node.args[1]]
                b = self.env[node.args[2]] if len(node.args) > 2 and node.args[2] is not None else None
                recorded[wanted[node.name]].append((x, w, b, out))
            return out

    for batch in batches:
        Recorder(base).run(*batch)
    return recorded


@dataclasses.dataclass
class SearchResult:
    """What `search` chose and how it measured up."""

    assignment: dict[str, str]  # site -> format
    average_bits: float  # per weight element, scales included
    predicted: dict  # {"mse": sum of isolated MSEs}
    measured: dict  # model-output metrics of the chosen mix
    toml: str


def bits_per_element(fmt: str, block_size: int) -> float:
    return get_format(fmt).bits + 8 / block_size


def search(
    model: torch.nn.Module,
    inputs,
    formats: Iterable[str] = ("fp8_e4m3", "fp6_e2m3", "fp4_e2m1"),
    *,
    budget_bits: float,
    block_size: int = 32,
    activations: bool = True,
    report: SensitivityReport | None = None,
    toml_path: str | Path | None = None,
    progress: Callable | None = _progress_logger,
) -> tuple[QuantConfig, SearchResult]:
    """Pick a format per linear site so the average bits per weight element is <= budget_bits,
    minimizing the model-output MSE predicted from isolated sensitivities (greedy: cheapest loss
    per saved bit first), then verify the mix end to end.

    Returns:
        (QuantConfig with one explicit rule per site, SearchResult); writes the TOML if asked.
    """
    formats = sorted({get_format(f).name for f in formats}, key=lambda f: -bits_per_element(f, block_size))
    batches = _batches(inputs)
    if report is None or report.mode != "isolated":
        report = sensitivity(model, batches, formats, mode="isolated", activations=activations,
                             block_size=block_size, progress=progress)
    sites = list(dict.fromkeys(r["site"] for r in report.rows))
    numel = {r["site"]: r["weight_numel"] for r in report.rows}
    loss = {(r["site"], r["format"]): r["mse"] for r in report.rows}
    total = sum(numel.values())
    choice = {s: 0 for s in sites}  # index into formats, widest first

    def average_bits() -> float:
        return sum(numel[s] * bits_per_element(formats[choice[s]], block_size) for s in sites) / total

    lowest = sum(numel[s] * bits_per_element(formats[-1], block_size) for s in sites) / total
    if budget_bits < lowest - 1e-9:
        raise MXValueError(f"budget_bits={budget_bits} is below the narrowest format's {lowest:.3f} bits per weight")
    while average_bits() > budget_bits + 1e-9:
        best = None
        for s in sites:
            if choice[s] + 1 < len(formats):
                now, nxt = formats[choice[s]], formats[choice[s] + 1]
                saved = numel[s] * (bits_per_element(now, block_size) - bits_per_element(nxt, block_size))
                cost = (loss[(s, nxt)] - loss[(s, now)]) / saved
                if best is None or cost < best[0]:
                    best = (cost, s)
        choice[best[1]] += 1
    assignment = {s: formats[choice[s]] for s in sites}
    config = _site_config(assignment, block_size, activations)
    base = _base_graph(model, batches[0], strict=False)
    prepared = _prepared_from(base, config)
    acc = _Accumulator()
    with torch.no_grad():
        for batch in batches:
            acc.add(_primary_output(base(*batch)), _primary_output(prepared(*batch)), logits=True)
    toml = _to_toml(assignment, block_size, activations)
    if toml_path is not None:
        Path(toml_path).write_text(toml)
    predicted = {"mse": sum(loss[(s, f)] for s, f in assignment.items())}
    return config, SearchResult(assignment, average_bits(), predicted, acc.metrics(), toml)


def evaluate(model: torch.nn.Module, inputs, config, *, noise: int = 0,
             noise_sources: tuple[str, ...] = ("jitter", "split")) -> dict:
    """Model-output metrics (vs the unquantized model) of `config`, over the batches.

    Args:
        model: the model (not modified).
        inputs: one batch or an iterable of batches.
        config: a QuantConfig, a preset name or a TOML path.
        noise: 0 (default): measure once. N >= 1: also measure under N 1-ulp input jitters and
            each other source in `noise_sources`, and add a "spread" entry (metric -> largest
            minus smallest value over all runs) and a "noise" entry (the `mxfx.noise.NoiseFloor`
            as a dict): a difference between two configs below the larger spread is not signal
            (`mxfx.noise.significant`).
        noise_sources: perturbations among "jitter", "split", "compiled" (see `mxfx.noise`).
    """
    from mxfx.noise import noise_floor

    batches = _batches(inputs)
    base = _base_graph(model, batches[0], strict=False)
    prepared = _prepared_from(base, config if isinstance(config, QuantConfig) else __import__("mxfx").load_config(config))
    with torch.no_grad():
        references = [_primary_output(base(*batch)) for batch in batches]

    def measure(outputs: list) -> dict:
        acc = _Accumulator()
        for reference, output in zip(references, outputs):
            acc.add(reference, _primary_output(output), logits=True)
        return acc.metrics()

    if not noise:
        with torch.no_grad():
            return measure([prepared(*batch) for batch in batches])
    floor = noise_floor(prepared, batches, measure, noise, noise_sources)
    return {**floor.metrics, "spread": floor.spreads, "noise": floor.to_dict()}


def _to_toml(assignment: dict[str, str], block_size: int, activations: bool) -> str:
    lines = ["# Written by mxfx.search: one explicit rule per linear site.", ""]
    for site, fmt in assignment.items():
        lines += ["[[rule]]", f"match = '{re.escape(site)}'", f'weight = {{ format = "{fmt}", block_size = {block_size} }}']
        if activations:
            lines.append(f'activation = {{ format = "{fmt}", block_size = {block_size} }}')
        lines.append("")
    return "\n".join(lines)
