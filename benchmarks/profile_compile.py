"""Where the first `torch.compile` call of a prepared model spends its time (issue #15).

    python benchmarks/profile_compile.py [--models nanogpt,vit,smollm2] [--layers 2]
        [--variants fp32,mxfp8,mxfp8-attn,mxfp8-fused,mxfp8-attn-fused] [--repeat 2] [--cprofile VARIANT]

Each (model, variant, repeat) runs in its own process with a fresh `TORCHINDUCTOR_CACHE_DIR` (cold
Inductor cache, no kernel compiled before), one thread, the variants interleaved so that their
ratios are side by side on a loaded machine. The models are bench_model's (batch 1; compile time
does not depend on the batch; `--layers 0` keeps each model's full depth). Variants: `mxfp8` is
MXFP8 W+A with simulated weights, `mxfp8-attn` MXFP8 W+A with packed weights and quantized
attention; `-fused` compiles inside `mxfx.fused_kernels()` (every site inlined, no shared
kernels; the default before shared kernels). Columns: the first compiled call; Dynamo's own timers
(`torch._dynamo.utils.compile_times`) for AOTAutograd (`aot_*`), Inductor lowering/scheduling/
codegen (`GraphLowering.*`, `Scheduler.*`) and the C++ compiles (the wait on `AsyncCompile`);
the number of generated kernels and of distinct C++ sources compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(model_name: str, variant: str, layers: int, cprofile: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    from torch._dynamo.utils import compile_times
    from torch._inductor import codecache, metrics

    sys.path.insert(0, str(HERE))
    import bench_model

    import mxfx

    compiles = {"n": 0, "s": 0.0, "sources": set()}
    original_load = codecache.CppPythonBindingsCodeCache.load_pybinding_async.__func__

    def counting_load(cls, argtypes, source_code, *args, **kwargs):
        compiles["sources"].add(hash(source_code))
        compiles["n"] += 1
        return original_load(cls, argtypes, source_code, *args, **kwargs)

    codecache.CppPythonBindingsCodeCache.load_pybinding_async = classmethod(counting_load)
    torch.compile(lambda t: t + 1)(torch.ones(2))  # the one-time C++ toolchain warm-up
    torch._dynamo.reset()
    compiles.update(n=0, sources=set())
    model, inputs, _ = bench_model.build(model_name, layers or None, 1)
    if variant != "fp32":
        spec, attention = "fp8_e4m3", "-attn" in variant
        config = bench_model.linear_config(spec, spec, "packed" if attention else "simulated", attention=attention)
        model = mxfx.prepare(model, config, inputs)
    torch._dynamo.reset()
    metrics.reset()
    fn = torch.compile(model)
    profiler = None
    if cprofile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    import contextlib

    start = time.perf_counter()
    with torch.no_grad(), mxfx.fused_kernels() if variant.endswith("-fused") else contextlib.nullcontext():
        fn(*inputs)
    total = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
        import pstats

        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(60)
    timers = {}
    for line in compile_times(repr="str").splitlines()[1:]:
        parts = line.split()
        if len(parts) >= 2:
            try:
                timers[parts[0]] = float(parts[1].split(",")[0])
            except ValueError:
                pass
    return {"variant": variant, "total": total, "kernels": metrics.generated_kernel_count,
            "cpp_loads": compiles["n"], "cpp_sources": len(compiles["sources"]), "timers": timers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="nanogpt")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--variants", default="fp32,mxfp8,mxfp8-attn,mxfp8-fused,mxfp8-attn-fused")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--cprofile", default="")
    parser.add_argument("--trees", default="", help="comma-separated source roots to compare (PYTHONPATH of each "
                        "child; e.g. an unpacked `git archive` of the baseline); default: the installed mxfx")
    parser.add_argument("--child", default="")
    parser.add_argument("--timers", default="_compile.compile_inner,create_aot_dispatcher_function,compile_fx_inner,"
                        "GraphLowering.run,Scheduler.__init__,GraphLowering.codegen,async_compile.wait")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.models, args.child, args.layers, args.child == args.cprofile)))
        return
    results = []
    trees = args.trees.split(",") if args.trees else [""]
    for _, model_name in ((r, m) for r in range(args.repeat) for m in args.models.split(",")):
        for tree in trees:
            for variant in args.variants.split(","):
                if tree != trees[0] and variant == "fp32":
                    continue  # the fp32 model does not depend on mxfx
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="mxfx-prof-"), OMP_NUM_THREADS="1")
                if tree:
                    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
                out = subprocess.run([sys.executable, __file__, "--child", variant, "--models", model_name,
                                      "--layers", str(args.layers),
                                      "--cprofile", args.cprofile], env=env, capture_output=True, text=True)
                if out.returncode:
                    raise SystemExit(out.stderr[-3000:])
                if args.cprofile == variant:
                    Path(tempfile.gettempdir(), f"mxfx-cprofile-{variant}.txt").write_text(out.stderr)
                results.append(json.loads(out.stdout.strip().splitlines()[-1]) | {"tree": tree or "installed", "model": model_name})
    timers = args.timers.split(",")
    fp32 = {(r["model"], r["tree"]): r["total"] for r in results if r["variant"] == "fp32"}
    print(f"{args.layers or 'full-depth'} layers, 1 thread, cold Inductor cache per run; seconds (the timers are "
          "the model graph's; shared kernels compile during its first call)")
    print("| model | tree | variant | first call | vs fp32 | " + " | ".join(timers) + " | kernels | C++ loads | distinct C++ sources |")
    print("|---" * (len(timers) + 8) + "|")
    for r in results:
        base = fp32.get((r["model"], r["tree"])) or fp32.get((r["model"], "installed"))
        print(f"| {r['model']} | {r['tree']} | {r['variant']} | {r['total']:.1f} | "
              + (f"{r['total'] / base:.2f}x | " if base else "- | ")
              + " | ".join(f"{r['timers'].get(t, float('nan')):.1f}" for t in timers)
              + f" | {r['kernels']} | {r['cpp_loads']} | {r['cpp_sources']} |")

if __name__ == "__main__":
    main()
