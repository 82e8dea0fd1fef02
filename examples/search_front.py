"""A mixed-precision front for SmolLM2-135M: gradient-mode search vs uniform MX formats, by perplexity.

Calibration: 2 windows of pydoc text (losses from one forward + backward pass each); evaluation:
perplexity on the 4 *following* windows, every config prepared from one `mxfx.export` program.
The 210 decoder linears are searched; `lm_head` stays in fp32. Weights come from a Q4_1 GGUF file
(weight-side results are optimistic).

    python examples/search_front.py [--budgets 4.5,5.25,6.25,7.25,8.25] [--plot examples/smollm2_front.png]
"""

import argparse
import time
import warnings

from tabulate import tabulate

import mxfx
from mxfx.analysis.search import measure, normalize_candidates
from mxfx.analysis.sensitivity import parse_candidates
from mxfx.testing import pretrained

warnings.filterwarnings("ignore")
CANDIDATES = "fp4_e2m1,fp4_e2m1:int8,fp6_e2m3,fp6_e2m3:int8,int8"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj",
           "mlp.down_proj")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="4.5,5.25,6.25,7.25,8.25")
    parser.add_argument("--candidates", default=CANDIDATES)
    parser.add_argument("--act-budget-bits", type=float, default=6.25,
                        help="also search this weight = activation budget (compare with uniform E2M3 at equal bits)")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--layers", type=int, default=30, help="search the first N decoder layers only (smoke runs)")
    parser.add_argument("--plot", default="examples/smollm2_front.png")
    parser.add_argument("--out", default="examples/smollm2_mixed_6.25bits.toml", help="TOML of the 6.25-bit point")
    args = parser.parse_args()
    model, tokenizer = pretrained.load_smollm2()
    windows = pretrained.token_windows(tokenizer, 6, args.length)
    calibration, held_out = [(w[None],) for w in windows[:2]], windows[2:]
    sites = [f"model.layers.{i}.{name}" for i in range(args.layers) for name in LINEARS]
    candidates = normalize_candidates(None, parse_candidates(args.candidates))
    base = pretrained.perplexity(model, held_out)
    print(f"fp32 perplexity on the held-out windows: {base:.3f}", flush=True)

    start = time.perf_counter()
    def progress(done, total, elapsed, label):
        if done % 100 == 0 or done == total:
            print(f"  losses {done}/{total}: {elapsed:.0f} s", flush=True)

    rows = measure(model, calibration, candidates, mode="gradient", sites=sites, progress=progress)
    report = mxfx.SensitivityReport(rows, "gradient")
    measured_s = time.perf_counter() - start

    def perplexity(prepared) -> float:
        value = pretrained.perplexity(prepared, held_out)
        print(f"  evaluated: ppl {value:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        return value

    budgets = [float(b) for b in args.budgets.split(",")]
    print(f"gradient-mode losses of {len(sites)} sites x {len(candidates)} candidates: {measured_s:.0f} s", flush=True)
    start = time.perf_counter()
    front = mxfx.search(model, calibration, candidates=candidates, budgets=budgets, sites=sites, report=report,
                        eval_fn=perplexity, metric="perplexity", plot=args.plot, progress=None)
    print(f"front verified in {time.perf_counter() - start:.0f} s\n")
    print(front.table())
    for point in front.searched():
        print(f"{point.label}: {point.result.counts()}")
        if point.result.budget_bits == 6.25 and args.out:
            with open(args.out, "w") as handle:
                handle.write(point.result.toml)
    if args.act_budget_bits:
        _, equal = mxfx.search(model, calibration, candidates=candidates, budget_bits=args.act_budget_bits,
                               act_budget_bits=args.act_budget_bits, sites=sites, report=report, eval_fn=perplexity,
                               metric="perplexity", progress=None)
        print(f"\nweights and activations both <= {args.act_budget_bits} bits: {equal.average_bits:.3f} / "
              f"{equal.average_activation_bits:.3f} bits, ppl {equal.measured['perplexity']:.3f}; {equal.counts()}")
    rows = [["fp32", "-", "-", f"{base:.3f}", "-"]]
    for p in sorted(front.points, key=lambda p: (p.weight_bits, p.label)):
        rows.append([p.label, f"{p.weight_bits:.3f}", f"{p.activation_bits:.3f}", f"{p.value:.3f}",
                     f"{100 * (p.value / base - 1):+.1f}%" + (" *" if p.on_front else "")])
    if args.act_budget_bits:
        rows.append([f"search {args.act_budget_bits:g}, act <= {args.act_budget_bits:g}", f"{equal.average_bits:.3f}",
                     f"{equal.average_activation_bits:.3f}", f"{equal.measured['perplexity']:.3f}",
                     f"{100 * (equal.measured['perplexity'] / base - 1):+.1f}%"])
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF weights), held-out perplexity, 4 windows x {args.length} tokens "
          f"(* on the Pareto front of the front run)")
    print(tabulate(rows, headers=["config", "weight bits", "act bits", "ppl", "vs fp32"], tablefmt="github"))
    print(f"wrote {args.plot}" + (f", {args.out}" if args.out else ""))


if __name__ == "__main__":
    main()
