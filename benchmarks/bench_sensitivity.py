"""Time of each sensitivity mode on the nanoGPT-style model (one process, side by side).

    python benchmarks/bench_sensitivity.py [--layers 2] [--d 128]
"""

import argparse
import time
import warnings

import torch
from tabulate import tabulate

import mxfx
from mxfx.model_zoo import NanoGPT

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--d", type=int, default=128)
    parser.add_argument("--formats", default="fp8_e4m3,fp6_e2m3,fp4_e2m1")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = NanoGPT(vocab=512, d=args.d, n_layer=args.layers, n_head=4, block_size=64)
    batches = [torch.randint(0, 512, (4, 64)) for _ in range(2)]
    formats = args.formats.split(",")
    rows = []
    for mode in ("local", "isolated", "all-but-one"):
        start = time.perf_counter()
        report = mxfx.sensitivity(model, batches, formats, mode=mode, progress=None)
        elapsed = time.perf_counter() - start
        top = report.sorted_rows()[0]
        rows.append([mode, len(report.rows), f"{elapsed:.1f}", f"{elapsed / len(report.rows) * 1e3:.0f}", f"{top['site']} / {top['format']}"])
    print(f"nanoGPT-style, {args.layers} layers, d={args.d}, 2 batches of 4 x 64 tokens, formats {formats}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(tabulate(rows, headers=["mode", "measurements", "seconds", "ms each", "most sensitive (site / format)"], tablefmt="github"))


if __name__ == "__main__":
    main()
