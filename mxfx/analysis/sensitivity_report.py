"""`SensitivityReport`: the rows of a sensitivity run, sorted views, noise-floor marks and the
table/markdown/CSV/JSON/plot renderings (the library returns text; the CLI prints it).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path

from tabulate import tabulate

from mxfx.analysis.candidates import Candidate, candidate_label, format_or_none
from mxfx.analysis.metrics import HIGHER_IS_BETTER, METRICS
from mxfx.analysis.noise import WITHIN_FLOOR, significant
from mxfx.errors import MXValueError

COLUMNS = ("site", "kind", "weight_format", "activation_format", "format", "mode", "weight_numel",
           "activation_numel", "loss", "sqnr", "mse", "cosine", "kl", "rel_error")
FILE_VERSION = 2  # of the report's JSON


# --- the report --------------------------------------------------------------------------------


@dataclasses.dataclass
class SensitivityReport:
    """One row per (site, candidate): see `COLUMNS`; metrics a mode cannot compute are None."""

    rows: list[dict]
    mode: str
    metric: str = "loss"  # the sort key: loss or one of mxfx.analysis.metrics.METRICS
    candidates: list[Candidate] = dataclasses.field(default_factory=list)
    unmeasured: list[dict] = dataclasses.field(default_factory=list)  # {site, kind, reason}
    run: dict = dataclasses.field(default_factory=dict)  # what defines the run (resume checks it)
    # sensitivity(noise=N): {} when not measured; else {"runs": N, "sources": [...], "floor": {candidate
    # label: {"loss": ..., metric: spread}} or None, "reason": why floor is None, "measurements": {label:
    # NoiseFloor.to_dict() of the all-sites-quantized model}}
    noise: dict = dataclasses.field(default_factory=dict)

    def floor(self, candidate: Sequence) -> dict | None:
        """metric -> noise floor for a candidate ((weight, activation) pair or label); None when not measured."""
        floors = self.noise.get("floor") if self.noise else None
        if floors is None:
            return None
        return floors.get(candidate if isinstance(candidate, str) else candidate_label(tuple(candidate)))

    def within_floor(self, row: dict) -> bool | None:
        """Whether a row's loss is within the noise floor of no change (|loss| <= the loss floor of
        its candidate, module docstring); None when no floor was measured or the loss was not computed."""
        floor = self.floor((row["weight_format"], row["activation_format"]))
        if floor is None or row.get("loss") is None:
            return None
        return not significant(row["loss"], 0.0, floor["loss"])

    def _rendered(self, row: dict, metric: str, within: bool | None):
        value = row.get(metric)
        if value is None:
            return None
        return format(value, ".4g") + (WITHIN_FLOOR if within else "")

    def _noise_lines(self) -> list[str]:
        if not self.noise:
            return ["noise floor not measured (noise=0): differences are not checked against it"]
        if self.noise.get("floor") is None:
            return [f"noise floor: not computed: {self.noise.get('reason')}"]
        first = next(iter(self.noise["measurements"].values()), {"runs": [], "skipped": []})
        labels = [label for label, _ in first["runs"]]
        runs = (f"{sum(x.startswith('jitter') for x in labels)} jitter(s)" + "".join(f" + {x}" for x in labels if not
                x.startswith("jitter")) + "".join(f" ({source} skipped: {why})" for source, why in first["skipped"]))
        lines = [f"noise floor ({runs}; spread of the model with every measured site quantized with the candidate); "
                 f"{WITHIN_FLOOR}: the row's |loss| is within its candidate's loss floor, not distinguishable from no change:"]
        for label, floor in self.noise["floor"].items():
            lines.append(f"  {label}: " + ", ".join(f"{m} {floor[m]:.3g}" for m in ("loss", *METRICS) if floor.get(m) is not None))
        return lines

    def _severity(self, row: dict, metric: str) -> float | None:
        """Higher = more sensitive, for any metric and mode; None when not computed."""
        value = row.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if metric == "loss":
            return value
        worse_when_higher = not HIGHER_IS_BETTER[metric]
        if self.mode == "all-but-one":  # metrics of the model *without* this site: better = it mattered
            worse_when_higher = not worse_when_higher
        return value if worse_when_higher else -value

    def sorted_rows(self, metric: str | None = None) -> list[dict]:
        """Most sensitive first (all-but-one: the site whose exclusion helps most first); rows whose
        metric was not computed last; ties by site name, then candidate order."""
        metric = metric or self.metric
        order = {c: i for i, c in enumerate(self.candidates)}

        def key(row):
            severity = self._severity(row, metric)
            return (severity is None, -(severity or 0.0), row["site"],
                    order.get((row["weight_format"], row["activation_format"]), len(order)), row["kind"])

        return sorted(self.rows, key=key)

    def table(self, tablefmt: str = "simple") -> str:
        headers = ["site", "kind", "weight_format", "activation_format", "loss", *METRICS]
        marked = bool(self.noise) and self.noise.get("floor") is not None
        body = [[r.get(h) if h not in ("loss", *METRICS) or not marked else self._rendered(r, h, self.within_floor(r))
                 for h in headers] for r in self.sorted_rows()]
        text = tabulate(body, headers=[h.removesuffix("_format") for h in headers], tablefmt=tablefmt, floatfmt=".4g",
                        missingval="-", disable_numparse=marked)
        if self.noise:
            text += "\n" + "\n".join(self._noise_lines())
        for entry in self.unmeasured:
            text += f"\nnot measured: {entry['site']} ({entry['kind']}): {entry['reason']}"
        return text

    def to_markdown(self) -> str:
        return self.table("github")

    def to_csv(self) -> str:
        """The rows as CSV (numbers stay numbers); with a noise floor, a `within_floor` column says
        (True/False) whether the row is within the floor of no change (where the table shows `~`)."""
        marked = bool(self.noise) and self.noise.get("floor") is not None
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[*COLUMNS, *(["within_floor"] if marked else [])], extrasaction="ignore")
        writer.writeheader()
        for row in self.sorted_rows():
            if marked:
                row = {**row, "within_floor": self.within_floor(row)}
            writer.writerow(row)
        return out.getvalue()

    def to_json(self) -> str:
        return json.dumps({"version": FILE_VERSION, "mode": self.mode, "metric": self.metric,
                           "candidates": [list(c) for c in self.candidates], "rows": self.rows,
                           "unmeasured": self.unmeasured, "run": self.run, "noise": self.noise}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> SensitivityReport:
        data = json.loads(text)
        if data.get("version") != FILE_VERSION:
            raise MXValueError(f"not a version-{FILE_VERSION} mxfx sensitivity report")
        return cls(data["rows"], data["mode"], data.get("metric", "loss"), [tuple(c) for c in data["candidates"]],
                   data.get("unmeasured", []), data.get("run", {}), data.get("noise") or {})

    def value(self, site: str, candidate: str | Sequence, metric: str | None = None, kind: str | None = None) -> float | None:
        """The metric of one row; `candidate` is a (weight, activation) pair or a format f for (f, f)."""
        pair = (candidate, candidate) if isinstance(candidate, str) else tuple(candidate)
        pair = (format_or_none(pair[0]), format_or_none(pair[1]))
        for row in self.rows:
            if row["site"] == site and (row["weight_format"], row["activation_format"]) == pair and kind in (None, row["kind"]):
                return row[metric or self.metric]
        raise KeyError(f"no row for site {site!r} and candidate {candidate_label(pair)}")

    def plot(self, path: str | Path) -> Path:
        """A heat map of sites x candidates (the report's metric) to PNG/SVG; needs matplotlib.

        Uses matplotlib's object-oriented `Figure` API: no pyplot state, the global backend is untouched.
        """
        try:
            from matplotlib.figure import Figure
            from matplotlib.patches import Rectangle
        except ImportError:
            raise MXValueError("plot needs matplotlib: pip install matplotlib") from None
        sites = list(dict.fromkeys((r["kind"], r["site"]) for r in self.rows))
        pairs = self.candidates or list(dict.fromkeys((r["weight_format"], r["activation_format"]) for r in self.rows))
        labels = [candidate_label(c) for c in pairs]
        grid = [[math.nan] * len(labels) for _ in sites]
        index = {s: i for i, s in enumerate(sites)}
        for row in self.rows:
            value = row.get(self.metric)
            column = labels.index(candidate_label((row["weight_format"], row["activation_format"])))
            grid[index[(row["kind"], row["site"])]][column] = math.nan if value is None else value
        fig = Figure(figsize=(2.0 + 1.2 * len(labels), 1.0 + 0.35 * len(sites) + (0.6 if self.noise else 0.0)))
        ax = fig.subplots()
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_yticks(range(len(sites)), [f"{name} ({kind[0]})" for kind, name in sites])
        within = {(index[(r["kind"], r["site"])], labels.index(candidate_label((r["weight_format"], r["activation_format"]))))
                  for r in self.rows if self.within_floor(r)}
        for i, j in within:  # within the noise floor of no change: greyed out
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.75", edgecolor="0.6", zorder=2))
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                text = "-" if math.isnan(v) else f"{v:.3g}" + (WITHIN_FLOOR if (i, j) in within else "")
                ax.text(j, i, text, ha="center", va="center", color="0.2" if (i, j) in within else "white", fontsize=7,
                        zorder=3)
        fig.colorbar(image, ax=ax, label=self.metric)
        note = {True: f"\ngrey, {WITHIN_FLOOR}: within the noise floor of no change", False: "\nnoise floor not computed"}
        ax.set_title(f"mxfx sensitivity ({self.mode}, {self.metric})"
                     + ("" if not self.noise else note[self.noise.get("floor") is not None]), fontsize=9)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        return path


