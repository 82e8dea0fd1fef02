"""SmolLM2-135M-Instruct exported with mxfx.save_pretrained and loaded back by other libraries.

Two weight-only models: GPTQ'd MXFP4 (every linear but the tied lm_head) and the searched 6.25-bit
mix (examples/smollm2_mixed_6.25bits.toml without its activation specs). Each is written in the
formats that can store it, loaded in a fresh Python process that never imports mxfx (transformers +
compressed-tensors, transformers' GGUF loader, transformers + amd-quark when --quark-python names an
interpreter that has it), and its perplexity on pydoc text compared with mxfx's own simulation.

The searched mix holds MXINT8 weights, which no checkpoint format stores: the script shows the
refusal, then exports the mix with those sites as MXFP8 (8 bits + the shared scale, the same size).

    python examples/smollm2_checkpoints.py [--windows 2] [--length 256] [--calibration 2]
        [--out /tmp/mxfx_smollm2_checkpoints] [--quark-python PATH] [--threads 1]
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from tabulate import tabulate

import mxfx
from mxfx.graph.config import MXSpec, QuantConfig, Rule
from mxfx.graph.weights import site_weights
from mxfx.testing import pretrained

warnings.filterwarnings("ignore")
MIX = Path(__file__).with_name("smollm2_mixed_6.25bits.toml")

LOADER = r'''
import json, math, sys, torch
from pathlib import Path
root = Path(sys.argv[1]); jobs = json.loads(sys.argv[2])
windows = torch.load(root / "windows.pt")
def perplexity(model):
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(w[None]).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
            count += w.numel() - 1
    return math.exp(total / count)
from transformers import AutoModelForCausalLM, AutoTokenizer
results = {}
for name, kind in jobs.items():
    folder = root / name
    if kind == "compressed-tensors":
        from transformers import CompressedTensorsConfig
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                     quantization_config=CompressedTensorsConfig(dequantize=True))
        loader = "transformers + compressed-tensors (dequantize=True)"
    elif kind == "compressed-tensors-mixed":
        model = AutoModelForCausalLM.from_pretrained(folder)
        model.hf_quantizer.compressor.decompress_model(model)
        torch.nn.Module.float(model)
        loader = "transformers + compressed-tensors (decompress_model)"
    elif kind == "quark":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        loader = "transformers + amd-quark"
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file="model.gguf")
        ids = tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
        loader = "transformers GGUF loader (gguf-py)" + (", tokenizer from the file" if ids == json.loads(sys.argv[3]) else ", TOKENIZER DIFFERS")
    results[name] = {"ppl": perplexity(model.eval()), "loader": loader}
assert not any(m == "mxfx" or m.startswith("mxfx.") for m in sys.modules)
print(json.dumps(results))
'''


def weight_only(config: QuantConfig, int8_as: str | None = None) -> QuantConfig:
    """The config's rules without activation specs (and MXINT8 weights as `int8_as`, if given)."""
    rules = []
    for rule in config.rules:
        weight = rule.weight
        if int8_as and weight is not None and weight.format == "int8":
            weight = dataclasses.replace(weight, format=int8_as)
        rules.append(dataclasses.replace(rule, activation=None, weight=weight))
    return QuantConfig(tuple(rules), source=config.source)


def load_elsewhere(python: str, root: Path, jobs: dict, sentence_ids: list) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([python, "-c", LOADER, str(root), json.dumps(jobs), json.dumps(sentence_ids)],
                            capture_output=True, text=True, env=env, cwd=root)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--calibration", type=int, default=2, help="GPTQ calibration windows (after the evaluation ones)")
    parser.add_argument("--out", default="/tmp/mxfx_smollm2_checkpoints")
    parser.add_argument("--quark-python", help="a Python interpreter with amd-quark installed (Quark rows)")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    model, tokenizer = pretrained.load_smollm2()
    text = pretrained.token_windows(tokenizer, args.windows + args.calibration, args.length)
    windows, calibration = text[: args.windows], text[args.windows:]
    torch.save(windows, root / "windows.pt")
    sentence_ids = tokenizer("The quick brown fox jumps over the lazy dog.")["input_ids"]
    base = pretrained.perplexity(model, windows)
    program = mxfx.export(model, (windows[:1],))
    gptq = QuantConfig((Rule("lm_head", skip=True), Rule(".*", weight=MXSpec("fp4_e2m1"), weight_rounding="gptq")))
    mix = mxfx.load_config(MIX)
    variants = [
        ("GPTQ MXFP4", gptq, ("compressed-tensors", "quark", "gguf")),
        ("searched 6.25-bit mix", weight_only(mix), ("compressed-tensors",)),
        ("mix, MXINT8 sites as MXFP8", weight_only(mix, "fp8_e4m3"), ("compressed-tensors",)),
    ]
    rows, jobs, quark_jobs, simulated = [], {}, {}, {}
    for label, config, formats in variants:
        start = time.perf_counter()
        calib = [(w[None],) for w in calibration] if any(r.weight_rounding == "gptq" for r in config.rules) else None
        prepared = mxfx.prepare(program, config, calibration=calib)
        ppl = pretrained.perplexity(prepared, windows)
        formats_of = sorted({e.data.elem_format for e in site_weights(prepared)})
        print(f"{label}: prepared, mxfx perplexity {ppl:.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        for fmt in formats:
            name = f"{label.split(',')[0].replace(' ', '_').replace('.', '')}-{fmt}"
            try:
                mxfx.save_pretrained(prepared, root / name, format=fmt, model=model, tokenizer=tokenizer)
            except mxfx.CheckpointError as error:
                rows.append([label, fmt, f"{ppl:.4f}", "refused", "-", f"CheckpointError: {str(error)[:110]}"])
                continue
            kind = fmt if fmt != "compressed-tensors" or len(formats_of) == 1 else "compressed-tensors-mixed"
            (quark_jobs if fmt == "quark" else jobs)[name] = kind
            simulated[name] = (label, fmt, ppl)
    loaded = load_elsewhere(sys.executable, root, jobs, sentence_ids) if jobs else {}
    if quark_jobs and args.quark_python:
        loaded |= load_elsewhere(args.quark_python, root, quark_jobs, sentence_ids)
    for name, (label, fmt, ppl) in simulated.items():
        got = loaded.get(name)
        if got is None:
            rows.append([label, fmt, f"{ppl:.4f}", "not loaded", "-", "no --quark-python given"])
            continue
        rows.append([label, fmt, f"{ppl:.4f}", f"{got['ppl']:.4f}", f"{abs(got['ppl'] / ppl - 1):.1e}", got["loader"]])
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF weights), fp32 perplexity {base:.4f}; {args.windows} windows x "
          f"{args.length} tokens of pydoc text; weight-only; GPTQ calibration {args.calibration} windows")
    print(tabulate(rows, headers=["model", "format", "mxfx ppl", "loaded ppl", "rel. diff", "loaded by (fresh process)"],
                   tablefmt="github"))


if __name__ == "__main__":
    main()
