"""Time of the gradient-mode search on SmolLM2-135M: losses for 210 linears x 5 candidates on 2
windows of 128 tokens, then one search given the losses (exact solve + one verification).

    python benchmarks/search_time_smollm2.py
"""

import time
import warnings

import torch

import mxfx
from mxfx.analysis.search import measure, normalize_candidates
from mxfx.analysis.sensitivity import parse_candidates
from mxfx.testing import pretrained

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def main() -> None:
    warnings.filterwarnings("ignore")
    model, tokenizer = pretrained.load_smollm2()
    windows = pretrained.token_windows(tokenizer, 6, 128)
    calibration = [(w[None],) for w in windows[:2]]
    sites = [f"model.layers.{i}.{n}" for i in range(30) for n in LINEARS]
    candidates = normalize_candidates(None, parse_candidates("fp4_e2m1,fp4_e2m1:int8,fp6_e2m3,fp6_e2m3:int8,int8"))
    start = time.perf_counter()
    rows = measure(model, calibration, candidates, mode="gradient", sites=sites, progress=None)
    losses = time.perf_counter()
    report = mxfx.SensitivityReport(rows, "gradient")
    mxfx.search(model, calibration[:1], candidates=candidates, budget_bits=6.25, sites=sites, report=report, progress=None)
    done = time.perf_counter()
    print(f"gradient losses: {losses - start:.1f} s ({len(rows)} rows); search given the losses (solve + one "
          f"verification on one window): {done - losses:.1f} s; total {done - start:.1f} s; "
          f"{torch.get_num_threads()} threads")


if __name__ == "__main__":
    main()
