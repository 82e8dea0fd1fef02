"""Resume for GPTQ (`mxfx.prepare(..., gptq_resume=path)`): each site's result is saved as soon as it
is computed, so a prepare that was interrupted, run again with the same path, computes only the
sites not saved yet.

The unit of work is the site: a linear's weight (GPTQWeightsPass), or an expert site's whole stack of
expert matrices (GPTQExpertsPass). An interrupted run resumed loses at most the site it was in. The
calibration forward pass that records every site's Hessian is not a unit: a resumed run runs it
again when any site is left (those sites need their Hessians), and skips it when every site is saved.

Layout: `path` is a directory with one file per site, `<site name>-<digest>.pt` (`torch.save`, read
back with `torch.load(weights_only=True)`), written to a temporary name and moved into place with
`os.replace`: an interrupt leaves a site's whole file or none. A directory rather than one file,
because one file would be rewritten whole after every site (work quadratic in the model's size; a
large model's results are gigabytes), while a file per site is written once.

A file holds the site's result (the weight as the pass stores it, and its MX codes and scales as GPTQ
computed them; for an expert site, also the experts no calibration token reached) and what defines
it, checked before the file is used:
- the run: digests of the calibration batches and of the graph's parameters and buffers when the
  GPTQ pass starts (after rotation);
- the site: kind and name, the weight's MXSpec, GPTQ's dampening, a digest of the weight GPTQ
  quantizes and, once calibration has run, of the site's Hessian (per expert for an expert site).
A file that differs in any of them is refused with a `ResumeError` naming the file, the site and
what differs. The digests are of exact bits: a run whose Hessian sums come out in other bits (other
hardware or a reduction of another order) refuses the file too, rather than mix two runs' results.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from mxfx.errors import ResumeError
from mxfx.numerics.api import MXData
from mxfx.recovery.gptq import DAMP
from mxfx.resume_files import digest, replace_atomically

VERSION = 1
_WHAT = {  # record key -> how a refusal names it
    "version": "the file format version",
    "batches": "the calibration batches", "parameters": "the model's parameters and buffers",
    "kind": "the site's kind", "spec": "the weight's MXSpec", "damp": "GPTQ's dampening",
    "weight": "the weight", "hessian": "the Hessian (other calibration data, or other weights before the site)",
}


def run_record(named_tensors, batches: list[list]) -> dict:
    """What defines a GPTQ pass's run: digests of its calibration batches (each a list of input
    leaves) and of the graph's (name, tensor) parameters and buffers."""
    leaves = [leaf for batch in batches for leaf in batch]
    return {"version": VERSION, "batches": digest(len(batches), *leaves),
            "parameters": digest(*(part for name, t in named_tensors for part in (name, t)))}


def site_record(kind: str, fqn: str, spec, weight: torch.Tensor) -> dict:
    """What defines one site's GPTQ result, before calibration (its Hessian digest is added after)."""
    return {"kind": kind, "site": fqn, "spec": repr(spec), "damp": DAMP, "weight": digest(weight)}


class GPTQResume:
    """A directory of saved GPTQ site results (see the module docstring), for the run `run` (`run_record`)."""

    def __init__(self, path: str | Path, run: dict) -> None:
        self.path, self.run = Path(path), run
        if self.path.exists() and not self.path.is_dir():
            raise ResumeError(f"gptq_resume={str(path)!r} is a file; it names a directory (one file per site): "
                              "pass a directory path")
        self.path.mkdir(parents=True, exist_ok=True)

    def file(self, record: dict) -> Path:
        name = re.sub(r"[^\w.-]", "_", record["site"])[:100]
        return self.path / f"{name}-{digest(record['kind'], record['site'])[:8]}.pt"

    def load(self, record: dict) -> dict | None:
        """The saved result of the site `record` describes, or None. A file of another run is refused."""
        file = self.file(record)
        if not file.is_file():
            return None
        try:
            saved = torch.load(file, weights_only=True)
            saved_run, saved_site = saved["run"], saved["site"]
        except Exception as error:  # noqa: BLE001 - any unreadable file gets the same advice
            raise ResumeError(f"cannot resume GPTQ from {file}: not a GPTQ resume file ({error}). Delete it or "
                              "pass another gptq_resume path.") from None
        differing = [key for key in ("version", "batches", "parameters") if saved_run.get(key) != self.run[key]]
        differing += [key for key in record if key != "hessian" and saved_site.get(key) != record[key]]
        if differing:
            self._refuse(file, record, saved_site, differing)
        return saved

    def load_all(self, records: dict) -> dict:
        """{key: saved result} for the records (`{key: site_record}`) whose site is saved here."""
        found = {key: self.load(record) for key, record in records.items()}
        return {key: saved for key, saved in found.items() if saved is not None}

    def check_hessian(self, saved: dict, record: dict) -> None:
        """Refuse a saved result whose Hessian digest differs from the one `record` now holds."""
        if saved["site"].get("hessian") != record["hessian"]:
            self._refuse(self.file(record), record, saved["site"], ["hessian"])

    def save(self, record: dict, q: torch.Tensor, data: MXData, **extra) -> None:
        """Save one site's result (atomically)."""
        fields = {"codes": data.codes, "scales": data.scales, "elem_format": data.elem_format,
                  "block_size": data.block_size, "axis": data.axis, "shape": list(data.shape),
                  "dtype": str(data.dtype).removeprefix("torch."), "scale_mode": data.scale_mode,
                  "rounding": data.rounding}
        entry = {"run": self.run, "site": record, "q": q.detach().cpu(), "data": fields, **extra}
        replace_atomically(self.file(record), lambda tmp: torch.save(entry, tmp))

    @staticmethod
    def result(saved: dict, device: torch.device) -> tuple[torch.Tensor, MXData]:
        """(q, data) of a loaded file, on `device`."""
        d = saved["data"]
        data = MXData(d["codes"].to(device), d["scales"].to(device), d["elem_format"], d["block_size"], d["axis"],
                      tuple(d["shape"]), getattr(torch, d["dtype"]), d["scale_mode"], d["rounding"])
        return saved["q"].to(device), data

    def _refuse(self, file: Path, record: dict, saved: dict, differing: list[str]) -> None:
        details = []
        for key in differing:
            if key in ("spec", "damp", "kind"):
                details.append(f"{_WHAT[key]} ({saved.get(key)!r} != {record[key]!r})")
            else:
                details.append(_WHAT.get(key, key))
        raise ResumeError(f"cannot resume GPTQ from {file}: it was written by another run; site {record['site']}: "
                          f"differing {', '.join(details)}. Delete the file (or the directory {self.path}) or pass "
                          "another gptq_resume path.")
