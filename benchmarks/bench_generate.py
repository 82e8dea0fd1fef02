"""Decoding speed: tokens/s of fp32 vs mxfx-prepared generation, eager and compiled.

    python benchmarks/bench_generate.py [--layers 30] [--batches 1,8] [--prompt 32] [--new 32]
        [--config llm_mxfp8] [--rounds 3] [--threads T] [--no-compile]

Model: a random `LlamaForCausalLM` shaped like SmolLM2-135M (d=576, 9/3 heads, 1536 MLP, vocab
49152, tied embeddings; speed depends on shapes, not values), sdpa attention. Every variant runs
the same loop (`mxfx.integrations.generation.PreparedLM.generate`, greedy, no EOS) over left-padded
prompts of `--prompt` tokens and generates `--new` tokens: `fp32` is the unprepared model in that
loop (`prepare_lm(model, None)`), `mxfx` the prepared one; transformers' own `generate` (dynamic
cache) is a reference row. Compiled variants compile every module the loop runs (prefill and
decode, per batch size) with `torch.compile`; their first call is excluded. `tok/s` is the batch's
generated tokens per second of the whole call (prefill included), best of `--rounds`.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import time
import warnings

import torch
from tabulate import tabulate

from mxfx.integrations.generation import prepare_lm

warnings.filterwarnings("ignore")


def smollm2_shaped(layers: int):
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                      num_hidden_layers=layers, num_attention_heads=9, num_key_value_heads=3,
                                      max_position_embeddings=2048, tie_word_embeddings=True, use_cache=False,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=2, rope_theta=100000.0)
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).eval()


def prompts(batch: int, length: int):
    ids = torch.randint(3, 49152, (batch, length), generator=torch.Generator().manual_seed(batch))
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, :b % 4] = 0  # some left padding
    return ids.masked_fill(mask == 0, 2), mask


def best_time(run, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--config", default="llm_mxfp8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = smollm2_shaped(args.layers)
    start = time.perf_counter()
    variants = {"fp32": prepare_lm(model, None)}
    variants[f"mxfx {args.config}"] = prepare_lm(model, args.config)
    prepare_s = time.perf_counter() - start
    if not args.no_compile:  # the same prepared modules, compiled (copy: the eager variants stay eager)
        for name in list(variants):
            variants[f"{name} compiled"] = copy.copy(variants[name]).compile()
    rows = []
    with torch.no_grad():
        for batch in map(int, args.batches.split(",")):
            ids, mask = prompts(batch, args.prompt)
            tokens = batch * args.new
            hf = best_time(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=args.new,
                                                  min_new_tokens=args.new, do_sample=False, use_cache=True),
                           args.rounds)
            rows.append([batch, "transformers generate (fp32)", f"{tokens / hf:.1f}", "", ""])
            base = None
            for name, lm in variants.items():
                def run(lm=lm):
                    return lm.generate(ids, attention_mask=mask, max_new_tokens=args.new, eos_token_id=[])

                first = time.perf_counter()
                run()  # warm-up: shape classes exported, compiled modules compiled
                first = time.perf_counter() - first
                seconds = best_time(run, args.rounds)
                base = seconds if name == "fp32" else base
                rows.append([batch, name, f"{tokens / seconds:.1f}", f"{seconds / base:.2f}x", f"{first:.1f}"])
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    print(f"{datetime.date.today()}, torch {torch.__version__}, glibc malloc (default) unless LD_PRELOAD/GLIBC_TUNABLES "
          f"are set (here: {os.environ.get('LD_PRELOAD') or os.environ.get('GLIBC_TUNABLES') or 'neither'}), "
          f"load average {load}")
    print(f"SmolLM2-135M-shaped Llama, {args.layers} layers, prompt {args.prompt}, {args.new} new tokens, "
          f"{torch.get_num_threads()} threads; prepare (fp32 + mxfx, eager) {prepare_s:.0f} s")
    print(tabulate(rows, headers=["batch", "variant", "tok/s", "time vs fp32", "first call s"], tablefmt="github"))


if __name__ == "__main__":
    main()
