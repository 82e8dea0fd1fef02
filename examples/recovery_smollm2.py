"""Accuracy recovery ablation on SmolLM2-135M-Instruct: block-Hadamard rotation, error-minimizing
(mse) scales and GPTQ, each through `mxfx.prepare`, as perplexity on pydoc text.

Every linear but lm_head is quantized (weights and inputs, or weights only), blocks of 32 along
in_features. GPTQ calibrates on windows that follow the evaluation windows in the text.

    python examples/recovery_smollm2.py [--windows 2] [--length 256] [--formats fp4_e2m1]
        [--variants plain,rotation,mse,rotation+mse,gptq+rotation+mse] [--weights-only] [--threads 1]
"""

import argparse
import logging
import time
import warnings

import torch
from tabulate import tabulate

import mxfx
from mxfx.graph.config import MXSpec, QuantConfig, Rule
from mxfx.testing import pretrained

warnings.filterwarnings("ignore")
VARIANTS = ["plain", "rotation", "mse", "rotation+mse", "gptq+rotation+mse"]


def config(fmt: str, variant: str, weights_only: bool = False, skip: tuple[str, ...] = ("lm_head",)) -> QuantConfig:
    """Every linear but `skip` in `fmt`, with the recovery techniques named in `variant`
    ("plain", or rotation / mse / gptq joined by '+'). Shared by the other recovery and noise examples."""
    parts = set(variant.split("+"))
    if not parts <= {"plain", "rotation", "mse", "gptq"}:
        raise SystemExit(f"unknown variant {variant!r}: combine rotation, mse and gptq with '+', or plain")
    spec = MXSpec(fmt, scale_mode="mse" if "mse" in parts else "floor")
    return QuantConfig((
        *(Rule(match=name, skip=True) for name in skip),
        Rule(match=".*", weight=spec, activation=None if weights_only else spec,
             rotation="hadamard" if "rotation" in parts else "",
             weight_rounding="gptq" if "gptq" in parts else "nearest"),
    ))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=4, help="calibration windows for GPTQ")
    parser.add_argument("--formats", default="fp8_e4m3,fp6_e2m3,fp4_e2m1")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--weights-only", action="store_true", help="quantize weights only")
    parser.add_argument("--verbose", action="store_true", help="log GPTQ progress")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is much "
                        "faster on an oversubscribed machine, where GPTQ's many small ops wait on thread barriers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tokenizer = pretrained.load_smollm2()
    text = pretrained.token_windows(tokenizer, args.windows + args.calibration, args.length)
    windows, calibration = text[: args.windows], text[args.windows :]
    base = pretrained.perplexity(model, windows)
    program = mxfx.export(model, (windows[:1],))  # traced once, prepared many times
    variants = args.variants.split(",")
    rows = []
    for fmt in args.formats.split(","):
        row = [fmt + (" weights only" if args.weights_only else " W+A")]
        for variant in variants:
            start = time.perf_counter()
            calib = [(w[None],) for w in calibration] if "gptq" in variant else None
            prepared = mxfx.prepare(program, config(fmt, variant, args.weights_only), calibration=calib)
            ppl = pretrained.perplexity(prepared, windows)
            row.append(f"{ppl:.3f} ({100 * (ppl / base - 1):+.1f}%)")
            print(f"{row[0]}, {variant}: {ppl:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        rows.append(row)
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF weights), {args.windows} windows x {args.length} tokens of pydoc text, "
          f"fp32 perplexity {base:.3f}; GPTQ calibration: {args.calibration} windows")
    print(tabulate(rows, headers=["format", *variants], tablefmt="github"))


if __name__ == "__main__":
    main()
