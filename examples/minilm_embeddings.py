"""The main demo: all-MiniLM-L6-v2 (real fp32 weights, offline) under every MX format.

Cosine similarity of quantized vs fp32 sentence embeddings over 48 sentences of pydoc text, with
the linears only and with the attention matmuls too, through mxfx.prepare (eager reference ops);
the MXFP8 E4M3 row is also run through torch.compile (all rows with --compile-all).

    python examples/minilm_embeddings.py [--compile-all]
"""

import argparse
import time
import warnings

import torch
from tabulate import tabulate

import mxfx
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.testing import pretrained

warnings.filterwarnings("ignore")
FORMATS = ["fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "fp4_e2m1", "int8"]


def config(fmt: str, attention: bool) -> QuantConfig:
    spec = MXSpec(fmt)
    rules = [Rule(match=r".*attention\.self", attention=AttentionSpec(spec, spec, spec, spec))] if attention else []
    return QuantConfig((*rules, Rule(match=".*", weight=spec, activation=spec)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-all", action="store_true", help="torch.compile every variant (slow on CPU)")
    args = parser.parse_args()
    model, tokenizer = pretrained.load_minilm()
    texts = pretrained.sentences(48)
    reference = pretrained.embed(model, tokenizer, texts)
    example_args, example_kwargs = pretrained.minilm_example_inputs(tokenizer, texts)
    rows, compiled_rows = [], []
    for fmt in FORMATS:
        row = [fmt]
        for attention in (False, True):
            start = time.perf_counter()
            prepared = mxfx.prepare(model, config(fmt, attention), example_args, example_kwargs=example_kwargs)
            if fmt == "fp8_e4m3" and attention:
                print(mxfx.summary(prepared).table(), "\n")
            cosine = (pretrained.embed(prepared, tokenizer, texts) * reference).sum(-1)
            row += [f"{cosine.mean():.4f}", f"{cosine.min():.4f}"]
            if args.compile_all or (fmt == "fp8_e4m3" and not attention):
                compiled = (pretrained.embed(torch.compile(prepared), tokenizer, texts) * reference).sum(-1)
                compiled_rows.append([fmt, "+ attention" if attention else "linears", f"{compiled.mean():.4f}",
                                      f"{(compiled - cosine).abs().max():.1e}"])
                torch._dynamo.reset()
        rows.append(row)
        print(f"{fmt}: done ({time.perf_counter() - start:.1f} s for the last variant)", flush=True)
    print("\nall-MiniLM-L6-v2, 48 pydoc sentences: cosine(quantized, fp32) of mean-pooled embeddings; "
          "every linear's weights and inputs, blocks of 32 along in_features")
    print(tabulate(rows, headers=["format", "linears: mean", "min", "+ attention: mean", "min"], tablefmt="github"))
    print("\ntorch.compile (Inductor) vs eager:")
    print(tabulate(compiled_rows, headers=["format", "sites", "compiled mean cosine", "max |compiled - eager|"], tablefmt="github"))


if __name__ == "__main__":
    main()
