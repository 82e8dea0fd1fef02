"""Search results: `SearchResult` (one searched or uniform configuration, predicted and measured),
`FrontPoint` and `Front` (the weight-bits vs metric front with its table and plot).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tabulate import tabulate

from mxfx.analysis.candidates import Candidate, candidate_label
from mxfx.analysis.noise import (
    WITHIN_FLOOR,
    NoiseFloor,
    render,
    significant,
)
from mxfx.errors import MXValueError
from mxfx.graph.config import QuantConfig

# --- results ------------------------------------------------------------------------------------


@dataclasses.dataclass
class SearchResult:
    """What `search` chose for one budget and how it measured up."""

    assignment: dict[str, Candidate]  # site -> (weight format, activation format)
    average_bits: float  # per weight element over the searched linear sites, scales included
    average_activation_bits: float | None  # per quantized-activation element (None: not measured)
    predicted: dict  # {"loss": sum of the chosen candidates' losses}
    measured: dict  # end-to-end metrics of the prepared config
    toml: str  # the config as TOML (loads with mxfx.load_config)
    budget_bits: float | None = None
    act_budget_bits: float | None = None
    exact: bool = True  # the solver's answer is provably optimal for the measured losses
    mode: str = "gradient"
    spread: dict | None = None  # metric -> spread of `measured` under search(noise=N); None: not measured
    noise: NoiseFloor | None = None  # the runs behind `spread`

    def counts(self) -> dict[str, int]:
        """How many sites got each candidate."""
        out: dict[str, int] = {}
        for candidate in self.assignment.values():
            out[candidate_label(candidate)] = out.get(candidate_label(candidate), 0) + 1
        return out


@dataclasses.dataclass
class FrontPoint:
    """One evaluated config: a searched mix for a budget, or a uniform reference."""

    label: str
    source: str  # "search" or "uniform"
    weight_bits: float
    activation_bits: float | None
    value: float  # the front's metric
    result: SearchResult
    config: QuantConfig  # the config that was prepared and evaluated
    on_front: bool = False
    spread: float | None = None  # spread of `value` under search(noise=N) (mxfx.noise); None: not measured


@dataclasses.dataclass
class Front:
    """Searched configs and uniform references on (weight bits, metric): the Pareto front."""

    points: list[FrontPoint]
    metric: str
    higher_is_better: bool
    noise: int = 0  # jitter runs per evaluated config (0: spread not measured)
    noise_sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        sign = -1.0 if self.higher_is_better else 1.0
        for p in self.points:  # non-dominated: no other point has <= bits and a strictly better value, or < bits and ==
            p.on_front = not any(
                (q.weight_bits <= p.weight_bits and sign * q.value < sign * p.value)
                or (q.weight_bits < p.weight_bits and q.value == p.value)
                for q in self.points if q is not p)

    def front(self) -> list[FrontPoint]:
        """The non-dominated points, fewest bits first."""
        return sorted((p for p in self.points if p.on_front), key=lambda p: (p.weight_bits, p.label))

    def searched(self) -> list[FrontPoint]:
        return [p for p in self.points if p.source == "search"]

    def uniform(self) -> list[FrontPoint]:
        return [p for p in self.points if p.source == "uniform"]

    @property
    def measured_noise(self) -> bool:
        """Whether every point carries a spread (search(noise=N >= 1))."""
        return bool(self.points) and all(p.spread is not None for p in self.points)

    def reference(self, point: FrontPoint) -> FrontPoint | None:
        """The uniform config a searched point is compared with: the best (by the front's metric)
        uniform config whose weight bits are at or under the point's budget (its weight bits when
        it has no budget); None for uniform points and when no uniform config is that cheap."""
        if point.source != "search":
            return None
        limit = point.result.budget_bits if point.result.budget_bits is not None else point.weight_bits
        cheap = [q for q in self.uniform() if q.weight_bits <= limit]
        if not cheap:
            return None
        sign = -1.0 if self.higher_is_better else 1.0
        return min(cheap, key=lambda q: (sign * q.value, q.weight_bits, q.label))

    def floor(self, point: FrontPoint) -> float | None:
        """The larger spread of a searched point and its reference (None: not measured or no reference)."""
        reference = self.reference(point)
        if reference is None or point.spread is None or reference.spread is None:
            return None
        return max(point.spread, reference.spread)

    def significant(self, point: FrontPoint) -> bool | None:
        """Whether a searched point differs from its reference by more than the floor
        (`mxfx.analysis.noise.significant`); None where that was not measured (no noise, no reference)."""
        floor = self.floor(point)
        return None if floor is None else significant(point.value, self.reference(point).value, floor)

    def table(self, tablefmt: str = "github") -> str:
        """One row per evaluated config, fewest bits first; * marks the Pareto front.

        With noise measured: a `spread` column, and a searched point's metric ends in `~` when it is
        within the floor (the larger spread) of its reference, the best uniform config at or under
        its budget (`reference` column): not distinguishable from that uniform config."""
        noise = self.measured_noise
        rows = []
        for p in sorted(self.points, key=lambda p: (p.weight_bits, p.source, p.label)):
            act = "-" if p.activation_bits is None else f"{p.activation_bits:.3f}"
            value = f"{p.value:.6g}"
            reference = self.reference(p) if noise else None
            if reference is not None:
                value = render(p.value, reference.value, self.floor(p), ".6g")
            row = [p.label, p.source, f"{p.weight_bits:.3f}", act, value]
            if noise:
                row += [f"{p.spread:.3g}", "-" if reference is None else reference.label]
            rows.append(row + [f"{p.result.predicted['loss']:.4g}" if p.source == "search" else "-",
                               "*" if p.on_front else ""])
        headers = ["config", "source", "weight bits", "act bits", self.metric,
                   *(["spread", "reference"] if noise else []), "predicted loss", "on front"]
        text = tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=noise)
        if noise:
            return text + (f"\nspread: largest minus smallest {self.metric} over {self._runs_text()} (mxfx.noise); "
                           f"{WITHIN_FLOOR}: within the larger spread of the reference, not distinguishable from it")
        return text + "\nspread not measured (noise=0): differences are not checked against the noise floor"

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Bits vs metric to a PNG/SVG: the front as a line, other points hollow. Needs matplotlib.

        Uses matplotlib's object-oriented Figure API only (no pyplot, no backend change).
        """
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise MXValueError("plot needs matplotlib: pip install matplotlib") from None
        fig = Figure(figsize=(6.4, 4.2))
        ax = fig.add_subplot()
        front = self.front()
        ax.plot([p.weight_bits for p in front], [p.value for p in front], "-", color="0.6", zorder=1, label="Pareto front")
        if self.measured_noise:
            self._plot_with_noise(ax)
        else:
            for source, marker, color in (("search", "o", "tab:blue"), ("uniform", "s", "tab:orange")):
                for on, face in ((True, color), (False, "none")):
                    pts = [p for p in self.points if p.source == source and p.on_front == on]
                    if pts:
                        ax.scatter([p.weight_bits for p in pts], [p.value for p in pts], marker=marker, facecolors=face,
                                   edgecolors=color, zorder=2, label=f"{source}{'' if on else ' (dominated)'}")
            ax.text(0.99, 0.01, "spread not measured (noise=0)", transform=ax.transAxes, ha="right", va="bottom",
                    fontsize=6, color="0.4")
        for p in self.points:
            ax.annotate(p.label, (p.weight_bits, p.value), textcoords="offset points", xytext=(4, 4), fontsize=6)
        ax.set_xlabel("weight bits per element (scales included)")
        ax.set_ylabel(self.metric)
        if not self.higher_is_better and all(p.value > 0 for p in self.points):
            ax.set_yscale("log")
        ax.set_title(title or f"mxfx search: {self.metric} vs bits")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        return path

    def _runs_text(self) -> str:
        """What the spreads were measured over, from the runs themselves (a skipped source says so)."""
        runs = [p.result.noise for p in self.points if p.result.noise is not None]
        if not runs:
            return f"{self.noise} jitter(s)"
        labels = [label for label, _ in runs[0].runs]
        jitters = sum(label.startswith("jitter") for label in labels)
        text = f"the unperturbed run + {jitters} jitter(s)" + "".join(f" + {x}" for x in labels if not x.startswith("jitter"))
        return text + "".join(f" ({source} skipped: {why})" for source, why in runs[0].skipped)

    def _plot_with_noise(self, ax) -> None:
        """Error bars from the smallest to the largest value over the noise runs; a searched point
        within the floor of its reference hollow; dominated points faded."""
        for p in self.points:
            low, high = p.result.noise.range(self.metric) if p.result.noise is not None else (p.value, p.value)
            ax.errorbar([p.weight_bits], [p.value], yerr=[[p.value - low], [high - p.value]], fmt="none",
                        ecolor="0.3", elinewidth=0.8, capsize=3, zorder=1.5)
        styles = (("search", "o", "tab:blue", True, "search: differs from its reference (beyond the spread)"),
                  ("search", "o", "tab:blue", False, "search: within the spread of its reference (not significant)"),
                  ("search", "o", "tab:blue", None, "search: no uniform config at or under its budget"),
                  ("uniform", "s", "tab:orange", None, "uniform (reference)"))
        for source, marker, color, sig, label in styles:
            for on in (True, False):
                pts = [p for p in self.points if p.source == source and p.on_front == on
                       and (source == "uniform" or self.significant(p) is sig)]
                if pts:
                    ax.scatter([p.weight_bits for p in pts], [p.value for p in pts], marker=marker,
                               facecolors=color if sig is not False else "none", edgecolors=color,
                               alpha=1.0 if on else 0.4, zorder=2, label=label + ("" if on else ", dominated"))
        ax.text(0.99, 0.01, f"error bars: range over {self._runs_text()}", transform=ax.transAxes, ha="right", va="bottom", fontsize=6, color="0.4")


