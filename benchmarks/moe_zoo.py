"""The mixture-of-experts zoo table: per architecture and experts implementation, the linear sites
mxfx finds against those the model's modules say it has, how many stacked expert weights are
quantized, and every site left in high precision with its reason (a config quantizing every linear
and every attention with MXFP8).

    .venv/bin/python benchmarks/moe_zoo.py            # Markdown table on stdout
    .venv/bin/python benchmarks/moe_zoo.py llama4     # some architectures only
"""

from __future__ import annotations

import warnings

import mxfx
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.graph.sites import EXPERT_FORMS, LINEAR
from mxfx.testing import moe

E4M3 = MXSpec("fp8_e4m3")
EVERYTHING = QuantConfig((Rule(match=".*", weight=E4M3, activation=E4M3, attention=AttentionSpec(E4M3, E4M3, E4M3, E4M3)),))


def main(architectures=None) -> None:
    print("| architecture | experts implementation | linear sites found / expected | expert weights quantized "
          "| attention sites quantized | left unquantized (reason) |")
    print("|---|---|---|---|---|---|")
    for arch in architectures or sorted(moe.MOE):
        for impl in moe.implementations(arch):
            model, args, kwargs = moe.MOE[arch](impl)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                prepared = mxfx.prepare(model, EVERYTHING, args, example_kwargs=kwargs)
            sites = prepared.mxfx_report.sites
            expected = moe.expected_linear_sites(model)
            linear = {s.fqn for s in sites if s.kind == LINEAR}
            found, extra = linear & expected, linear - expected
            experts = [s for s in sites if s.form in EXPERT_FORMS]
            attention = [s for s in sites if s.kind != LINEAR]
            left = "; ".join(f"{s.fqn} ({s.kind} {s.form}, {s.status}: {s.reason})" for s in sites if not s.quantized)
            extra_text = f" (+{len(extra)} not expected: {sorted(extra)})" if extra else ""
            print(f"| {arch} | {impl} | {len(found)} / {len(expected)}{extra_text} | "
                  f"{sum(s.quantized for s in experts)} / {len(experts)} | "
                  f"{sum(s.quantized for s in attention)} / {len(attention)} | {left or '-'} |", flush=True)


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
