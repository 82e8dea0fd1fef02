"""Quantize throughput: mxfx eager/compiled vs a plain eager fp8 cast, `copy_` and torchao `to_mx`.

    python benchmarks/bench_quantize.py [--size 4096] [--formats fp8_e4m3,fp4_e2m1] [--dtypes bf16,fp32]
        [--runs 5] [--allocators default,glibc-tunables,jemalloc]

A 4096x4096 input in bf16 and fp32, to every format. The references: `x.to(torch.float8_e4m3fn)`
(a plain eager cast to a fresh output: the same bytes out as MXFP8 codes, what quantizing costs
without MX) and `dst.copy_(x)` into a preallocated tensor (memory bandwidth, no allocation).
Under glibc's default malloc a fresh 16-64 MB output is mmap'ed and page-faulted on every call,
which `copy_` never pays and the quantizers and the cast do; so the measurement runs `--runs`
times per allocator, each in a fresh process (`allocators.py`): the default allocator first (what
users get, the column the cast target is stated for), then each tuned allocator (raised glibc
thresholds, jemalloc/tcmalloc where installed: the column the `copy_` targets are stated for).
In one run, times are the median of several calls, the variants side by side; cells are the median
(min-max) of a run's figure over the runs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

import mxfx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import allocators  # noqa: E402

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


def measure(args, secondary: bool) -> list[dict]:
    """One run: per input dtype, the references and every format's quantizers (ms, median of repeats).

    The slow eager quantizers (mxfx eager, torchao) are timed only when `secondary` (run 1 of each
    allocator): they are not what the targets are about, and each costs seconds a call.
    """
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = DTYPES[dtype_name]
        x = torch.randn(args.size, args.size).to(dtype)
        dst = torch.empty_like(x)
        copy_ms = median_ms(lambda: dst.copy_(x), args.repeats)
        cast_ms = median_ms(lambda: x.to(torch.float8_e4m3fn), args.repeats)  # a fresh output, one byte per element
        for name in args.formats.split(","):

            def quantize(t, name=name):
                return torch.ops.mxfx.quantize(t, name, 32, -1, "floor", "even", 0, False)

            def fake_quantize(t, name=name):
                return torch.ops.mxfx.fake_quantize(t, name, 32, -1, "floor", "even", 0, False)

            compiled = torch.compile(quantize, fullgraph=True)
            eager_ms = median_ms(lambda: quantize(x), args.eager_repeats) if secondary else None
            compiled_ms = median_ms(lambda: compiled(x), args.repeats)
            compiled_fq = torch.compile(fake_quantize, fullgraph=True)
            fake_ms = median_ms(lambda: compiled_fq(x), args.repeats)
            ao = torchao_quantizer(name) if secondary else None
            ao_eager = ao_compiled = None
            if ao is not None:
                ao_eager = median_ms(lambda: ao(x), args.eager_repeats)
                try:
                    ao_c = torch.compile(ao)
                    ao_compiled = median_ms(lambda: ao_c(x), args.repeats)
                except Exception as error:  # record what happens instead of failing the table
                    ao_compiled = f"fails: {type(error).__name__}"
                    print(f"torchao to_mx({name}) under torch.compile: {str(error).splitlines()[0][:200]}", file=sys.stderr)
            rows.append({"dtype": dtype_name, "format": name, "copy": copy_ms, "cast": cast_ms, "eager": eager_ms,
                         "compiled": compiled_ms, "fake": fake_ms, "ao_eager": ao_eager, "ao_compiled": ao_compiled})
            torch._dynamo.reset()
    return rows


def tables(results: dict[str, list[dict]]) -> tuple[list, list, list, list]:
    """(headers, rows) of the targets table and of the other columns, per allocator over the runs."""
    labels = list(results)
    first = results[labels[0]][0]["rows"]

    def values(label: str, index: int, key, div=None) -> list[float]:
        out = []
        for run in results[label]:
            row = run["rows"][index]
            value = key(row) if callable(key) else row[key]
            if isinstance(value, float):
                out.append(value / row[div] if div else value)
        return out

    main_headers, main_rows = ["dtype", "format"], []
    other_headers, other_rows = ["dtype", "format"], []
    for i, label in enumerate(labels, 1):
        tag = allocators.short(label, i)
        main_headers += [f"ms {tag}", f"vs eager fp8 cast {tag}", f"vs copy_ {tag}"]
        other_headers += [f"fake-quant compiled ms {tag}", f"fake-quant / copy_ {tag}", f"mxfx eager ms {tag}, run 1",
                          f"torchao eager ms {tag}, run 1"]
    other_headers.append("torchao compiled, run 1 of [1]")
    for reference, key in (("copy_ into a preallocated tensor", "copy"), ("x.to(torch.float8_e4m3fn)", "cast")):
        for dtype_name in dict.fromkeys(r["dtype"] for r in first):
            index = next(j for j, r in enumerate(first) if r["dtype"] == dtype_name)
            cells = [dtype_name, f"reference: {reference}"]
            for label in labels:
                cells += [allocators.spread(values(label, index, key)), "-", "-"]
            main_rows.append(cells)
    for index, row in enumerate(first):
        cells = [row["dtype"], row["format"]]
        other = [row["dtype"], row["format"]]
        for label in labels:
            cells += [allocators.spread(values(label, index, "compiled")),
                      allocators.spread(values(label, index, "compiled", "cast"), suffix="x"),
                      allocators.spread(values(label, index, "compiled", "copy"), suffix="x")]
            other += [allocators.spread(values(label, index, "fake")),
                      allocators.spread(values(label, index, "fake", "copy"), suffix="x"),
                      allocators.spread(values(label, index, "eager"), "{:.0f}"),
                      allocators.spread(values(label, index, "ao_eager"), "{:.0f}")]
        ao = row["ao_compiled"]
        other.append("-" if ao is None else ao if isinstance(ao, str) else f"{ao:.2f}")
        main_rows.append(cells)
        other_rows.append(other)
    return main_headers, main_rows, other_headers, other_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--formats", default=",".join(mxfx.FORMATS))
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--eager-repeats", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per allocator (cells: median (min-max))")
    parser.add_argument("--allocators", default=None,
                        help="comma-separated: default, glibc-tunables, jemalloc, tcmalloc, name=/path/lib.so "
                             "(default: default,glibc-tunables and each of jemalloc/tcmalloc that is installed)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # run number, in a child
    args = parser.parse_args()
    if args.child is not None:
        return allocators.emit({"rows": measure(args, secondary=args.child == 1)})
    settings, notes = allocators.allocator_settings(args.allocators or allocators.default_allocators())
    load_before = allocators.loadavg()
    results = allocators.run_children(__file__, sys.argv[1:], settings, args.runs)
    title = (f"bench_quantize: {args.size}x{args.size} input, block 32, floor, RNE; ms: median of {args.repeats} calls "
             f"(eager: {args.eager_repeats}) in each run; ratios of one run, then over the runs")
    print(allocators.header(title, results, args.runs, load_before, notes))
    main_headers, main_rows, other_headers, other_rows = tables(results)
    print("\nTargets (ms: the compiled mxfx.quantize, or the reference): compiled quantize vs a plain eager cast (<= 2.5x, default allocator) and vs copy_ "
          "(<= 3x MXFP8/MXINT8, <= 4x MXFP6/MXFP4, tuned allocator)")
    print(tabulate(main_rows, headers=main_headers, tablefmt="github"))
    print("\nOther quantizers (fake-quant: the op on a prepared model's activation path; torchao: `to_mx`)")
    print(tabulate(other_rows, headers=other_headers, tablefmt="github"))


if __name__ == "__main__":
    main()
