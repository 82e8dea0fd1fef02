"""Prepared causal LMs: any batch and length after one prepare (shape classes), and generation."""

import gc
import itertools
import logging

import pytest
import torch
from conftest import bits_equal

import mxfx
from mxfx.graph import shape_classes

transformers = pytest.importorskip("transformers")

SPEC = mxfx.MXSpec("fp8_e4m3")
# Linears and every attention operand quantized: V (blocked along keys) makes lengths matter.
CONFIG = mxfx.QuantConfig(rules=(mxfx.Rule(match=".*", weight=SPEC, activation=SPEC,
                                           attention=mxfx.AttentionSpec(query=SPEC, key=SPEC, value=SPEC, probs=SPEC)),))


def tiny_llama(vocab=128, impl="sdpa", seed=0):
    """A tiny random LlamaForCausalLM (hidden 64, 2 layers, GQA 4/2 heads)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      use_cache=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config._attn_implementation = impl
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama_prepared():
    model = tiny_llama()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    return model, mxfx.prepare(model, CONFIG, (ids,))


def _logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.slow
def test_batch_one_and_any_length_after_one_prepare(llama_prepared, caplog):
    model, prepared = llama_prepared
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    for length in (16, 7, 1):
        both = _logits(prepared(ids[:, :length]))
        for row in range(2):
            with caplog.at_level(logging.WARNING, logger="mxfx.graph.shape_classes"):
                one = _logits(prepared(ids[row:row + 1, :length]))
            # the batch-2 call's bits; one token alone (a 1-row GEMM, another BLAS kernel) can differ
            # in the last bit, as the fp32 model itself does: then within 1e-6
            if length > 1:
                assert torch.equal(one[0], both[row]), (length, row)
            else:
                torch.testing.assert_close(one[0], both[row], rtol=0, atol=1e-6)
        # and exactly what a module prepared statically at this shape computes
        static = mxfx.prepare(model, CONFIG, (ids[:1, :length],), dynamic_shapes=None)
        assert bits_equal(_logits(static(ids[:1, :length])), _logits(prepared(ids[:1, :length])))
    assert "exporting it again" in caplog.text and "reusing the prepared module's quantized weights" in caplog.text


@pytest.mark.slow
def test_shape_classes_share_the_quantized_weights(monkeypatch):
    model = tiny_llama(seed=5)  # a model of its own: no shape class exported yet
    prepared = mxfx.prepare(model, CONFIG, (torch.randint(0, 128, (2, 16)),))
    calls = []
    real = mxfx.numerics.api.quantize
    monkeypatch.setattr(mxfx.numerics.api, "quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    one = shape_classes.module_for(prepared, (torch.zeros(1, 5, dtype=torch.long),))
    assert one is not prepared and not calls  # nothing quantized again
    ours = {name: t.data_ptr() for name, t in one.named_buffers() if name.startswith("mxfx_")}
    theirs = {name: t.data_ptr() for name, t in prepared.named_buffers() if name.startswith("mxfx_")}
    assert ours and ours.items() <= theirs.items()  # the same storage
    assert shape_classes.module_for(prepared, (torch.zeros(3, 9, dtype=torch.long),)) is prepared


def test_mlp_in_features_guard_is_kept():
    from mxfx.testing.models import MLP

    prepared = mxfx.prepare(MLP(), CONFIG, (torch.randn(2, 5, 64),))
    x = torch.randn(2, 1, 64)
    assert bits_equal(prepared(x[:1]), prepared(x)[:1])  # no size-1 branch: the same graph
    with pytest.raises(mxfx.InputGuardError, match="in_features"):
        prepared(torch.randn(1, 5, 32))


@pytest.mark.slow
def test_a_gone_model_is_explained():
    ids = torch.randint(0, 128, (2, 8))
    prepared = mxfx.prepare(tiny_llama(), CONFIG, (ids,))
    gc.collect()
    with pytest.raises(mxfx.InputGuardError, match="no longer exists"):
        prepared(ids[:1])


# -- generation ------------------------------------------------------------------------------
# Written here without mxfx's code: a (B, L) 0/1 mask -> positions and the no-cache 4-D mask.


def ref_positions(mask2d):
    out = torch.ones_like(mask2d)
    for b in range(mask2d.shape[0]):
        seen = 0
        for i in range(mask2d.shape[1]):
            if mask2d[b, i]:
                out[b, i] = seen
                seen += 1
    return out


def ref_mask(mask2d):
    """Causal and not padding; a padding query (nothing to see) sees itself."""
    batch, length = mask2d.shape
    out = torch.zeros(batch, 1, length, length, dtype=torch.bool)
    for b in range(batch):
        for i in range(length):
            for j in range(i + 1):
                out[b, 0, i, j] = bool(mask2d[b, j])
            if not out[b, 0, i].any():
                out[b, 0, i, i] = True
    return out


def no_cache_greedy(model, ids, mask2d, steps):
    """Greedy decoding by full forwards over the whole sequence; returns tokens and each step's logits."""
    logits_seen = []
    for _ in range(steps):
        logits = _logits(model(ids, attention_mask=ref_mask(mask2d), position_ids=ref_positions(mask2d)))[:, -1]
        logits_seen.append(logits)
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=-1)
        mask2d = torch.cat([mask2d, torch.ones_like(mask2d[:, :1])], dim=-1)
    return ids, logits_seen


