"""Compiled vs eager, per architecture: where does a prepared model's compiled run part from its eager run?

For each architecture of the test zoo (tiny random configs, `tests/zoo_models.py`), every linear is
prepared in MXFP8 E4M3 (weights and activations) and every attention is quantized too (Q, K, V, P in
E4M3), then `mxfx.analysis.divergence.compare` runs the graph eagerly and through Inductor on the same inputs.
The table lists the ops that compute differently compiled on identical inputs (the origins of any
difference), the first MX site whose input differs, and how far the outputs end apart.

    python benchmarks/divergence_zoo.py [--models bert,llama,...] [--threads 1]
"""

import argparse
import sys
import time
import warnings

import torch
from tabulate import tabulate

import mxfx
from mxfx.analysis.divergence import compare
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.testing import zoo as zoo_models

warnings.filterwarnings("ignore")


def config() -> QuantConfig:
    spec = MXSpec("fp8_e4m3")
    return QuantConfig((Rule(match=".*", weight=spec, activation=spec,
                             attention=AttentionSpec(spec, spec, spec, spec)),))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(sorted(zoo_models.ZOO)))
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        start = time.perf_counter()
        model, inputs, kwargs = zoo_models.ZOO[name]()
        prepared = mxfx.prepare(model, config(), inputs, example_kwargs=kwargs)
        torch._dynamo.reset()
        report = compare(prepared, *inputs, **kwargs)
        first = report.first_site
        local = ", ".join(f"{op} x{n}" for op, n in report.local_ops().items()) or "none"
        out = report.output
        rows.append([name, local, f"{first.site or first.node}" if first else "none",
                     "bitwise equal" if out.equal else f"{out.count}/{out.numel} differ, rel L2 {out.rel_l2:.1e}"])
        print(f"{name}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(f"torch {torch.__version__}, MXFP8 E4M3 W+A linears and Q/K/V/P attention, compiled (Inductor) vs eager")
    print(tabulate(rows, headers=["architecture", "ops that compute differently compiled (same inputs)",
                                  "first MX site whose input differs", "module output"], tablefmt="github"))


if __name__ == "__main__":
    main()
