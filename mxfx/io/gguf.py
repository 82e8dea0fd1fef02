"""GGUF files with `GGML_TYPE_MXFP4` (39) weights for llama-family models (llama.cpp's format).

An MXFP4 tensor is a sequence of 17-byte blocks of 32 elements along in_features: the E8M0 byte
(OCP MX v1.0 §5.4.1), then 16 bytes where byte j holds element j in the low nibble and element
j + 16 in the high one (not the adjacent-pair order of compressed-tensors and Quark). The nibbles
are OCP E2M1 codes: ggml decodes them through the doubled table {0, 1, 2, 3, 4, 6, 8, 12} times
2^(e - 128), the same values. A weight [N, K] is recorded with GGUF shape [K, N].

As llama.cpp's converter does, the rows of q_proj / k_proj (and their biases) are permuted from
Hugging Face's rotary layout to llama.cpp's (`permute` below); transformers' GGUF loader applies
the inverse. MX blocks run along rows, so permuting rows moves whole blocks with their scales.
Other tensors are written as F32 (F16 where the model holds fp16). Tensor names come from
gguf-py's own name map; metadata carries the llama hyperparameters and `llama.vocab_size`, and
the tokenizer's vocabulary when it is a byte-level BPE tokenizer (gpt2 style).
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mxfx.errors import CheckpointError, MissingDependencyError, MXFXWarning
from mxfx.io.checkpoint_plan import MX_BLOCK, CheckpointPlan, QuantizedLinear
from mxfx.numerics.formats import get_format
from mxfx.numerics.reference import unpack_codes

log = logging.getLogger(__name__)
ARCHITECTURES = ("llama",)


def _gguf():
    try:
        import gguf
    except ImportError:
        raise MissingDependencyError("writing GGUF needs the gguf package: pip install gguf "
                                     "(or pip install 'mxfx[checkpoints]')") from None
    return gguf


def permute(rows: Tensor, n_head: int) -> Tensor:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py `LlamaModel.permute`): within each
    head, rows (pair, half) -> (half, pair)."""
    shape = rows.shape
    return rows.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def mxfp4_blocks(layer: QuantizedLinear) -> Tensor:
    """The layer's codes and scales as GGUF MXFP4 bytes, uint8 [N, K/32 * 17]."""
    data = layer.data
    n, k = data.shape
    codes = unpack_codes(data.codes, get_format(data.elem_format))[:, :k].reshape(n, k // MX_BLOCK, MX_BLOCK)
    qs = codes[..., :16] | (codes[..., 16:] << 4)  # byte j: element j (low), element j + 16 (high)
    return torch.cat([data.scales.reshape(n, k // MX_BLOCK, 1), qs], dim=-1).reshape(n, -1).contiguous()


def _head_counts(config: Any) -> dict[str, int]:
    heads = config.num_attention_heads
    return {"q_proj": heads, "k_proj": getattr(config, "num_key_value_heads", None) or heads}


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise CheckpointError(f"the model uses {kind!r} rope scaling: mxfx writes GGUF metadata for default rope only")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _metadata(writer, config: Any) -> None:
    heads = config.num_attention_heads
    writer.add_name(str(getattr(config, "name_or_path", "") or "mxfx-export"))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_rope_dimension_count(getattr(config, "head_dim", None) or config.hidden_size // heads)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(config.vocab_size)


def _tokenizer(writer, tokenizer: Any) -> bool:
    """Write a byte-level BPE tokenizer's vocabulary, merges and special ids; False if it is not one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        return False
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        return False
    special = set(getattr(tokenizer, "all_special_ids", []))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control, 1: normal
    writer.add_token_merges(merges)
    for name, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id), ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, name, None)
        if value is not None:
            add(int(value))
    return True


def write(plan: CheckpointPlan, path: Path, tokenizer: Any = None) -> Path:
    """Write `plan` as one GGUF file (`path` if it ends in .gguf, else `path/model.gguf`)."""
    gguf = _gguf()
    config = plan.config
    if getattr(config, "model_type", None) not in ARCHITECTURES:
        raise CheckpointError(f"GGUF export supports llama-family models ({', '.join(ARCHITECTURES)}); "
                              f"got model_type {getattr(config, 'model_type', None)!r}")
    for layer in plan.quantized.values():
        if layer.data.elem_format != "fp4_e2m1":
            raise CheckpointError(f"site {layer.fqn} stores {layer.data.elem_format} weights: GGUF has an MX type "
                                  "for fp4_e2m1 only (GGML_TYPE_MXFP4)")
        if layer.activation is not None:
            raise CheckpointError(f"site {layer.fqn} quantizes its input as {layer.activation.describe()}: llama.cpp "
                                  "quantizes activations itself (to Q8_0 on CPU, not an MX format), so a GGUF file "
                                  "cannot carry the rule; prepare with a weight-only config for this export")
    file = path if path.suffix == ".gguf" else path / "model.gguf"
    file.parent.mkdir(parents=True, exist_ok=True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = _head_counts(config)
    writer = gguf.GGUFWriter(str(file), "llama")
    _metadata(writer, config)
    if tokenizer is not None and not _tokenizer(writer, tokenizer):
        warnings.warn(f"mxfx: {type(tokenizer).__name__} is not a byte-level BPE tokenizer: the GGUF file carries "
                      "no tokenizer (llama.vocab_size is set; load the tokenizer separately)", MXFXWarning, stacklevel=3)

    def gguf_name(hf_name: str) -> str:
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CheckpointError(f"tensor {hf_name} has no llama GGUF name (gguf-py's tensor name map)")
        return name

    def rows(hf_name: str, tensor: Tensor) -> Tensor:
        module = hf_name.rsplit(".", 2)[-2]
        return permute(tensor, heads[module]) if module in heads else tensor

    quantized = {f"{fqn}.weight": layer for fqn, layer in plan.quantized.items()}
    tensors = dict(plan.dense) | quantized
    for hf_name in plan.model.state_dict():
        if hf_name not in tensors:
            continue  # a tied duplicate the plan dropped
        value = tensors[hf_name]
        if isinstance(value, QuantizedLinear):
            blocks = rows(hf_name, mxfp4_blocks(value))
            writer.add_tensor(gguf_name(hf_name), blocks.numpy(), raw_dtype=gguf.GGMLQuantizationType.MXFP4)
        else:
            dense = rows(hf_name, value.detach())
            dense = dense.to(torch.float16 if dense.dtype == torch.float16 else torch.float32)
            writer.add_tensor(gguf_name(hf_name), dense.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    log.info("wrote %s: %d MXFP4 tensors", file, len(quantized))
    return file
