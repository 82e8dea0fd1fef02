"""Resume files for long analyses: a fingerprint of everything that defines a run, refusal of a
file from another run, and a writer that rewrites the file as each row completes (one partial
file per rank in a sharded run, merged by rank 0).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from mxfx import _compat
from mxfx.analysis import distributed
from mxfx.analysis.noise import NoiseFloor
from mxfx.analysis.sensitivity_modes import PROJECTION_SEED, PROJECTIONS
from mxfx.analysis.sensitivity_report import SensitivityReport
from mxfx.errors import ResumeError
from mxfx.resume_files import digest, replace_atomically, tensor_bytes

log = logging.getLogger(__name__)


# --- fingerprints for resume -------------------------------------------------------------------


def batch_fingerprint(batches: list[tuple]) -> dict:
    shapes, parts = [], []
    for batch in batches:
        leaves = _compat.tree_leaves(batch)
        shapes.append([f"{tuple(x.shape)}:{str(x.dtype).removeprefix('torch.')}" if isinstance(x, torch.Tensor)
                       else type(x).__name__ for x in leaves])
        parts += [tensor_bytes(x) if isinstance(x, torch.Tensor) else repr(x).encode() for x in leaves]
    return {"shapes": shapes, "hash": digest(*parts)}


def parameter_fingerprint(model: torch.nn.Module) -> dict:
    """name -> digest of (shape, dtype, sum, sum of |x|, a strided sample of <= 64 elements): cheap
    on large models, and any edit that matters for a report changes it."""
    out = {}
    for name, t in model.state_dict(keep_vars=False).items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64]
        stats = (flat.double().sum().item(), flat.double().abs().sum().item()) if flat.is_floating_point() else (flat.sum().item(),)
        out[name] = digest(tuple(t.shape), str(t.dtype), stats, tensor_bytes(sample))
    return out


def callable_identity(fn: Callable | None) -> str:
    if fn is None:
        return f"default: {PROJECTIONS} random projections of the primary output, seed {PROJECTION_SEED}"
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    code = getattr(fn, "__code__", None)
    return name if code is None else f"{name} (code {digest(code.co_code, code.co_consts)})"


def run_fingerprint(model, batches, mode, candidates, block_size, targets, kinds, loss_fn, noise=0, noise_sources=()) -> dict:
    compared = {"local": "site output", "gradient": "site output, gradient-weighted"}.get(mode, "model primary output")
    return {
        "mode": mode,
        "candidates": [list(c) for c in candidates],
        "block_size": block_size,
        "scale_mode/rounding": "floor/even",
        "sites": [f"{t.kind}:{t.fqn}" for t in targets],
        "kinds": list(kinds),
        "metric_inputs": compared,
        "loss_fn": callable_identity(loss_fn) if mode == "gradient" else None,
        "batches": batch_fingerprint(batches),
        "parameters": parameter_fingerprint(model),
        # None for noise=0, as in files written before the noise floor existed (they still resume)
        "noise": {"runs": noise, "sources": list(noise_sources)} if noise else None,
    }


def _check_same_run(saved: dict | None, current: dict, path: Path) -> None:
    if saved is None:
        raise ResumeError(f"{path} records no run fingerprint (written by an older mxfx?); delete it or pick another path")
    differing = [key for key in current if saved.get(key) != current[key]]
    if not differing:
        return
    details = []
    for key in differing:
        if key == "parameters":
            old, new = saved.get(key) or {}, current[key]
            names = [n for n in dict.fromkeys([*new, *old]) if old.get(n) != new.get(n)]
            details.append(f"parameters ({len(names)} differ, first {names[0]!r})")
        elif key == "batches":
            details.append("batches (" + ("shapes/dtypes" if saved[key].get("shapes") != current[key]["shapes"] else "contents") + ")")
        else:
            details.append(f"{key} ({saved.get(key)!r} != {current[key]!r})")
    raise ResumeError(f"cannot resume from {path}: it was written by another run; differing: {'; '.join(details)}. "
                       "Delete the file or pass another resume path.")


def read_resume(path: Path, fingerprint: dict) -> dict[tuple, dict]:
    rows: dict[tuple, dict] = {}
    files = [path] if path.is_file() else []
    files += sorted(path.parent.glob(f"{path.name}.rank*"))  # partial files of an interrupted sharded run
    for file in files:
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as error:
            raise ResumeError(f"cannot resume from {file}: not a sensitivity report ({error})") from None
        _check_same_run(data.get("run"), fingerprint, file)
        for row in data["rows"]:
            rows[_row_key(row)] = row
    return rows


def _row_key(row: dict) -> tuple:
    return row["kind"], row["site"], row["weight_format"], row["activation_format"]


def _write_json(path: Path, text: str) -> None:
    replace_atomically(path, lambda tmp: tmp.write_text(text))  # an interrupt never leaves half a file




class ResumeWriter:
    """Rewrites the resume file as rows complete: the report itself in one process, one partial
    file per rank (`<path>.rank<r>`) in a sharded run, merged by rank 0 at the end. Modes whose unit
    of work is a batch (local, gradient) also keep their running sums in `<path>.batches[.rank<r>]`
    after each batch (`save_partial`), removed when the run finishes."""

    def __init__(self, path, fingerprint, mode, metric, candidates, unmeasured, rank, world, done, noise) -> None:
        self.path, self.rank, self.world, self.fingerprint = path, rank, world, fingerprint
        self.base = SensitivityReport(list(done.values()) if world == 1 else [], mode, metric, candidates, unmeasured,
                                      fingerprint, noise)

    def add(self, row: dict) -> None:
        if self.path is None:
            return
        self.base.rows.append(row)
        target = self.path if self.world == 1 else self.path.with_name(f"{self.path.name}.rank{self.rank}")
        _write_json(target, self.base.to_json())

    @property
    def resumed_rows(self) -> int:
        """Rows of this process taken from the resume file (0 in a sharded run)."""
        return len(self.base.rows) if self.path is not None and self.world == 1 else 0

    def _partial_path(self) -> Path:
        suffix = ".batches" if self.world == 1 else f".batches.rank{self.rank}"
        return self.path.with_name(self.path.name + suffix)

    def save_partial(self, state: dict) -> None:
        """Record the running state of a batch-by-batch measurement (JSON; floats round-trip exactly)."""
        if self.path is not None:
            _write_json(self._partial_path(), json.dumps({"run": self.fingerprint, **state}))

    def load_partial(self, items: list[int]) -> dict | None:
        """The saved state of the same run and the same work items, or None. A state of another run
        is refused (ResumeError); one of another sharding (other items) is logged and not used."""
        if self.path is None or not self._partial_path().is_file():
            return None
        path = self._partial_path()
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ResumeError(f"cannot resume from {path}: not a sensitivity state file ({error})") from None
        _check_same_run(state.get("run"), self.fingerprint, path)
        if state.get("items") != items:
            log.warning("sensitivity: %s holds the state of other work items (another number of ranks?); "
                        "measuring every batch again", path)
            return None
        return state

    def finish(self, report: SensitivityReport) -> None:
        if self.path is None:
            return
        if self._partial_path().is_file():
            self._partial_path().unlink()
        distributed.barrier(self.world)
        if self.rank == 0:
            _write_json(self.path, report.to_json())
            for partial in self.path.parent.glob(f"{self.path.name}.rank*"):
                partial.unlink()
        distributed.barrier(self.world)


class VerifiedStore:
    """Measurements of verified configs, keyed by the config's TOML text, kept in
    `<path>.verified.json` and rewritten after each one (search's resume). The file records what
    defines the measurement (`run`: metric, eval_fn, noise, evaluation batches, parameters); a file
    of another run is refused. `path=None` keeps nothing."""

    def __init__(self, path: str | Path | None, run: dict) -> None:
        self.path = None if path is None else Path(path).with_name(Path(path).name + ".verified.json")
        self.run = json.loads(json.dumps(run))  # as it reads back from the file
        self.entries: dict[str, dict] = {}
        if self.path is not None and self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, ValueError) as error:
                raise ResumeError(f"cannot resume from {self.path}: not a search verification file ({error})") from None
            _check_same_run(data.get("run"), self.run, self.path)
            self.entries = data["entries"]

    def has(self, toml: str) -> bool:
        return digest(toml) in self.entries

    def get(self, toml: str) -> dict | NoiseFloor | None:
        entry = self.entries.get(digest(toml))
        if entry is None:
            return None
        return NoiseFloor.from_dict(entry["noise_floor"]) if "noise_floor" in entry else entry["metrics"]

    def put(self, toml: str, measured: dict | NoiseFloor) -> None:
        if self.path is None:
            return
        entry = {"noise_floor": measured.to_dict()} if isinstance(measured, NoiseFloor) else {"metrics": measured}
        self.entries[digest(toml)] = entry
        _write_json(self.path, json.dumps({"run": self.run, "entries": self.entries}))
