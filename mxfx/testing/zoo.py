"""Tiny transformer architectures for the zoo tests: each builder returns (model, args, kwargs) for a
model built from a small random config (no downloads) in eval mode, with seeded weights and inputs.

Sizes are tiny (hidden 32-64, 1-2 layers, vocab 64-128, sequences of 8-16) so that export and
prepare take a second or two per architecture.
"""

from __future__ import annotations

import os

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB, HIDDEN, HEADS, LAYERS, SEQ = 96, 64, 2, 2, 12


def _ids(batch: int = 2, seq: int = SEQ, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def _hf(config_cls: str, model_cls: str, impl: str = "eager", **fields):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**fields)
    config._attn_implementation = impl
    return getattr(transformers, model_cls)(config).eval()


def _text(config_cls, model_cls, impl="eager", mask=True, **fields):
    model = _hf(config_cls, model_cls, impl, **fields)
    kwargs = {}
    if mask:
        attention_mask = torch.ones(2, SEQ, dtype=torch.long)
        attention_mask[1, SEQ - 3:] = 0  # the second sequence is padded
        kwargs["attention_mask"] = attention_mask
    return model, (_ids(),), kwargs


_ENCODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=2 * HIDDEN, max_position_embeddings=64)
_DECODER = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS * 2,
                num_key_value_heads=HEADS, intermediate_size=2 * HIDDEN, max_position_embeddings=64, use_cache=False)


def bert(impl="eager"):
    return _text("BertConfig", "BertModel", impl, **_ENCODER)


def roberta(impl="eager"):
    return _text("RobertaConfig", "RobertaModel", impl, **_ENCODER, pad_token_id=1)


def distilbert(impl="eager"):
    return _text("DistilBertConfig", "DistilBertModel", impl, vocab_size=VOCAB, dim=HIDDEN, n_layers=LAYERS,
                 n_heads=HEADS, hidden_dim=2 * HIDDEN, max_position_embeddings=64)


def gpt2(impl="eager"):
    return _text("GPT2Config", "GPT2LMHeadModel", impl, mask=False, vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS,
                 n_head=HEADS, n_positions=64, use_cache=False)


def llama(impl="eager"):
    return _text("LlamaConfig", "LlamaForCausalLM", impl, mask=False, **_DECODER)


def qwen2(impl="eager"):
    return _text("Qwen2Config", "Qwen2ForCausalLM", impl, mask=False, **_DECODER)


def mistral(impl="eager"):
    return _text("MistralConfig", "MistralForCausalLM", impl, mask=False, **_DECODER, sliding_window=8)


def gemma3(impl="eager"):
    return _text("Gemma3TextConfig", "Gemma3ForCausalLM", impl, mask=False, **_DECODER, head_dim=16,
                 sliding_window=8, layer_types=["sliding_attention", "full_attention"])


def phi3(impl="eager"):
    return _text("Phi3Config", "Phi3ForCausalLM", impl, mask=False, **_DECODER, pad_token_id=0)


def t5(impl="eager"):
    model = _hf("T5Config", "T5Model", impl, vocab_size=VOCAB, d_model=HIDDEN, d_kv=32, d_ff=2 * HIDDEN,
                num_layers=LAYERS, num_decoder_layers=1, num_heads=HEADS, use_cache=False,
                relative_attention_num_buckets=8, decoder_start_token_id=0)
    return model, (_ids(),), {"decoder_input_ids": _ids(seq=6)}


def bloom(impl="eager"):
    return _text("BloomConfig", "BloomModel", impl, vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS,
                 n_head=HEADS, use_cache=False)


def opt(impl="eager"):
    return _text("OPTConfig", "OPTModel", impl, vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                 num_attention_heads=HEADS, ffn_dim=2 * HIDDEN, max_position_embeddings=64, word_embed_proj_dim=HIDDEN,
                 use_cache=False)


def mpnet(impl="eager"):
    return _text("MPNetConfig", "MPNetModel", impl, **_ENCODER)  # MPNet buckets positions into 32 whatever the config says


def _pixels(size=32, channels=3):
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(1))


def vit(impl="eager"):
    model = _hf("ViTConfig", "ViTModel", impl, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=2 * HIDDEN, image_size=32, patch_size=8)
    return model, (_pixels(),), {}


def dinov2(impl="eager"):
    model = _hf("Dinov2Config", "Dinov2Model", impl, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                num_attention_heads=HEADS, mlp_ratio=2, image_size=32, patch_size=8)
    return model, (_pixels(),), {}


def clip_text(impl="eager"):
    return _text("CLIPTextConfig", "CLIPTextModel", impl, vocab_size=VOCAB, hidden_size=HIDDEN,
                 num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                 max_position_embeddings=64, projection_dim=HIDDEN)


def whisper(impl="eager"):
    model = _hf("WhisperConfig", "WhisperModel", impl, vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=1,
                decoder_layers=1, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                encoder_ffn_dim=2 * HIDDEN, decoder_ffn_dim=2 * HIDDEN, num_mel_bins=16, max_source_positions=16,
                max_target_positions=32, use_cache=False, pad_token_id=0, decoder_start_token_id=1)
    features = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1))  # 2 * max_source_positions frames
    return model, (), {"input_features": features, "decoder_input_ids": _ids(seq=6)}


def swin(impl="eager"):
    model = _hf("SwinConfig", "SwinModel", impl, image_size=32, patch_size=4, embed_dim=16, depths=[2, 1],
                num_heads=[2, 2], window_size=4, mlp_ratio=2.0)
    return model, (_pixels(),), {}


class _TorchEncoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(HIDDEN, HEADS, 2 * HIDDEN, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, LAYERS, enable_nested_tensor=False)

    def forward(self, x):
        return self.encoder(x, mask=torch.nn.Transformer.generate_square_subsequent_mask(x.shape[1]), is_causal=True)


class _TorchDecoder(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = torch.nn.TransformerDecoderLayer(HIDDEN, HEADS, 2 * HIDDEN, dropout=0.0, batch_first=True)
        self.decoder = torch.nn.TransformerDecoder(layer, 1)

    def forward(self, x, memory):
        return self.decoder(x, memory)


def torch_encoder(impl=None):
    torch.manual_seed(0)
    return _TorchEncoder().eval(), (torch.randn(2, SEQ, HIDDEN),), {}


def torch_decoder(impl=None):
    torch.manual_seed(0)
    return _TorchDecoder().eval(), (torch.randn(2, 6, HIDDEN), torch.randn(2, SEQ, HIDDEN)), {}


ZOO = {
    "bert": bert, "roberta": roberta, "distilbert": distilbert, "gpt2": gpt2, "llama": llama, "qwen2": qwen2,
    "mistral": mistral, "gemma3": gemma3, "phi3": phi3, "t5": t5, "bloom": bloom, "opt": opt, "mpnet": mpnet,
    "vit": vit, "dinov2": dinov2, "clip_text": clip_text, "whisper": whisper, "swin": swin,
    "torch_encoder": torch_encoder, "torch_decoder": torch_decoder,
}
