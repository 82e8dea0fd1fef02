"""Run a benchmark in fresh processes under several memory allocators and summarize the spread.

Why: under glibc's default malloc a freed multi-MB block goes back to the OS (mmap threshold,
trim threshold), so every fresh output of that size page-faults again: ~11 ms per 32 MB on the
project's machine. A quantized model allocates more fresh buffers than the fp model, so its ratio
depends on the allocator, and moves from run to run with whatever else the machine does. Users
run the default allocator, so the benchmarks report it first; a tuned allocator (raised glibc
thresholds, or jemalloc/tcmalloc by `LD_PRELOAD` where one is installed) is a labelled second
column: what a user can get by setting one environment variable.

The parent process runs the measurement `--runs` times per allocator, each time in a fresh child
process (the same script with `--child RUN`), runs interleaved across allocators (run 1 of each, then
run 2 of each, ...), so that load drifting on a shared machine spreads over all columns. A child
prints one JSON line; the parent prints per cell the median over the runs and its range:
`1.21 (1.12-1.37)`.
"""

from __future__ import annotations

import datetime
import glob
import json
import os
import statistics
import subprocess
import sys
import time

import torch

GLIBC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"
PRELOAD_NAMES = {"jemalloc": ("libjemalloc.so.2", "libjemalloc.so"),
                 "tcmalloc": ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")}
LIB_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib",
            "/lib/x86_64-linux-gnu", "/lib64")
MARKER = "MXFX_BENCH_JSON "
# Variables that change the allocator: the "default" column clears them all.
ALLOCATOR_VARS = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
                  "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX", "MALLOC_CONF", "TCMALLOC_RELEASE_RATE")


def find_library(kind: str) -> str | None:
    """Path of an installed jemalloc or tcmalloc shared library, or None."""
    names = PRELOAD_NAMES[kind]
    try:
        listing = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
    except OSError:
        listing = ""
    for name in names:
        for line in listing.splitlines():
            if line.strip().startswith(name + " ") and "=>" in line:
                return line.split("=>")[-1].strip()
    for directory in LIB_DIRS:
        for name in names:
            found = sorted(glob.glob(os.path.join(directory, name)))
            if found:
                return found[0]
    return None


def default_allocators() -> str:
    """`default,glibc-tunables`, plus jemalloc and tcmalloc where installed."""
    return ",".join(["default", "glibc-tunables", *(kind for kind in PRELOAD_NAMES if find_library(kind))])


def allocator_settings(spec: str) -> tuple[list[tuple[str, dict]], list[str]]:
    """([(column label, env changes)], [notes on allocators asked for but absent]).

    `spec` is a comma-separated list of `default`, `glibc-tunables`, `jemalloc`, `tcmalloc`, or
    `jemalloc=/path/to/libjemalloc.so.2` (any name=path: LD_PRELOAD of that library).
    """
    settings, notes = [], []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, _, path = item.partition("=")
        if name == "default" and not path:
            settings.append(("default (glibc malloc)", {}))
        elif name == "glibc-tunables" and not path:
            settings.append((f"GLIBC_TUNABLES={GLIBC_TUNABLES}", {"GLIBC_TUNABLES": GLIBC_TUNABLES}))
        elif path or name in PRELOAD_NAMES:
            path = path or find_library(name)
            if path is None or not os.path.exists(path):
                notes.append(f"{name}: no shared library found ({', '.join(PRELOAD_NAMES.get(name, (path or name,)))} "
                             f"not in `ldconfig -p` nor {', '.join(LIB_DIRS[:2])}, ...): column skipped")
                continue
            settings.append((f"LD_PRELOAD={path}", {"LD_PRELOAD": path}))
        else:
            raise SystemExit(f"unknown allocator {item!r}: use default, glibc-tunables, jemalloc, tcmalloc or name=/path/lib.so")
    for kind in PRELOAD_NAMES:
        if not any(s.partition("=")[0] == kind for s in spec.split(",")) and find_library(kind) is None:
            notes.append(f"{kind}: not installed on this machine (no {PRELOAD_NAMES[kind][0]} found)")
    if not settings:
        raise SystemExit("no allocator left to measure")
    return settings, notes


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def child_env(changes: dict, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_VARS}
    return {**env, **changes, **extra}


def emit(result: dict) -> None:
    """In a child: report `result` to the parent (one JSON line on stdout), with what was loaded."""
    with open("/proc/self/maps") as f:
        mapped = sorted({line.split()[-1] for line in f if "jemalloc" in line or "tcmalloc" in line})
    result = {**result, "threads": torch.get_num_threads(), "torch": torch.__version__, "preloaded": mapped,
              "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}
    print(MARKER + json.dumps(result), flush=True)


def run_children(script: str, argv: list[str], settings: list[tuple[str, dict]], runs: int,
                 extra_env: dict | None = None) -> dict[str, list[dict]]:
    """{column label: [child result per run]}; runs interleaved across allocators, default first."""
    results: dict[str, list[dict]] = {label: [] for label, _ in settings}
    for run in range(runs):
        for label, changes in settings:
            print(f"[run {run + 1}/{runs}, {label}, load {loadavg()}]", file=sys.stderr, end=" ", flush=True)
            start = time.perf_counter()
            # A child's stderr (warnings, Inductor's logs of an expected failure) is shown only if it fails.
            proc = subprocess.run([sys.executable, script, *argv, "--child", str(run + 1)],
                                  env=child_env(changes, extra_env or {}), capture_output=True, text=True, check=False)
            lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"child run failed (exit {proc.returncode}) under {label}:\n"
                                 f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            result = json.loads(lines[-1][len(MARKER):])
            print(f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
            want = changes.get("LD_PRELOAD")
            if want and not any(os.path.realpath(want) == os.path.realpath(p) for p in result["preloaded"]):
                raise SystemExit(f"LD_PRELOAD={want} was not loaded by the child (mapped: {result['preloaded']})")
            results[label].append(result)
    return results


def spread(values: list[float], fmt: str = "{:.2f}", suffix: str = "") -> str:
    """`median (min-max)` of `values`; just the value when there is one, `-` when none."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = fmt.format(statistics.median(values)) + suffix
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def header(title: str, results: dict[str, list[dict]], runs: int, load_before: str, notes: list[str]) -> str:
    """The caption: date, torch, threads, load, and what each allocator column set."""
    first = next(iter(results.values()))[0]
    lines = [f"{title}",
             f"date {datetime.date.today().isoformat()}; torch {first['torch']}; {first['threads']} threads; "
             f"load average (1/5/15 min) {load_before} before, {loadavg()} after; {runs} runs per allocator, "
             f"each a fresh process; cells: median (min-max) over the runs"]
    for i, label in enumerate(results, 1):
        lines.append(f"  allocator [{i}]: {label}")
    lines.extend(f"  note: {note}" for note in notes)
    return "\n".join(lines)


def short(label: str, index: int) -> str:
    """A column tag: `[1] default`, `[2] tuned` ..."""
    if label.startswith("default"):
        return f"[{index}] default"
    if label.startswith("GLIBC_TUNABLES"):
        return f"[{index}] glibc tunables"
    return f"[{index}] {os.path.basename(label.split('=', 1)[1]).split('.so')[0].removeprefix('lib')}"
