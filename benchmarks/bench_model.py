"""End-to-end latency, first-compile time and weight bytes of transformers under mxfx vs fp32/bf16.

    python benchmarks/bench_model.py [--models nanogpt,vit,smollm2] [--dtypes fp32,bf16]
        [--layers N] [--batch B] [--threads T] [--rounds 5] [--runs 5] [--torchao] [--device cpu|cuda]
        [--allocators default,glibc-tunables,jemalloc]

Models (random weights: speed depends on shapes, not values): nanoGPT-style (d=512, 8 heads,
128 tokens), HF `ViTModel` shaped like ViT-S/16 (d=384, 6 heads, 197 tokens), HF
`LlamaForCausalLM` shaped like SmolLM2-135M (d=576, 9/3 heads, 256 tokens). `--layers` overrides
each model's depth (defaults: 6, 12, 30). Every linear but the LM head is quantized.

The measurement runs `--runs` times per allocator, each in a fresh process (`allocators.py`):
glibc's default malloc first, since that is what users run, then each tuned allocator as a
labelled column (the quantized models allocate more fresh buffers than the fp ones, so their
ratios depend on it). Cells are the median (min-max) over the runs. In one process, all variants
of a model are compiled first, then timed interleaved (A, B, C, A, B, C, ...) for `--rounds`
rounds; a run's `ms` is the minimum, so that the ratios of one run are side by side on a noisy
machine. Ratios are vs the fp model of the same mode and dtype, in the same run.

`compile s` is the first call of `torch.compile` in run 1 of the default allocator, with a cold
Inductor cache (a fresh `TORCHINDUCTOR_CACHE_DIR`, which the later runs reuse warm). The variants
of a model share one process and one cache, so a kernel compiled for an earlier variant (an mxfx
shared kernel: `mxfx.kernels`) is reused by a later one and its `compile s` is partly warm: cold
per-variant compile times come from `profile_compile.py` (one process each).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

import mxfx
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.testing.models import NanoGPT

sys.path.insert(0, str(Path(__file__).resolve().parent))
import allocators  # noqa: E402

warnings.filterwarnings("ignore")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def linear_config(weight: str, activation, storage: str, attention: bool = False) -> QuantConfig:
    spec = MXSpec(weight)
    return QuantConfig((
        Rule(match="lm_head", skip=True),
        Rule(match=".*", weight=spec, activation=None if activation is None else MXSpec(activation), weight_storage=storage,
             attention=AttentionSpec(spec, spec, spec, spec) if attention else None),
    ))


def build(name: str, layers: int | None, batch: int):
    """(model, example inputs, names of the quantizable linear weights)."""
    torch.manual_seed(0)
    if name == "nanogpt":
        model = NanoGPT(vocab=1024, d=512, n_layer=layers or 6, n_head=8, block_size=128)
        inputs = (torch.randint(0, 1024, (batch, 128)),)
    elif name == "vit":
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(hidden_size=384, num_hidden_layers=layers or 12, num_attention_heads=6, intermediate_size=1536,
                           image_size=224, patch_size=16, attn_implementation="sdpa")
        model = ViTModel(config, add_pooling_layer=False)
        inputs = (torch.randn(batch, 3, 224, 224),)  # 196 patches + [CLS] = 197 tokens
    elif name == "smollm2":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers or 30,
                             num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                             tie_word_embeddings=True, use_cache=False, attn_implementation="sdpa")
        model = LlamaForCausalLM(config)
        inputs = (torch.randint(0, 49152, (batch, 256)),)
    else:
        raise SystemExit(f"unknown model {name!r}")
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    return model.eval(), inputs, names


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def first_call_s(fn, inputs) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn(*inputs)
    sync()
    return time.perf_counter() - start


def interleaved_min_ms(fns: dict, inputs, rounds: int) -> dict:
    times = {label: [] for label in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn(*inputs)  # warm
        for _ in range(rounds):
            for label, fn in fns.items():
                sync()
                start = time.perf_counter()
                fn(*inputs)
                sync()
                times[label].append(time.perf_counter() - start)
    return {label: min(t) * 1e3 for label, t in times.items()}


def quantized_bytes(module: torch.nn.Module, fp_names: list[str]) -> int:
    """Bytes of the codes + scales of packed weights, plus the fp weights left (simulated storage)."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    packed = sum(t.nbytes for name, t in tensors.items() if "mxfx_w" in name)
    return packed or sum(tensors[n].nbytes for n in fp_names if n in tensors)


