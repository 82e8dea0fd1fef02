"""Quantize throughput: mxfx eager/compiled vs torchao `to_mx` vs the `copy_` bandwidth reference.

Prints one table (tabulate) for a 4096x4096 input in bf16 and fp32 to every format. Times are the
median of several runs in one process, so the ratios are side by side.

    python benchmarks/bench_quantize.py [--size 4096] [--formats fp8_e4m3,fp4_e2m1] [--dtypes bf16,fp32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch
from tabulate import tabulate

import mxfx

warnings.filterwarnings("ignore")
torch._dynamo.config.recompile_limit = 1000

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def median_ms(fn, repeats: int) -> float:
    fn()  # warm up (compiles on the first call)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def torchao_quantizer(name: str):
    try:
        from torchao.prototype.mx_formats.constants import DTYPE_FP6_E2M3, DTYPE_FP6_E3M2
        from torchao.prototype.mx_formats.mx_tensor import to_mx
    except ImportError:
        return None
    dtype = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "fp6_e3m2": DTYPE_FP6_E3M2,
             "fp6_e2m3": DTYPE_FP6_E2M3, "fp4_e2m1": torch.float4_e2m1fn_x2}.get(name)
    return None if dtype is None else (lambda x: to_mx(x, dtype, 32))


# Fresh 16-64 MB outputs are mmap'ed and page-faulted on every call under glibc's defaults, which
# costs more than the quantization itself and is not what a model in steady state sees (the
# caching allocator reuses memory); `copy_` into a preallocated tensor pays none of it. Raising the
# mmap/trim thresholds lets freed blocks be reused. Pass --default-malloc to measure without it.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"


def main() -> None:
    if "--default-malloc" not in sys.argv and os.environ.get("GLIBC_TUNABLES") != MALLOC_TUNABLES:
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": MALLOC_TUNABLES})
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--formats", default=",".join(mxfx.FORMATS))
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--eager-repeats", type=int, default=2)
    parser.add_argument("--default-malloc", action="store_true", help="keep glibc's default malloc thresholds")
    args = parser.parse_args()
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        x = torch.randn(args.size, args.size).to(dtype)
        dst = torch.empty_like(x)
        copy_ms = median_ms(lambda: dst.copy_(x), args.repeats)
        for name in args.formats.split(","):

            def quantize(t, name=name):
                return torch.ops.mxfx.quantize(t, name, 32, -1, "floor", "even", 0, False)

            def fake_quantize(t, name=name):
                return torch.ops.mxfx.fake_quantize(t, name, 32, -1, "floor", "even", 0, False)

            compiled = torch.compile(quantize, fullgraph=True)
            eager_ms = median_ms(lambda: quantize(x), args.eager_repeats)
            compiled_ms = median_ms(lambda: compiled(x), args.repeats)
            compiled_fq = torch.compile(fake_quantize, fullgraph=True)
            fake_ms = median_ms(lambda: compiled_fq(x), args.repeats)
            ao = torchao_quantizer(name)
            ao_eager = ao_compiled = None
            if ao is not None:
                ao_eager = median_ms(lambda: ao(x), args.eager_repeats)
                try:
                    ao_c = torch.compile(ao)
                    ao_compiled = median_ms(lambda: ao_c(x), args.repeats)
                except Exception as error:  # record what happens instead of failing the table
                    ao_compiled = f"fails: {type(error).__name__}"
                    print(f"torchao to_mx({name}) under torch.compile: {str(error).splitlines()[0][:200]}", file=sys.stderr)
            fmt = lambda v: "-" if v is None else (v if isinstance(v, str) else f"{v:.2f}")  # noqa: E731
            rows.append([
                dtype_name, name, fmt(copy_ms), fmt(eager_ms), fmt(compiled_ms), fmt(fake_ms), fmt(ao_eager), fmt(ao_compiled),
                f"{compiled_ms / copy_ms:.1f}x", f"{fake_ms / copy_ms:.1f}x", f"{eager_ms / compiled_ms:.0f}x",
                "-" if not isinstance(ao_compiled, float) else f"{ao_compiled / compiled_ms:.2f}x",
            ])
            torch._dynamo.reset()
    headers = ["dtype", "format", "copy_ ms", "mxfx eager ms", "mxfx compiled ms", "mxfx fake-quant compiled ms",
               "torchao eager ms", "torchao compiled ms", "compiled / copy_", "fake-quant / copy_", "eager / compiled", "torchao compiled / mxfx compiled"]
    print(f"quantize {args.size}x{args.size}, block 32, floor, RNE; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(tabulate(rows, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
