"""Cost of the online Hadamard rotation inside the compiled MX quantizer (issue #14).

Compiled (Inductor, CPU), one thread, side by side in one process, min over N interleaved runs of
each, timed as the thread's CPU time (time.thread_time: on a shared, oversubscribed machine wall
time mostly measures the other processes):
a copy (one read + one write: the memory floor), `fake_quantize`, and `hadamard` + `fake_quantize`,
on fp32 activations; and the loop nests Inductor generates for the last one.

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \
        python benchmarks/hadamard_fusion.py [--shapes 2048x576,2048x1536] [--runs 200] [--format fp4_e2m1] [--code]

(The malloc settings keep glibc from handing each multi-MB output back to the kernel and faulting
it in again on the next call; without them the timings of the larger shape jump between two modes.)
"""

import argparse
import re
import time

import torch
from tabulate import tabulate

import mxfx  # noqa: F401  (registers the ops)
from mxfx._compat import run_and_get_code
from mxfx.recovery.rotation import hadamard_last_axis


def fq(t, fmt):
    return torch.ops.mxfx.fake_quantize(t, fmt, 32, -1, "floor", "even", 0, False)


def loop_nests(code: str) -> int:
    """Outermost loops in the generated C++ kernels (one per loop nest)."""
    return len(re.findall(r"^ {8}for\(", code, flags=re.M)) or code.count("#pragma omp for")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2048x576,2048x1536")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--format", default="fp4_e2m1")
    parser.add_argument("--code", action="store_true", help="print the generated code of hadamard + fake_quantize")
    args = parser.parse_args()
    torch.set_num_threads(1)
    fns = {
        "copy_": lambda x, out: out.copy_(x),
        "fake_quantize": lambda x, out: fq(x, args.format),
        # the butterfly as broadcast pointwise ops: what Inductor compiled before the lowering
        "butterfly ops + fake_quantize": lambda x, out: fq(hadamard_last_axis(x, 32), args.format),
        "hadamard + fake_quantize": lambda x, out: fq(torch.ops.mxfx.hadamard(x, 32, -1), args.format),
    }
    rows, nests = [], {}
    for shape in args.shapes.split(","):
        x = torch.randn(*map(int, shape.split("x")))
        out = torch.empty_like(x)
        compiled = {name: torch.compile(fn, fullgraph=True) for name, fn in fns.items()}
        for name, fn in compiled.items():
            result, code = run_and_get_code(fn, x, out)
            if name != "copy_" and name != "fake_quantize":
                assert torch.equal(result, fns[name](x, out)), "compiled != eager"
                nests[name] = loop_nests("\n".join(code))
                if args.code:
                    print("\n".join(code))
        best = dict.fromkeys(compiled, float("inf"))
        for _ in range(args.runs):  # interleaved, so load changes hit every variant alike
            for name, fn in compiled.items():
                start = time.thread_time()
                fn(x, out)
                best[name] = min(best[name], time.thread_time() - start)
        rows.append([shape, *(f"{1e3 * best[name]:.3f}" for name in compiled),
                     f"{best['hadamard + fake_quantize'] / best['fake_quantize']:.2f}x"])
        torch._dynamo.reset()
    print(f"compiled, 1 thread, min of {args.runs} runs, thread CPU time in ms ({args.format}, block 32); loop nests: {nests}")
    print(tabulate(rows, headers=["shape", *fns, "rotation cost"], tablefmt="github"))


if __name__ == "__main__":
    main()
