"""SmolLM2-135M-Instruct (Llama architecture, offline) perplexity on pydoc text under every MX format.

Weights come from a Q4_1 GGUF file, so weight-side results are optimistic; activation and attention
results are real. Every linear but lm_head quantized (weights and inputs, blocks of 32 along
in_features); "+ attention" also quantizes Q, K, V and P of every self-attention.

    python examples/smollm2_perplexity.py [--windows 4] [--length 256] [--mixed mixed.toml]
"""

import argparse
import time
import warnings

from tabulate import tabulate

import mxfx
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.testing import pretrained

warnings.filterwarnings("ignore")
FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8"]


def config(fmt: str, attention: bool) -> QuantConfig:
    spec = MXSpec(fmt)
    rules = [Rule(match=r".*self_attn", attention=AttentionSpec(spec, spec, spec, spec))] if attention else []
    return QuantConfig((*rules, Rule(match="lm_head", skip=True), Rule(match=".*", weight=spec, activation=spec)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--mixed", help="also evaluate this TOML config (e.g. from mxfx search)")
    parser.add_argument("--no-attention", action="store_true")
    args = parser.parse_args()
    model, tokenizer = pretrained.load_smollm2()
    windows = pretrained.token_windows(tokenizer, args.windows, args.length)
    base = pretrained.perplexity(model, windows)
    rows = [["fp32", f"{base:.3f}", "-", "-", "-"]]
    variants = [(fmt, [config(fmt, False)] + ([] if args.no_attention else [config(fmt, True)])) for fmt in args.formats.split(",")]
    if args.mixed:
        variants.append((f"mixed ({args.mixed})", [mxfx.load_config(args.mixed)]))
    for name, configs in variants:
        start = time.perf_counter()
        row = [name]
        for cfg in configs:
            ppl = pretrained.perplexity(mxfx.prepare(model, cfg, (windows[:1],)), windows)
            row += [f"{ppl:.3f}", f"{100 * (ppl / base - 1):+.1f}%"]
        rows.append(row + ["-"] * (5 - len(row)))
        print(f"{name}: {time.perf_counter() - start:.1f} s", flush=True)
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF weights), {args.windows} windows x {args.length} tokens of pydoc text")
    print(tabulate(rows, headers=["format", "linears: ppl", "vs fp32", "+ attention: ppl", "vs fp32"], tablefmt="github"))


if __name__ == "__main__":
    main()
