"""Hugging Face BERT and Llama built from small configs with random weights (offline): both
attention implementations ("sdpa" rewritten to mxfx.numerics.attention, "eager" matmuls quantized in place)
quantize the same operands, the output objects survive, and compile == eager."""

import os

import pytest
import torch

import mxfx
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig, Rule

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

E4M3 = MXSpec("fp8_e4m3")
ATTENTION = r".*self_attn|.*attention\.self"


def config(with_linears=True, with_attention=True):
    rules = []
    if with_attention:
        rules.append(Rule(match=ATTENTION, attention=AttentionSpec(E4M3, E4M3, E4M3, E4M3)))
    rules.append(Rule(match="lm_head", skip=True))
    if with_linears:
        rules.append(Rule(match=".*", weight=E4M3, activation=E4M3))
    return QuantConfig(tuple(rules))


def llama(impl: str):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   attn_implementation=impl, use_cache=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def bert(impl: str):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, max_position_embeddings=64, attn_implementation=impl)
    return transformers.BertModel(cfg).eval()


def attention_sites(prepared):
    return [(s.fqn, s.form) for s in prepared.mxfx_report.sites if s.kind == "attention"]


def test_llama_gqa_both_attention_implementations_agree():
    ids = torch.randint(0, 128, (2, 16))
    outputs = {}
    for impl, form in (("sdpa", "sdpa"), ("eager", "matmul")):
        model = llama(impl)
        prepared = mxfx.prepare(model, config(), (ids,))
        assert attention_sites(prepared) == [(f"model.layers.{i}.self_attn", form) for i in range(2)]
        out = prepared(ids)
        assert type(out).__name__ == "CausalLMOutputWithPast"
        outputs[impl] = out.logits
        assert (out.logits - model(ids).logits).abs().max() > 0  # it did quantize
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=1e-5, atol=1e-5)


def test_bert_padding_mask_both_implementations_agree():
    ids = torch.randint(0, 128, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    outputs = {}
    for impl in ("sdpa", "eager"):
        prepared = mxfx.prepare(bert(impl), config(), (ids,), example_kwargs={"attention_mask": mask})
        assert [fqn for fqn, _ in attention_sites(prepared)] == [f"encoder.layer.{i}.attention.self" for i in range(2)]
        outputs[impl] = prepared(ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=1e-5, atol=1e-5)


def test_attention_specs_absent_leave_sdpa_models_unchanged():
    ids = torch.randint(0, 128, (2, 16))
    model = llama("sdpa")
    cfg = QuantConfig((Rule(match=ATTENTION, attention=AttentionSpec()),))
    with pytest.warns(mxfx.MXFXWarning):  # the rule quantizes nothing
        prepared = mxfx.prepare(model, QuantConfig((*cfg.rules, Rule(match="nothing", weight=E4M3))), (ids,))
    torch.testing.assert_close(prepared(ids).logits, model(ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_llama_compiled_equals_eager(fresh_dynamo):
    ids = torch.randint(0, 128, (2, 16))
    prepared = mxfx.prepare(llama("sdpa"), config(), (ids,))
    compiled = torch.compile(prepared, fullgraph=True)
    torch.testing.assert_close(compiled(ids).logits, prepared(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["gpt2", "vit", "clip_text", "whisper", "bloom"])
def test_explicit_and_fused_attention_agree(name):
    """The same model with "eager" attention (explicit products quantized in place by
    QuantizeAttentionPass) and with "sdpa" (the fused mxfx.attention op, whose reference is written
    separately) gives the same output with every linear and attention quantized. BLOOM has no SDPA
    implementation: its baddbmm form is compared with the hand reference in test_attention."""
    from mxfx.testing import zoo as zoo_models

    everything = QuantConfig((Rule(match=".*", weight=E4M3, activation=E4M3,
                                   attention=AttentionSpec(E4M3, E4M3, E4M3, E4M3)),))
    outputs, forms = {}, {}
    for impl in ("eager", "sdpa"):
        try:
            model, args, kwargs = getattr(zoo_models, name)(impl)
        except ValueError:  # the architecture has no SDPA implementation
            assert name == "bloom" and impl == "sdpa"
            continue
        prepared = mxfx.prepare(model, everything, args, example_kwargs=kwargs)
        forms[impl] = {s.form for s in prepared.mxfx_report.sites if s.kind == "attention"}
        # every site but the convolution stems (ViT's patch embedding, Whisper's kernel-3 Conv1d: reported)
        assert all(s.quantized for s in prepared.mxfx_report.sites if s.form not in ("conv1d", "conv2d"))
        with torch.no_grad():
            outputs[impl] = prepared(*args, **kwargs)[0]
    assert forms["eager"] == ({"baddbmm"} if name == "bloom" else {"matmul"})
    if "sdpa" in outputs:
        assert forms["sdpa"] == {"sdpa"}
        torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=1e-5, atol=1e-5)
