"""End-to-end latency and weight bytes of a nanoGPT-style transformer under mxfx vs fp32/torchao.

    python benchmarks/bench_model.py [--layers 6] [--d 512] [--batch 8] [--seq 128] [--dtypes fp32,bf16]

Rows (one process, side by side): eager, compiled, mxfx MXFP8 compiled (packed and simulated
weights), mxfx MXFP4-weight compiled, and torchao's MX inference config (eager emulation; it
does not compile on CPU: the table records what happens).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings

import torch
from tabulate import tabulate

import mxfx
from mxfx.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.model_zoo import NanoGPT

warnings.filterwarnings("ignore")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Same reason as in bench_quantize.py: reuse freed memory instead of page-faulting fresh mmaps.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"


def median_ms(fn, repeats: int) -> float:
    with torch.no_grad():
        fn()
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def linear_config(weight: str, activation, storage: str, attention: bool = False) -> QuantConfig:
    spec = MXSpec(weight)
    rules = [Rule(match=r".*\.attn", attention=AttentionSpec(spec, spec, spec, spec))] if attention else []
    return QuantConfig((
        *rules,
        Rule(match="lm_head", skip=True),
        Rule(match=".*", weight=spec, activation=None if activation is None else MXSpec(activation), weight_storage=storage),
    ))


def weight_bytes(module: torch.nn.Module, names) -> int:
    """Bytes of the quantizable linear weights (fp) or of their codes + scales (mxfx)."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    return sum(t.nbytes for name, t in tensors.items() if any(name.startswith(p) or p in name for p in names))


def main() -> None:
    if "--default-malloc" not in sys.argv and os.environ.get("GLIBC_TUNABLES") != MALLOC_TUNABLES:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--default-malloc", action="store_true")
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        model = NanoGPT(vocab=1024, d=args.d, n_layer=args.layers, n_head=8, block_size=args.seq).to(dtype).eval()
        idx = torch.randint(0, 1024, (args.batch, args.seq))
        linear_weights = [f"{name}.weight" for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
        fp_bytes = sum(model.get_parameter(n).nbytes for n in linear_weights)
        base = {}

        def row(label, ms, nbytes, note=""):
            base.setdefault("ms", ms)
            rows.append([dtype_name, label, f"{ms:.1f}" if isinstance(ms, float) else ms,
                         f"{ms / base['ms']:.2f}x" if isinstance(ms, float) else "-",
                         f"{nbytes / 2**20:.2f}" if nbytes else "-", f"{nbytes / fp_bytes:.3f}x" if nbytes else "-", note])

        row("eager", median_ms(lambda: model(idx), args.repeats), fp_bytes)
        compiled = torch.compile(model)
        compiled_ms = median_ms(lambda: compiled(idx), args.repeats)
        row("compiled", compiled_ms, fp_bytes)
        base["ms"] = compiled_ms  # ratios below are vs the compiled model
        rows[-2][3] = f"{rows[-2][2] and float(rows[-2][2]) / compiled_ms:.2f}x"
        rows[-1][3] = "1.00x"
        for label, cfg in (
            ("mxfx MXFP8 compiled (packed)", linear_config("fp8_e4m3", "fp8_e4m3", "packed")),
            ("mxfx MXFP8 compiled (simulated)", linear_config("fp8_e4m3", "fp8_e4m3", "simulated")),
            ("mxfx MXFP4 weights compiled (packed)", linear_config("fp4_e2m1", None, "packed")),
            ("mxfx MXFP8 linears + attention compiled (packed)", linear_config("fp8_e4m3", "fp8_e4m3", "packed", attention=True)),
        ):
            torch._dynamo.reset()
            prepared = mxfx.prepare(model, cfg, (idx,))
            fn = torch.compile(prepared)
            ms = median_ms(lambda: fn(idx), args.repeats)
            row(label, ms, weight_bytes(prepared, ["mxfx_w"]) or fp_bytes)
        torch._dynamo.reset()
        try:
            from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig
            from torchao.quantization import quantize_
            from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

            ao_model = copy.deepcopy(model)
            quantize_(ao_model, MXDynamicActivationMXWeightConfig(kernel_preference=KernelPreference.EMULATED),
                      filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn != "lm_head")
            row("torchao MX inference (eager emulation)", median_ms(lambda: ao_model(idx), max(2, args.repeats // 5)), 0)
            try:
                ao_compiled = torch.compile(ao_model)
                row("torchao MX inference (compiled)", median_ms(lambda: ao_compiled(idx), args.repeats), 0)
            except Exception as error:
                row("torchao MX inference (compiled)", "fails", 0, f"{type(error).__name__}: {str(error).splitlines()[0][:80]}")
        except Exception as error:
            row("torchao MX inference (eager emulation)", "fails", 0, f"{type(error).__name__}: {str(error).splitlines()[0][:80]}")
        torch._dynamo.reset()
    print(f"nanoGPT-style: {args.layers} layers, d={args.d}, batch {args.batch} x {args.seq} tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; ratios vs the compiled model of the same dtype")
    print(tabulate(rows, headers=["dtype", "variant", "ms", "vs compiled", "linear weight MiB", "vs fp weights", "note"], tablefmt="github"))


if __name__ == "__main__":
    main()
