"""How much of a perplexity difference is signal? The noise floor of MX simulation on SmolLM2-135M.

Each config is measured once, then again under perturbations that keep the format (`mxfx.noise`):
N runs with a 1-ulp jitter on a random half of every quantizer's input, the batch of windows run
in two halves, and (with --compiled) the prepared model through `torch.compile`. The spread is
the largest minus the smallest perplexity over those runs: two configs whose perplexities differ by
less than the larger of their spreads are not distinguishable by this simulation.

    python examples/noise_smollm2.py [--windows 4] [--length 256] [--noise 4] [--compiled]
        [--configs fp8_e4m3,fp8_e4m3+rotation+mse,int8]
"""

import argparse
import math
import time
import warnings

import torch
from recovery_smollm2 import config  # this directory is on sys.path when run as a script
from tabulate import tabulate

import mxfx
from mxfx.analysis.noise import noise_floor
from mxfx.testing import pretrained

warnings.filterwarnings("ignore")


def perplexity(windows: torch.Tensor):
    """The `measure` callback: perplexity of the logits of each batch of windows."""
    def measure(outputs: list) -> dict[str, float]:
        total, count = 0.0, 0
        for out, batch in zip(outputs, windows[None]):
            logits = out.logits[:, :-1].float()
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
            count += batch[:, 1:].numel()
        return {"perplexity": math.exp(total / count)}
    return measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--noise", type=int, default=4, help="jittered repeats")
    parser.add_argument("--compiled", action="store_true", help="also run the prepared model compiled (minutes)")
    parser.add_argument("--configs", default="fp8_e4m3,fp8_e4m3+rotation+mse,fp6_e2m3,int8")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = pretrained.load_smollm2()
    windows = pretrained.token_windows(tokenizer, args.windows, args.length)
    measure = perplexity(windows)
    with torch.no_grad():
        base = measure([model(windows)])["perplexity"]
    program = mxfx.export(model, (windows,))
    sources = ("jitter", "split", "compiled") if args.compiled else ("jitter", "split")
    rows = []
    for name in args.configs.split(","):
        start = time.perf_counter()
        fmt, _, variant = name.partition("+")
        floor = noise_floor(mxfx.prepare(program, config(fmt, variant or "plain")), [(windows,)], measure, args.noise, sources)
        runs = ", ".join(f"{label}: {m['perplexity']:.3f}" for label, m in floor.runs)
        ppl, spread = floor.metrics["perplexity"], floor.spread("perplexity")
        rows.append([name, f"{ppl:.3f}", f"{100 * (ppl / base - 1):+.2f}%", f"{spread:.3f}",
                     f"{100 * spread / ppl:.2f}%", runs])
        print(f"{name}: {ppl:.3f} spread {spread:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    print(f"\nSmolLM2-135M-Instruct, {args.windows} windows x {args.length} tokens of pydoc text, fp32 perplexity "
          f"{base:.3f}; every linear but lm_head W+A; perturbations: {args.noise} jitters, {', '.join(sources[1:])}")
    print(tabulate(rows, headers=["config", "perplexity", "vs fp32", "spread", "spread / ppl", "perturbed runs"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
