"""What dequantizing packed weights on every call costs, and what Inductor freezing saves (issue #15).

    python benchmarks/bench_freezing.py [--layers 2] [--batch 8] [--rounds 10] [--threads 1]

bench_model's nanoGPT (d=512, 128 tokens), MXFP8 weights and activations, simulated vs packed
weight storage, each compiled plainly and under `mxfx.frozen_weights()` (Inductor freezing:
the weights become constants and the dequantize of packed codes is folded at compile time).
One process, timed interleaved; `ms` is the minimum over the rounds; ratios are vs the fp32
model compiled plainly. Also checks that the frozen outputs equal the plain compiled outputs
bit for bit.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import mxfx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, inputs, _ = bench_model.build("nanogpt", args.layers, args.batch)
    program = mxfx.export(model, inputs)
    modules = {"fp32": model}
    for storage in ("simulated", "packed"):
        config = bench_model.linear_config("fp8_e4m3", "fp8_e4m3", storage)
        modules[storage] = mxfx.prepare(program, config, inputs)
    fns, outputs = {}, {}
    with torch.no_grad():
        for name, module in modules.items():
            for frozen in (False, True):
                if frozen and name == "fp32":
                    continue
                label = f"{name}{', frozen' if frozen else ''}"
                torch._dynamo.reset()
                fn = torch.compile(module)
                if frozen:
                    with mxfx.frozen_weights():
                        outputs[label] = fn(*inputs)  # compiles with freezing
                else:
                    outputs[label] = fn(*inputs)
                fns[label] = fn
        times = {label: [] for label in fns}
        for _ in range(args.rounds):
            for label, fn in fns.items():
                start = time.perf_counter()
                fn(*inputs)
                times[label].append(time.perf_counter() - start)
    best = {label: min(t) * 1e3 for label, t in times.items()}
    print(f"nanogpt {args.layers} layers, batch {args.batch}x128, {torch.get_num_threads()} thread(s), "
          f"min of {args.rounds} interleaved rounds, torch {torch.__version__}")
    print("| variant | ms | vs fp32 compiled | frozen == plain, bitwise |")
    print("|---|---|---|---|")
    for label, ms in best.items():
        plain = label.removesuffix(", frozen")
        same = "-" if plain == label else str(torch.equal(outputs[label].view(torch.int32), outputs[plain].view(torch.int32)))
        print(f"| {label} | {ms:.1f} | {ms / best['fp32']:.2f}x | {same} |")


if __name__ == "__main__":
    main()
