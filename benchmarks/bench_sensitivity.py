"""Time of each sensitivity mode, the gradient-mode losses and the search, on the nanoGPT-style model.

    python benchmarks/bench_sensitivity.py [--layers 2] [--d 128] [--modes local,isolated,all-but-one]
"""

import argparse
import time
import warnings

import torch
from tabulate import tabulate

import mxfx
from mxfx.analysis.search import measure
from mxfx.testing.models import NanoGPT

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--formats", default="fp8_e4m3,fp6_e2m3,fp4_e2m1")
    parser.add_argument("--modes", default="local,isolated,all-but-one", help="sensitivity modes to time ('' for none)")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = NanoGPT(vocab=512, d=args.d, n_layer=args.layers, n_head=4, block_size=64)
    batches = [torch.randint(0, 512, (4, 64)) for _ in range(2)]
    formats = args.formats.split(",")
    rows = []
    for mode in filter(None, args.modes.split(",")):
        start = time.perf_counter()
        report = mxfx.sensitivity(model, batches, formats, mode=mode, progress=None)
        elapsed = time.perf_counter() - start
        top = report.sorted_rows()[0]
        rows.append([mode, len(report.rows), f"{elapsed:.1f}", f"{elapsed / len(report.rows) * 1e3:.0f}", f"{top['site']} / {top['format']}"])
    print(f"nanoGPT-style, {args.layers} layers, d={args.d}, 2 batches of 4 x 64 tokens, formats {formats}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(tabulate(rows, headers=["mode", "measurements", "seconds", "ms each", "most sensitive (site / format)"], tablefmt="github"))
    candidates = [(f, f) for f in formats]
    start = time.perf_counter()
    losses = measure(model, batches, candidates, mode="gradient", progress=None)
    measured = time.perf_counter() - start
    start = time.perf_counter()
    mxfx.search(model, batches, candidates=candidates, budget_bits=6.25, report=mxfx.SensitivityReport(losses, "gradient"),
                progress=None)
    solved = time.perf_counter() - start
    start = time.perf_counter()
    front = mxfx.search(model, batches, candidates=candidates, budgets=[4.5, 5.25, 6.25, 7.25], progress=None)
    total = time.perf_counter() - start
    print()
    print(tabulate([["gradient losses (one forward + backward per batch)", len(losses), f"{measured:.1f}"],
                    ["search, one budget, given the losses (solve + export + prepare + evaluate)", 1, f"{solved:.1f}"],
                    ["search, front of 4 budgets + uniform references (all included)", len(front.points), f"{total:.1f}"]],
                   headers=["step", "rows / points", "seconds"], tablefmt="github"))


if __name__ == "__main__":
    main()