def run_model(name: str, dtype_name: str, args) -> list[list]:
    model, inputs, names = build(name, args.layers, args.batch)
    dtype = DTYPES[dtype_name]
    model = model.to(args.device, dtype)
    inputs = tuple((t.to(dtype) if t.is_floating_point() else t).to(args.device) for t in inputs)
    fp_bytes = sum(model.get_parameter(n).nbytes for n in names)
    attention = linear_config("fp8_e4m3", "fp8_e4m3", "packed", attention=True)
    variants = [  # (label, config or None for the fp model, compiled?)
        (f"{dtype_name} eager", None, False),
        (f"{dtype_name} compiled", None, True),
        ("MXFP8 W+A simulated, eager", linear_config("fp8_e4m3", "fp8_e4m3", "simulated"), False),
        ("MXFP8 W+A simulated, compiled", linear_config("fp8_e4m3", "fp8_e4m3", "simulated"), True),
        ("MXFP8 W+A packed, compiled", linear_config("fp8_e4m3", "fp8_e4m3", "packed"), True),
        ("MXFP4 W packed, compiled", linear_config("fp4_e2m1", None, "packed"), True),
        ("MXFP8 W+A + attention, packed, compiled", attention, True),
        # the same compiled inside mxfx.fused_kernels(): every site inlined, no shared kernels
        ("MXFP8 W+A + attention, packed, compiled, fused kernels", attention, True),
    ][: None if args.device == "cpu" else -1]  # off the CPU every site is inlined: "fused" is the row above
    fns, compile_s, nbytes, failed = {}, {}, {}, {}
    program = mxfx.export(model, inputs) if any(cfg is not None for _, cfg, _ in variants) else None
    for label, cfg, compiled in variants:
        try:
            module = model if cfg is None else mxfx.prepare(program, cfg, inputs)
            nbytes[label] = fp_bytes if cfg is None else quantized_bytes(module, names)
            if compiled:
                torch._dynamo.reset()
                fn = torch.compile(module)
                with mxfx.fused_kernels() if label.endswith("fused kernels") else contextlib.nullcontext():
                    compile_s[label] = first_call_s(fn, inputs)
            else:
                fn = module
            fns[label] = fn
        except Exception as error:  # record what happens instead of failing the table
            failed[label] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    if args.torchao and dtype == torch.bfloat16:
        try:
            from torchao.prototype.mx_formats import MXDynamicActivationMXWeightConfig
            from torchao.quantization import quantize_
            from torchao.quantization.quantize_.common.kernel_preference import KernelPreference

            ao_model = copy.deepcopy(model)
            quantize_(ao_model, MXDynamicActivationMXWeightConfig(kernel_preference=KernelPreference.EMULATED),
                      filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and not fqn.endswith("lm_head"))
            fns["torchao MX inference, eager emulation"] = ao_model
            nbytes["torchao MX inference, eager emulation"] = 0
        except Exception as error:
            failed["torchao MX inference, eager emulation"] = f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"
    ms = interleaved_min_ms(fns, inputs, args.rounds)
    rows = []
    for label in [v[0] for v in variants] + [k for k in (*fns, *failed) if k not in {v[0] for v in variants}]:
        if label not in ms and label not in failed:
            continue
        compiled = "compiled" in label
        rows.append({
            "model": name, "dtype": dtype_name, "variant": label, "failed": failed.get(label),
            "base": f"{dtype_name} {'compiled' if compiled else 'eager'}", "ms": ms.get(label),
            "compile_s": compile_s.get(label), "bytes_vs_fp": nbytes[label] / fp_bytes if nbytes.get(label) else None,
        })
    torch._dynamo.reset()
    return rows


