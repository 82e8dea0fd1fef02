"""End-to-end latency, first-compile time and weight bytes of transformers under mxfx vs fp32/bf16.

    python benchmarks/bench_model.py [--models nanogpt,vit,smollm2] [--dtypes fp32,bf16]
        [--layers N] [--batch B] [--threads T] [--rounds 5] [--torchao] [--device cpu|cuda]

Models (random weights: speed depends on shapes, not values): nanoGPT-style (d=512, 8 heads,
128 tokens), HF `ViTModel` shaped like ViT-S/16 (d=384, 6 heads, 197 tokens), HF
`LlamaForCausalLM` shaped like SmolLM2-135M (d=576, 9/3 heads, 256 tokens). `--layers` overrides
each model's depth (defaults: 6, 12, 30). Every linear but the LM head is quantized.

All variants of a model are compiled first (`compile s`: the first call of `torch.compile`, cold
Inductor cache: the script runs with a fresh `TORCHINDUCTOR_CACHE_DIR`), then timed interleaved
(A, B, C, A, B, C, ...) for `--rounds` rounds; `ms` is the minimum, so that the ratios of one
table are side by side on a noisy machine. Ratios are vs the fp model of the same mode and dtype.
The variants of a model share one process and one cache, so a kernel compiled for an earlier
variant (an mxfx shared kernel: `mxfx.kernels`) is reused by a later one and its `compile s` is
partly warm: cold per-variant compile times come from `profile_compile.py` (one process each).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import tempfile
import time
import warnings

import torch
from tabulate import tabulate

import mxfx
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.testing.models import NanoGPT

warnings.filterwarnings("ignore")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Same reason as in bench_quantize.py: reuse freed memory instead of page-faulting fresh mmaps.
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=68719476736"


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
        compiled = "compiled" in label
        base = ms.get(f"{dtype_name} {'compiled' if compiled else 'eager'}")
        if label in failed:
            rows.append([name, dtype_name, label, "fails", "-", "-", "-", "-", failed[label]])
            continue
        if label not in ms:
            continue
        base_compile = compile_s.get(f"{dtype_name} compiled")
        rows.append([
            name, dtype_name, label, f"{ms[label]:.1f}", f"{ms[label] / base:.2f}x" if base else "-",
            f"{compile_s[label]:.1f}" if label in compile_s else "-",
            f"{compile_s[label] / base_compile:.2f}x" if label in compile_s and base_compile else "-",
            f"{nbytes[label] / fp_bytes:.3f}x" if nbytes.get(label) else "-", "",
        ])
    torch._dynamo.reset()
    return rows


def main() -> None:
    env = dict(os.environ)
    if "--default-malloc" not in sys.argv and env.get("GLIBC_TUNABLES") != MALLOC_TUNABLES:
        env["GLIBC_TUNABLES"] = MALLOC_TUNABLES
    if "--warm-cache" not in sys.argv and "MXFX_BENCH_COLD" not in env:
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="mxfx-bench-inductor-")
        env["MXFX_BENCH_COLD"] = "1"
    if env != os.environ:
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="nanogpt")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--layers", type=int, default=None, help="override each model's depth")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (there torch.compile inlines every site: no shared kernels)")
    parser.add_argument("--torchao", action="store_true", help="add torchao's MX inference config (bf16 only)")
    parser.add_argument("--default-malloc", action="store_true")
    parser.add_argument("--warm-cache", action="store_true", help="keep the user's Inductor cache (compile s is then not cold)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.compile(lambda t: t + 1)(torch.ones(2))  # the one-time C++ toolchain warm-up is no model's compile time
    torch._dynamo.reset()
    rows = []
    for name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            rows.extend(run_model(name, dtype_name, args))
    where = torch.cuda.get_device_name() if args.device == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"batch {args.batch}; torch {torch.__version__}, {where}; min of {args.rounds} interleaved "
          f"rounds; ratios vs the fp model of the same mode (eager/compiled) and dtype; compile s: first call, "
          f"{'warm' if args.warm_cache else 'cold'} Inductor cache")
    print(tabulate(rows, headers=["model", "dtype", "variant", "ms", "vs fp", "compile s", "compile vs fp", "weight bytes vs fp", "note"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