def prompts(batch, length, seed):
    """Left-padded prompts: row b has b * 2 padding tokens (id 0)."""
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for b in range(batch):
        mask[b, :2 * b] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture(scope="module")
def llama_lm():
    from mxfx.integrations.generation import prepare_lm

    model = tiny_llama(seed=3)
    ids, mask = prompts(2, 8, 0)
    reference = mxfx.prepare(model, CONFIG, (ids,), example_kwargs=dict(attention_mask=ref_mask(mask),
                                                                        position_ids=ref_positions(mask)))
    return model, prepare_lm(model, CONFIG), reference


@pytest.mark.slow
@pytest.mark.parametrize("batch", [3, 1])
def test_greedy_with_the_cache_equals_a_no_cache_loop(llama_lm, batch):
    model, lm, reference = llama_lm
    for length in (6, 9):
        ids, mask = prompts(batch, length, seed=length)
        tokens, logits = lm.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], output_logits=True)
        expected, expected_logits = no_cache_greedy(reference, ids, mask, 6)
        assert torch.equal(tokens, expected)
        # the prefill is the full forward; a decode step's softmax runs over the cache's slots, not
        # the sequence's keys, and where its last bit flips an MX rounding of P the logits move by a
        # quantization step (linears alone: bitwise, below)
        assert torch.equal(logits[0], expected_logits[0])
        for ours, theirs in zip(logits, expected_logits):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0.05)


@pytest.mark.slow
def test_decode_steps_quantize_linears_as_the_full_forward_does():
    from mxfx.integrations.generation import prepare_lm

    config = mxfx.QuantConfig(rules=(mxfx.Rule(match=".*", weight=SPEC, activation=SPEC),))
    model = tiny_llama(seed=3)
    ids, mask = prompts(3, 7, seed=1)
    reference = mxfx.prepare(model, config, (ids,), example_kwargs=dict(attention_mask=ref_mask(mask),
                                                                        position_ids=ref_positions(mask)))
    tokens, logits = prepare_lm(model, config).generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[],
                                                        output_logits=True)
    expected, expected_logits = no_cache_greedy(reference, ids, mask, 5)
    assert torch.equal(tokens, expected)
    for ours, theirs in zip(logits, expected_logits):
        assert bits_equal(ours, theirs)


def test_full_precision_generate_equals_transformers():
    from mxfx.integrations.generation import prepare_lm

    model = tiny_llama(seed=4)
    lm = prepare_lm(model, None)
    ids, mask = prompts(3, 7, seed=5)
    ours = lm.generate(ids, attention_mask=mask, max_new_tokens=8)
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, use_cache=True)
    assert torch.equal(ours, theirs)
    settings = dict(max_new_tokens=8, do_sample=True, temperature=0.7, top_k=20, top_p=0.9)
    torch.manual_seed(11)
    sampled = lm.generate(ids, attention_mask=mask, **settings)
    torch.manual_seed(11)
    assert torch.equal(sampled, model.generate(ids, attention_mask=mask, use_cache=True, **settings))