def child(args) -> None:
    """One run in this process: every model, dtype and variant; the rows go to the parent as JSON."""
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.compile(lambda t: t + 1)(torch.ones(2))  # the one-time C++ toolchain warm-up is no model's compile time
    torch._dynamo.reset()
    rows = []
    for name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            rows.extend(run_model(name, dtype_name, args))
    where = torch.cuda.get_device_name() if args.device == "cuda" else None
    allocators.emit({"rows": rows, "where": where})


def table(results: dict[str, list[dict]]) -> tuple[list[str], list[list]]:
    """Headers and rows: per allocator, the ratio vs fp and ms over the runs; compile s of run 1."""
    labels = list(results)
    first = results[labels[0]][0]["rows"]
    headers = ["model", "dtype", "variant"]
    for i, label in enumerate(labels, 1):
        headers += [f"vs fp {allocators.short(label, i)}", f"ms {allocators.short(label, i)}"]
    headers += ["compile s [1], run 1", "compile vs fp [1], run 1", "weight bytes vs fp", "note"]
    rows = []
    for index, row in enumerate(first):
        cells = [row["model"], row["dtype"], row["variant"]]
        if row["failed"]:
            rows.append(cells + ["fails", "-"] * len(labels) + ["-", "-", "-", row["failed"]])
            continue
        for label in labels:
            ratios, times = [], []
            for run in results[label]:
                this = run["rows"][index]
                base = next(r for r in run["rows"] if r["model"] == row["model"] and r["dtype"] == row["dtype"]
                            and r["variant"] == this["base"])
                if this["ms"] is not None:
                    times.append(this["ms"])
                    if base["ms"]:
                        ratios.append(this["ms"] / base["ms"])
            cells += [allocators.spread(ratios, suffix="x"), allocators.spread(times, "{:.1f}")]
        base = next(r for r in first if r["model"] == row["model"] and r["dtype"] == row["dtype"] and r["variant"] == row["base"])
        cells += [
            "-" if row["compile_s"] is None else f"{row['compile_s']:.1f}",
            f"{row['compile_s'] / base['compile_s']:.2f}x" if row["compile_s"] and base["compile_s"] else "-",
            "-" if row["bytes_vs_fp"] is None else f"{row['bytes_vs_fp']:.3f}x", "",
        ]
        rows.append(cells)
    return headers, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="nanogpt")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--layers", type=int, default=None, help="override each model's depth")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds in each run (ms: their minimum)")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per allocator (cells: median (min-max))")
    parser.add_argument("--allocators", default=None,
                        help="comma-separated: default, glibc-tunables, jemalloc, tcmalloc, name=/path/lib.so "
                             "(default: default,glibc-tunables and each of jemalloc/tcmalloc that is installed)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (there torch.compile inlines every site: no shared kernels)")
    parser.add_argument("--torchao", action="store_true", help="add torchao's MX inference config (bf16 only)")
    parser.add_argument("--warm-cache", action="store_true", help="keep the user's Inductor cache (compile s is then not cold)")
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)  # run number, in a child
    args = parser.parse_args()
    if args.child is not None:
        return child(args)
    settings, notes = allocators.allocator_settings(args.allocators or allocators.default_allocators())
    extra = {} if args.warm_cache else {"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="mxfx-bench-inductor-")}
    load_before = allocators.loadavg()
    results = allocators.run_children(__file__, sys.argv[1:], settings, args.runs, extra)
    where = results[next(iter(results))][0]["where"]
    title = (f"bench_model: batch {args.batch}{'' if where is None else '; ' + where}; min of {args.rounds} interleaved "
             f"rounds per run; ratios vs the fp model of the same mode (eager/compiled) and dtype, in the same run; "
             f"compile s: first call, run 1 of [1], {'warm' if args.warm_cache else 'cold'} Inductor cache")
    print(allocators.header(title, results, args.runs, load_before, notes))
    headers, rows = table(results)
    print(tabulate(rows, headers=headers, tablefmt="github"))


if __name__ == "__main__":
    main()
