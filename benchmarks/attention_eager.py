"""Eager MX attention on a long sequence: `mxfx::attention` vs SDPA and vs the unfused fp32 math.

    python benchmarks/attention_eager.py [--tokens 1500] [--heads 8] [--head-dim 64] [--repeats 5]

The default shape is the Whisper-base encoder's self-attention on 30 s of audio (1500 frames).
The MX op quantizes Q, K, V and the softmax output P (MXFP8 E4M3, block 32) and materializes the
fp32 scores and P, as the unfused math `softmax(Q K^T * scale) @ V` does; SDPA's CPU kernel is
flash-style and materializes neither. Times: min / median of `--repeats` calls; one process, the
rows side by side; MXFX_NATIVE_KERNELS=0 for the reference-math column.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch
from tabulate import tabulate

import mxfx  # noqa: F401  (registers torch.ops.mxfx)

SPEC = "fp8_e4m3/32/floor/even"


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times) * 1e3, statistics.median(times) * 1e3


def measure(args) -> dict[str, tuple[float, float]]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, args.heads, args.tokens, args.head_dim) for _ in range(3))
    scale = args.head_dim**-0.5

    def unfused():
        return torch.softmax((q @ k.transpose(-1, -2)) * scale, -1) @ v

    return {
        "SDPA (fp32)": timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), args.repeats),
        "unfused fp32 math": timed(unfused, args.repeats),
        "mxfx attention, MXFP8 Q/K/V/P": timed(
            lambda: torch.ops.mxfx.attention(q, k, v, None, False, None, False, SPEC, SPEC, SPEC, SPEC), args.repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1500)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(repr(measure(args)))
        return
    columns = {}
    for label, native in (("C quantizers (default)", "1"), ("reference math (MXFX_NATIVE_KERNELS=0)", "0")):
        env = dict(os.environ, MXFX_NATIVE_KERNELS=native)
        out = subprocess.run([sys.executable, __file__, "--child", *sys.argv[1:]], env=env, capture_output=True,
                             text=True, check=True).stdout.strip().splitlines()[-1]
        columns[label] = eval(out)  # noqa: S307  (our own child's repr of a dict of floats)
    first = next(iter(columns.values()))
    rows = []
    for name in first:
        row = [name]
        for values in columns.values():
            best, median = values[name]
            row += [f"{best:.1f} / {median:.1f}", f"{best / values['SDPA (fp32)'][0]:.2f}x",
                    f"{best / values['unfused fp32 math'][0]:.2f}x"]
        rows.append(row)
    headers = ["eager"]
    for label in columns:
        headers += [f"ms min / median, {label}", "vs SDPA", "vs unfused"]
    print(f"attention_eager: (1, {args.heads}, {args.tokens}, {args.head_dim}) fp32, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d')}, torch {torch.__version__}, default allocator, load average "
          + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    print(tabulate(rows, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
