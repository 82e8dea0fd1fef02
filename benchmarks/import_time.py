"""What `import mxfx` costs on top of `import torch`, in fresh processes.

    python benchmarks/import_time.py [--runs 9]

Each run is a new interpreter that times `import torch`, then `import mxfx`, with perf_counter.
A pip-installed mxfx has its bytecode compiled at install time; a checkout run with
PYTHONDONTWRITEBYTECODE=1 (or a read-only tree) compiles every module from source on each import,
so both are measured: "cached bytecode" (the package is byte-compiled into a temporary copy first)
and "from source" (no bytecode written or read for mxfx). Also counted: the `torch._inductor`
modules `import mxfx` loads (none: Inductor code is loaded at the first compile).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import sys, time
t0 = time.perf_counter(); import torch; t1 = time.perf_counter()
before = {m for m in sys.modules if m.startswith("torch._inductor")}
import mxfx; t2 = time.perf_counter()
print(t1 - t0, t2 - t1, len({m for m in sys.modules if m.startswith("torch._inductor")} - before), mxfx.__file__)
"""


def copy_package(target: Path) -> None:
    """mxfx as an installed package would lay it out (mxfx.passes and mxfx.configs inside)."""
    shutil.copytree(ROOT / "mxfx", target / "mxfx", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "passes", target / "mxfx" / "passes", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "configs", target / "mxfx" / "configs", ignore=shutil.ignore_patterns("__pycache__"))


def measure(tree: Path, bytecode: bool, runs: int) -> list[tuple[float, float, int]]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if not bytecode:
        env["PYTHONDONTWRITEBYTECODE"] = "1"
    out = []
    for _ in range(runs):
        result = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=tree, capture_output=True, text=True,
                                check=True)
        torch_s, mxfx_s, inductor, path = result.stdout.split()
        assert path.startswith(str(tree)), path  # the copy, not an installed or editable mxfx
        out.append((float(torch_s), float(mxfx_s), int(inductor)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as cached, tempfile.TemporaryDirectory() as plain:
        copy_package(Path(cached))
        copy_package(Path(plain))
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(cached) / "mxfx")], check=True,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"})
        for label, tree, bytecode in (("cached bytecode (pip install)", Path(cached), True),
                                      ("from source (no bytecode)", Path(plain), False)):
            results = measure(tree, bytecode, args.runs)
            torch_s = [r[0] for r in results]
            mxfx_s = [r[1] for r in results]
            rows.append([label, f"{min(torch_s):.2f} / {statistics.median(torch_s):.2f}",
                         f"{min(mxfx_s):.3f} / {statistics.median(mxfx_s):.3f} / {max(mxfx_s):.3f}",
                         max(r[2] for r in results)])
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"import_time: {args.runs} fresh processes each; {time.strftime('%Y-%m-%d')}; python "
          f"{sys.version.split()[0]}; load average {load} after")
    print(tabulate(rows, headers=["mxfx bytecode", "import torch s (min / median)",
                                  "import mxfx after torch s (min / median / max)", "torch._inductor modules loaded"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
