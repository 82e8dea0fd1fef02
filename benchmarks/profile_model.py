"""Where a compiled prepared model's time goes: torch.profiler's self CPU time per op, fp vs MX.

    python benchmarks/profile_model.py [--model vit] [--dtype fp32] [--layers 2] [--batch 8] [--calls 5]

The model and configs are bench_model.py's (its `build` and `linear_config`): the fp model compiled,
then MXFP8 W+A with packed weights, with and without quantized attention, each compiled with the
shared ops (the CPU default). A table per variant: the ops with the most self CPU time over
`--calls` calls (after a warm-up call), and the total. Default allocator, one process.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

import mxfx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import build, linear_config  # noqa: E402

warnings.filterwarnings("ignore")


def profile(fn, inputs, calls: int) -> tuple[float, list[tuple[str, float]]]:
    with torch.no_grad():
        fn(*inputs)  # compile and warm up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                fn(*inputs)
    events = prof.key_averages()
    rows = sorted(((e.key, e.self_cpu_time_total / 1e3 / calls) for e in events), key=lambda r: -r[1])
    return sum(r[1] for r in rows), rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--calls", type=int, default=5)
    parser.add_argument("--top", type=int, default=8)
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model, inputs, _ = build(args.model, args.layers, args.batch)
    model = model.to(dtype)
    inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)
    variants = {"fp": model,
                "MXFP8 W+A packed": mxfx.prepare(model, linear_config("fp8_e4m3", "fp8_e4m3", "packed"), inputs),
                "MXFP8 W+A + attention, packed": mxfx.prepare(
                    model, linear_config("fp8_e4m3", "fp8_e4m3", "packed", attention=True), inputs)}
    print(f"profile_model: {args.model} {args.dtype}, {args.layers} layers, batch {args.batch}, compiled, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d %H:%M')}, default allocator, self CPU ms per call "
          f"(mean of {args.calls}), load average " + " ".join(f"{v:.2f}" for v in os.getloadavg()))
    for label, module in variants.items():
        total, rows = profile(torch.compile(module), inputs, args.calls)
        table = [[name, f"{ms:.1f}", f"{100 * ms / total:.0f}%"] for name, ms in rows[: args.top]]
        print(f"\n{label}: {total:.1f} ms self CPU per call")
        print(tabulate(table, headers=["op", "ms", "share"], tablefmt="github"))


if __name__ == "__main__":
    main()
