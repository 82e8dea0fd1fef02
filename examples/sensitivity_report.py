"""Per-layer sensitivity of SmolLM2-135M under MX formats, then a gradient-mode mixed-precision search.

Weights come from a Q4_1 GGUF file (weight-side results are optimistic).

    python examples/sensitivity_report.py [--budget-bits 6.25] [--out mixed.toml] [--layers 0,1]
"""

import argparse
import time
import warnings

import mxfx
from mxfx.testing import pretrained

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-bits", type=float, default=6.25)
    parser.add_argument("--formats", default="fp8_e4m3,fp6_e2m3,fp4_e2m1")
    parser.add_argument("--out", default="mixed.toml")
    parser.add_argument("--report", default="sensitivity.json", help="also the resume file")
    args = parser.parse_args()
    model, tokenizer = pretrained.load_smollm2()
    batch = pretrained.token_windows(tokenizer, 1, 128)
    formats = args.formats.split(",")
    sites = [f"model.layers.{i}.{name}" for i in range(30) for name in
             ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]

    def progress(done, total, elapsed, label):
        if done % 50 == 0 or done == total:
            print(f"  {done}/{total} {label}: {elapsed:.0f} s, ~{elapsed / done * (total - done):.0f} s left", flush=True)

    start = time.perf_counter()
    report = mxfx.sensitivity(model, (batch,), formats, mode="local", sites=sites, progress=progress, resume=args.report)
    print(f"local sensitivity, {len(report.rows)} measurements in {time.perf_counter() - start:.0f} s; the 15 most sensitive:")
    print("\n".join(report.table().splitlines()[:17]))
    start = time.perf_counter()
    _, result = mxfx.search(model, (batch,), formats, budget_bits=args.budget_bits, sites=sites, mode="gradient",
                            toml_path=args.out, progress=None)
    print(f"\ngradient-mode search for <= {args.budget_bits} bits/weight ({time.perf_counter() - start:.0f} s): "
          f"{result.average_bits:.3f} bits, {result.counts()}; model-output SQNR {result.measured['sqnr']:.2f} dB, "
          f"KL {result.measured['kl']:.4f}; wrote {args.out}")


if __name__ == "__main__":
    main()
