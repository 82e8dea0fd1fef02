"""Accuracy recovery ablation on all-MiniLM-L6-v2: block-Hadamard rotation, error-minimizing (mse)
scales and GPTQ, each through `mxfx.prepare`, as the cosine of quantized vs fp32 sentence embeddings.

Every linear is quantized (weights and inputs, or weights only), blocks of 32 along in_features;
attention matmuls stay fp32. The metric is the mean over held-out pydoc sentences of the cosine
between the mean-pooled (L2-normalized) embeddings of the quantized and the fp32 model. GPTQ
calibrates on other sentences: the ones that follow the evaluation sentences in the text.

    python examples/recovery_minilm.py [--sentences 48] [--calibration 32] [--threads 1]
        [--formats fp8_e4m3,fp6_e2m3,fp4_e2m1] [--weights-only-formats fp4_e2m1]
        [--variants plain,rotation,mse,rotation+mse,gptq+rotation+mse]
"""

import argparse
import logging
import time
import warnings

import torch
from recovery_smollm2 import VARIANTS, config  # this directory is on sys.path when run as a script
from tabulate import tabulate

import mxfx
from mxfx.testing import pretrained

warnings.filterwarnings("ignore")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=48, help="held-out evaluation sentences")
    parser.add_argument("--calibration", type=int, default=32, help="GPTQ calibration sentences (other ones)")
    parser.add_argument("--batch", type=int, default=16, help="calibration sentences per batch")
    parser.add_argument("--formats", default="fp8_e4m3,fp6_e2m3,fp4_e2m1", help="W+A rows ('' for none)")
    parser.add_argument("--weights-only-formats", default="fp4_e2m1", help="weights-only rows ('' for none)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--verbose", action="store_true", help="log GPTQ progress")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); 1 is much "
                        "faster on an oversubscribed machine, where GPTQ's many small ops wait on thread barriers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    model, tokenizer = pretrained.load_minilm()
    texts = pretrained.sentences(args.sentences + args.calibration)
    if len(texts) < args.sentences + args.calibration:
        raise SystemExit(f"the pydoc text has only {len(texts)} usable sentences")
    held_out, calibration_texts = texts[: args.sentences], texts[args.sentences :]
    reference = pretrained.embed(model, tokenizer, held_out)
    example_args, example_kwargs = pretrained.minilm_example_inputs(tokenizer, held_out)
    program = mxfx.export(model, example_args, example_kwargs=example_kwargs)  # traced once, prepared many times
    calibration = []
    for start in range(0, len(calibration_texts), args.batch):
        batch_args, batch_kwargs = pretrained.minilm_example_inputs(tokenizer, calibration_texts[start : start + args.batch])
        calibration.append({"args": batch_args, "kwargs": batch_kwargs})
    variants = args.variants.split(",")
    rows = [(fmt, False) for fmt in args.formats.split(",") if fmt]
    rows += [(fmt, True) for fmt in args.weights_only_formats.split(",") if fmt]
    table = []
    for fmt, weights_only in rows:
        row = [fmt + (" weights only" if weights_only else " W+A")]
        for variant in variants:
            start = time.perf_counter()
            calib = calibration if "gptq" in variant else None
            prepared = mxfx.prepare(program, config(fmt, variant, weights_only, skip=()), calibration=calib)
            cosine = (pretrained.embed(prepared, tokenizer, held_out) * reference).sum(-1)
            row.append(f"{cosine.mean():.5f}")
            print(f"{row[0]}, {variant}: mean {cosine.mean():.5f}, min {cosine.min():.5f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
        table.append(row)
    print(f"\nall-MiniLM-L6-v2, mean cosine(quantized, fp32) of mean-pooled embeddings over {args.sentences} held-out "
          f"pydoc sentences; every linear, blocks of 32; GPTQ calibration: the next {args.calibration} sentences")
    print(tabulate(table, headers=["format", *variants], tablefmt="github"))


if __name__ == "__main__":
    main()
