"""MX attention: SDPA and explicit matmul forms, against hand-written references."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import bits_equal
from mxfx.passes.match_attention_sites import MatchAttentionSitesPass, einsum_contraction
from mxfx.passes.quantize_attention import QuantizeAttentionPass

import mxfx
from mxfx.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.model_zoo import CausalSelfAttention, NanoGPT

E4M3, INT8 = MXSpec("fp8_e4m3"), MXSpec("int8", block_size=16)


def attention_config(match=".*", query=E4M3, key=E4M3, value=E4M3, probs=E4M3):
    return QuantConfig((Rule(match=match, attention=AttentionSpec(query, key, value, probs)),))


def fq(x, spec, axis):
    return x if spec is None else mxfx.fake_quantize(x, spec.format, block_size=spec.block_size, axis=axis)


def reference_attention(q, k, v, specs, *, causal=False, mask=None, scale=None):
    """Hand-written MX attention: Q, K along head_dim; scale after the fp32 product; P along keys;
    V along the sequence axis."""
    qs, ks, vs, ps = specs
    scores = fq(q.float(), qs, -1) @ fq(k.float(), ks, -1).transpose(-2, -1)
    scores = scores * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if causal:
        scores = scores.masked_fill(~torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    probs = fq(torch.softmax(scores, -1), ps, -1)
    return (probs @ fq(v.float(), vs, -2)).to(q.dtype)


def count(gm, name):
    target = getattr(torch.ops.mxfx, name).default
    return sum(1 for n in gm.graph.nodes if n.target is target)


class SDPABlock(torch.nn.Module):
    """q, k, v given directly; optional padding mask, GQA and custom scale."""

    def __init__(self, **sdpa_kwargs):
        super().__init__()
        self.kwargs = sdpa_kwargs

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **self.kwargs)


@pytest.mark.parametrize("kwargs", [dict(is_causal=True), dict(scale=0.2), dict(enable_gqa=True, is_causal=True)])
def test_sdpa_equals_hand_reference_bitwise(kwargs):
    torch.manual_seed(0)
    heads_kv = 2 if kwargs.get("enable_gqa") else 4
    q, k, v = torch.randn(2, 4, 24, 32), torch.randn(2, heads_kv, 24, 32), torch.randn(2, heads_kv, 24, 32)
    specs = (E4M3, MXSpec("fp6_e2m3"), INT8, MXSpec("fp8_e5m2"))
    prepared = mxfx.prepare(SDPABlock(**kwargs), attention_config(query=specs[0], key=specs[1], value=specs[2], probs=specs[3]), (q, k, v))
    assert count(prepared, "attention") == 1
    kk, vv = (k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)) if kwargs.get("enable_gqa") else (k, v)
    want = reference_attention(q, kk, vv, specs, causal=kwargs.get("is_causal", False), scale=kwargs.get("scale"))
    assert bits_equal(prepared(q, k, v), want)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_sdpa_with_padding_mask(mask_dtype):
    q = k = v = torch.randn(2, 4, 16, 32)
    keep = torch.ones(2, 1, 16, 16, dtype=torch.bool)
    keep[1, :, :, 12:] = False  # the second sequence is padded after 12 tokens
    mask = keep if mask_dtype is torch.bool else torch.zeros(2, 1, 16, 16).masked_fill(~keep, float("-inf"))
    prepared = mxfx.prepare(SDPABlock(), attention_config(), (q, k, v, mask))
    want = reference_attention(q, k, v, (E4M3,) * 4, mask=mask)
    assert bits_equal(prepared(q, k, v, mask), want)


def test_no_attention_specs_match_sdpa_to_1e6():
    q, k, v = torch.randn(2, 4, 16, 32), torch.randn(2, 4, 16, 32), torch.randn(2, 4, 16, 32)
    model = SDPABlock(is_causal=True)
    prepared = mxfx.prepare(model, attention_config(query=E4M3, key=None, value=None, probs=None), (q, k, v))
    assert count(prepared, "attention") == 1
    # an attention op with every operand in high precision is plain SDPA math
    everything_off = torch.ops.mxfx.attention(q, k, v, None, True, None, False, "", "", "", "")
    want = model(q, k, v)
    assert ((everything_off - want).abs().max() / want.abs().max()) <= 1e-6


@pytest.mark.parametrize("flash", [True, False])
def test_nanogpt_attention_both_paths(flash):
    torch.manual_seed(0)
    model, x = CausalSelfAttention(64, 4, flash=flash), torch.randn(2, 16, 64)
    prepared = mxfx.prepare(model, attention_config(match=""), (x,))
    site = [s for s in prepared.mxfx_report.sites if s.kind == "attention"]
    assert len(site) == 1 and site[0].form == ("sdpa" if flash else "matmul") and site[0].rule == 0
    assert count(prepared, "attention") == (1 if flash else 0)
    assert count(prepared, "fake_quantize") == (0 if flash else 4)
    # the hand reference, computed on the model's own q, k, v
    q, k, v = model.c_attn(x).split(64, dim=2)
    q, k, v = (t.view(2, 16, 4, 16).transpose(1, 2) for t in (q, k, v))
    y = reference_attention(q, k, v, (E4M3,) * 4, causal=True)
    want = model.c_proj(y.transpose(1, 2).contiguous().view(2, 16, 64))
    got = prepared(x)
    if flash:
        assert bits_equal(got, want)
    else:  # the manual path scales after the matmul in its own order: same quantized operands
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_rules_and_linear_rules_together():
    model, idx = NanoGPT(n_layer=2, flash=False), torch.randint(0, 256, (2, 16))
    cfg = QuantConfig((
        Rule(match="lm_head", skip=True),
        Rule(match=r"transformer\.h\.0\.attn", attention=AttentionSpec(E4M3, E4M3, E4M3, E4M3)),
        Rule(match=".*", weight=E4M3, activation=E4M3),
    ))
    prepared = mxfx.prepare(model, cfg, (idx,))
    attention_sites = [s for s in prepared.mxfx_report.sites if s.kind == "attention"]
    assert [(s.fqn, s.rule) for s in attention_sites] == [("transformer.h.0.attn", 1), ("transformer.h.1.attn", 2)]
    assert count(prepared, "fake_quantize") == 4  # only h.0's attention; rule 2 has no attention spec
    assert count(prepared, "linear") == 8


def test_attention_passes_idempotent():
    gm = torch.export.export(CausalSelfAttention(64, 4, flash=False), (torch.randn(2, 16, 64),)).module()
    cfg = attention_config()
    match, quantize = MatchAttentionSitesPass(cfg), QuantizeAttentionPass(cfg)
    assert match(gm).modified and quantize(gm).modified
    assert not match(gm).modified and not quantize(gm).modified


def testeinsum_contraction():
    assert einsum_contraction("bhqd,bhkd->bhqk") == (-1, -1)
    assert einsum_contraction("bhqk,bhkd->bhqd") == (-1, -2)
    assert einsum_contraction("...qd,...kd->...qk") == (-1, -1)
    assert einsum_contraction("ij,jk,kl->il") is None


def test_einsum_attention():
    class EinsumAttention(torch.nn.Module):
        def forward(self, q, k, v):
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / 4.0
            return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)

    q, k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    prepared = mxfx.prepare(EinsumAttention(), attention_config(), (q, k, v))
    assert count(prepared, "fake_quantize") == 4
    want = reference_attention(q, k, v, (E4M3,) * 4, scale=0.25)
    torch.testing.assert_close(prepared(q, k, v), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_attention_equals_eager(fresh_dynamo):
    model, idx = NanoGPT(n_layer=1), torch.randint(0, 256, (2, 32))
    for flash in (True, False):
        model = NanoGPT(n_layer=1, flash=flash)
        cfg = QuantConfig((Rule(match=".*attn", attention=AttentionSpec(E4M3, E4M3, E4M3, E4M3)),))
        prepared = mxfx.prepare(model, cfg, (idx,))
        torch.testing.assert_close(torch.compile(prepared, fullgraph=True)(idx), prepared(idx), rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()


def test_attention_export_round_trip():
    import io

    q, k, v = torch.randn(2, 4, 16, 32), torch.randn(2, 4, 16, 32), torch.randn(2, 4, 16, 32)
    prepared = mxfx.prepare(SDPABlock(is_causal=True), attention_config(), (q, k, v))
    program = torch.export.export(prepared, (q, k, v)).run_decompositions()
    assert count(program.graph_module, "attention") == 1
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    assert bits_equal(torch.export.load(buffer).module()(q, k, v), prepared(q, k, v))