@pytest.mark.slow
def test_sampling_with_a_seed_is_reproducible(llama_lm):
    _, lm, _ = llama_lm
    ids, mask = prompts(3, 6, seed=6)
    settings = dict(max_new_tokens=6, do_sample=True, temperature=0.8, top_k=30, top_p=0.95, eos_token_id=[])
    first = lm.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(5), **settings)
    again = lm.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(5), **settings)
    other = lm.generate(ids, attention_mask=mask, generator=torch.Generator().manual_seed(6), **settings)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_warp_matches_transformers_logits_warpers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    from mxfx.integrations.generation import warp

    scores = torch.randn(4, 128, generator=torch.Generator().manual_seed(0))
    expected = scores
    for warper in (TemperatureLogitsWarper(0.6), TopKLogitsWarper(17), TopPLogitsWarper(0.8)):
        expected = warper(None, expected)
    assert torch.equal(warp(scores, 0.6, 17, 0.8), expected)


# -- MX KV cache -------------------------------------------------------------------------------


def _reference_fake_quantize(states, fmt="fp8_e4m3"):
    """Per token along head_dim, one block per row (head_dim 16 <= 32), with the scalar reference."""
    from scalar_reference import fake_quantize_block

    rows = states.reshape(-1, states.shape[-1]).tolist()
    return torch.tensor([fake_quantize_block(row, fmt) for row in rows]).reshape(states.shape)


class QuantizingCache:
    """A cache that keeps nothing: the full forward's K and V, fake-quantized as an MX KV cache stores them."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return _reference_fake_quantize(key_states), _reference_fake_quantize(value_states)


def test_mx_kv_cache_stores_uint8_codes_and_e8m0_scales():
    from scalar_reference import EMAX, decode_code, fake_quantize_block, shared_exponent

    from mxfx.integrations.generation import positions, prepare_lm

    model = tiny_llama(seed=7)
    lm = prepare_lm(model, None, kv_cache="fp8_e4m3")
    ids, mask = prompts(2, 6, seed=2)
    slots = 9
    real = torch.zeros(2, slots, dtype=torch.bool)
    real[:, :6] = mask.bool()
    _, cache = lm.step(ids, positions(mask), real, torch.arange(6), lm.empty_cache(2, slots))
    k_codes, k_scales, v_codes, v_scales = cache[:4]  # layer 0
    assert {t.dtype for t in cache} == {torch.uint8}
    assert k_codes.shape == (2, 2, slots, 32) and k_scales.shape == (2, 2, slots, 1)  # head_dim 16: one block
    # layer 0's K and V do not depend on the cache: transformers' own, quantized by hand
    out = model(ids, attention_mask=ref_mask(mask), position_ids=ref_positions(mask),
                cache=transformers.DynamicCache(config=model.config), use_cache=True)
    layer = (getattr(out, "cache", None) or out.past_key_values).layers[0]
    assert EMAX["fp8_e4m3"] == 8
    for codes, scales, states in ((k_codes, k_scales, layer.keys), (v_codes, v_scales, layer.values)):
        assert not codes[:, :, 6:].any() and not scales[:, :, 6:].any()  # unwritten slots: zero bytes
        for b, h, t in itertools.product(range(2), range(2), range(6)):
            row = states[b, h, t].tolist()
            e = shared_exponent(max(map(abs, row)), "fp8_e4m3", "floor")
            assert scales[b, h, t, 0].item() == e + 127  # E8M0: the biased exponent
            decoded = [decode_code("fp8_e4m3", c) * 2.0 ** e for c in codes[b, h, t, :16].tolist()]
            assert decoded == fake_quantize_block(row, "fp8_e4m3")
            assert not codes[b, h, t, 16:].any()  # the block's padding


def test_mx_kv_cache_generation_matches_a_reference():
    from mxfx.integrations.generation import prepare_lm

    model = tiny_llama(seed=8)
    lm = prepare_lm(model, None, kv_cache="fp8_e4m3")
    ids, mask = prompts(3, 6, seed=3)
    tokens, logits = lm.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[], output_logits=True)
    expected, expected_logits = ids, []
    mask2d = mask
    with torch.no_grad():
        for _ in range(5):
            out = model(expected, attention_mask=ref_mask(mask2d), position_ids=ref_positions(mask2d),
                        cache=QuantizingCache(), use_cache=True)
            expected_logits.append(out.logits[:, -1])
            expected = torch.cat([expected, out.logits[:, -1].argmax(-1, keepdim=True)], dim=-1)
            mask2d = torch.cat([mask2d, torch.ones_like(mask2d[:, :1])], dim=-1)
    assert torch.equal(tokens, expected)
    for ours, theirs in zip(logits, expected_logits):
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
