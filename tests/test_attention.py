"""MX attention: SDPA and explicit matmul forms, against hand-written references."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import bits_equal
from mxfx.passes.match_attention_sites import MatchAttentionSitesPass, einsum_contraction
from mxfx.passes.quantize_attention import QuantizeAttentionPass
from zoo_reference import e4m3_fake_quantize

import mxfx
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.graph.sites import graph_sites
from mxfx.testing.models import CausalSelfAttention, NanoGPT

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
    # the output, against the model run with hooks: every linear but lm_head with E4M3 input and
    # weight, and h.0's attention recomputed with E4M3 Q, K, P, V (h.1's stays in fp32)
    def linear_hook(module, args, output):
        return F.linear(q8(args[0]), q8(module.weight), module.bias)

    def attention_hook(module, args, output):
        x = args[0]
        b, t, c = x.shape
        q, k, v = (y.view(b, t, module.n_head, -1).transpose(1, 2) for y in module.c_attn(x).split(c, dim=2))
        scores = (q8(q) @ q8(k.transpose(-2, -1), -2)) * (1.0 / math.sqrt(k.size(-1)))
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        y = q8(F.softmax(scores, dim=-1)) @ q8(v, -2)
        return module.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))

    hooks = [m.register_forward_hook(linear_hook) for name, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    hooks.append(model.transformer.h[0].attn.register_forward_hook(attention_hook))
    with torch.no_grad():
        want = model(idx)
    for hook in hooks:
        hook.remove()
    with torch.no_grad():
        assert bits_equal(prepared(idx), want)
        assert not bits_equal(prepared(idx), model(idx))


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
    # BLOOM's baddbmm + bmm form
    q, k, v = qkv()
    mask = torch.zeros(2, 1, 1, 12)
    prepared = mxfx.prepare(AlibiAttention(), attention_config(), (q, k, v, mask))
    torch.testing.assert_close(torch.compile(prepared, fullgraph=True)(q, k, v, mask), prepared(q, k, v, mask), rtol=1e-5, atol=1e-5)


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


# ---- explicit attention forms, strict matching ---------------------------------------------------
# References quantize with tests/zoo_reference.e4m3_fake_quantize (torch's own float8_e4m3fn cast),
# not with mxfx: Q and K along head_dim, P along the key axis, V along the sequence axis.

def q8(x, axis=-1):
    return e4m3_fake_quantize(x, axis)


def attention_sites(gm):
    return [s for s in graph_sites(gm) if s.kind == "attention"]


def prepare_one(model, *args):
    """Prepared with all four attention operands in E4M3; returns (prepared, its one attention site)."""
    prepared = mxfx.prepare(model, attention_config(), args)
    sites = attention_sites(prepared)
    assert len(sites) == 1, sites
    return prepared, sites[0]


def assert_idempotent(prepared):
    """Matching and quantizing again changes nothing (the quantized P is still found as P)."""
    cfg = attention_config()
    before = [dict(s.to_dict()) for s in graph_sites(prepared)]
    assert not MatchAttentionSitesPass(cfg)(prepared).modified
    assert not QuantizeAttentionPass(cfg)(prepared).modified
    assert [s.to_dict() for s in graph_sites(prepared)] == before


def qkv(batch=2, heads=2, length=12, source=12, dim=32, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, heads, length, dim, generator=g, dtype=dtype),
            torch.randn(batch, heads, source, dim, generator=g, dtype=dtype),
            torch.randn(batch, heads, source, dim, generator=g, dtype=dtype))


class AlibiAttention(torch.nn.Module):
    """BLOOM's form: scores from baddbmm(alibi, q, k^T, beta, alpha), reshaped to [B, H, L, S] for
    the padding mask and the fp32 softmax, back to [B*H, L, S] for bmm with V."""

    def __init__(self, heads=2):
        super().__init__()
        self.register_buffer("slopes", torch.tensor([2.0 ** -(8 * (h + 1) / heads) for h in range(heads)]))

    def forward(self, q, k, v, mask):
        b, h, length, d = q.shape
        alibi = (self.slopes[:, None] * torch.arange(k.shape[2], dtype=q.dtype)).repeat(b, 1)[:, None, :]
        scores = torch.baddbmm(alibi, q.reshape(b * h, length, d), k.reshape(b * h, -1, d).transpose(1, 2),
                               beta=1.0, alpha=d ** -0.5)
        scores = scores.view(b, h, length, -1) + mask
        probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(probs.view(b * h, length, -1), v.reshape(b * h, -1, d)).view(b, h, length, d)


def test_baddbmm_alibi_attention():
    q, k, v = qkv()
    mask = torch.zeros(2, 1, 1, 12).masked_fill(torch.arange(12) >= 9, float("-inf"))  # padded after 9 keys
    model = AlibiAttention()
    prepared, site = prepare_one(model, q, k, v, mask)
    assert site.quantized and site.form == "baddbmm" and site.node.startswith("softmax")
    assert count(prepared, "fake_quantize") == 4
    b, h, length, d = q.shape
    alibi = (model.slopes[:, None] * torch.arange(12.0)).repeat(b, 1)[:, None, :]
    scores = torch.baddbmm(alibi, q8(q.reshape(b * h, length, d)), q8(k.reshape(b * h, -1, d).transpose(1, 2), -2),
                           beta=1.0, alpha=d ** -0.5)
    probs = F.softmax(scores.view(b, h, length, -1) + mask, dim=-1, dtype=torch.float32)
    want = torch.bmm(q8(probs.view(b * h, length, -1)), q8(v.reshape(b * h, -1, d), -2)).view(b, h, length, d)
    assert bits_equal(prepared(q, k, v, mask), want)
    assert_idempotent(prepared)


class BiasedAttention(torch.nn.Module):
    """T5/MPNet's form: relative position bias (an embedding, broadcast over the batch) and a
    padding mask added to the scaled scores; dropout after the softmax (identity in eval)."""

    def __init__(self, heads=2, length=12):
        super().__init__()
        self.bias = torch.nn.Embedding(2 * length, heads)
        self.dropout = torch.nn.Dropout(0.1)
        self.length = length

    def forward(self, q, k, v, mask):
        positions = torch.arange(self.length)
        bias = self.bias(positions[None, :] - positions[:, None] + self.length).permute(2, 0, 1)[None]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        scores = scores + bias
        scores = scores + mask
        return torch.matmul(self.dropout(F.softmax(scores, dim=-1)), v)


def test_relative_bias_and_mask_add():
    q, k, v = qkv()
    mask = torch.zeros(2, 1, 1, 12)
    mask[1, ..., 10:] = torch.finfo(torch.float32).min
    torch.manual_seed(0)
    model = BiasedAttention().eval()
    prepared, site = prepare_one(model, q, k, v, mask)
    assert site.quantized and site.form == "matmul"
    positions = torch.arange(12)
    bias = model.bias(positions[None, :] - positions[:, None] + 12).permute(2, 0, 1)[None]
    scores = (q8(q) @ q8(k.transpose(-1, -2), -2)) / math.sqrt(32) + bias + mask
    want = q8(F.softmax(scores, dim=-1)) @ q8(v, -2)
    assert bits_equal(prepared(q, k, v, mask), want)


class ScaleFirstAttention(torch.nn.Module):
    """Scale q before the product (by division), K given pre-transposed to bmm: [B, D, S]."""

    def forward(self, q, k_t, v):
        scores = torch.bmm(q / math.sqrt(q.shape[-1]), k_t)
        return torch.bmm(F.softmax(scores, dim=-1), v)


def test_div_before_matmul_and_pre_transposed_key():
    q, k, v = (t.flatten(0, 1) for t in qkv())
    k_t = k.transpose(1, 2).contiguous()  # [B, D, S]: the contraction axis is -2 of the right operand
    prepared, site = prepare_one(ScaleFirstAttention(), q, k_t, v)
    assert site.quantized and site.form == "bmm"
    # K quantized along head_dim: its own last axis, i.e. k_t's second-to-last
    scores = torch.bmm(q8(q / math.sqrt(32)), q8(k).transpose(1, 2))
    want = torch.bmm(q8(F.softmax(scores, dim=-1)), q8(v, -2))
    assert bits_equal(prepared(q, k_t, v), want)


class MaskedFillWhereAttention(torch.nn.Module):
    """masked_fill with a padding mask, then where() with a causal mask (the value operand is the
    scores, the other value a scalar tensor), scale by mul after the product."""

    def forward(self, q, k, v, pad):
        scores = (q @ k.transpose(-2, -1)) * 0.125
        scores = scores.masked_fill(pad, float("-inf"))
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        scores = torch.where(causal, scores, torch.tensor(torch.finfo(scores.dtype).min))
        return scores.softmax(-1) @ v


def test_masked_fill_and_where():
    q, k, v = qkv()
    pad = torch.zeros(2, 1, 1, 12, dtype=torch.bool)
    pad[0, ..., 11] = True
    prepared, site = prepare_one(MaskedFillWhereAttention(), q, k, v, pad)
    assert site.quantized
    scores = ((q8(q) @ q8(k.transpose(-2, -1), -2)) * 0.125).masked_fill(pad, float("-inf"))
    scores = torch.where(torch.ones(12, 12, dtype=torch.bool).tril(), scores, torch.tensor(torch.finfo(torch.float32).min))
    want = q8(scores.softmax(-1)) @ q8(v, -2)
    assert bits_equal(prepared(q, k, v, pad), want)


class CastClampAttention(torch.nn.Module):
    """bf16 scores cast to fp32, clamped, softmax(dtype=float32), cast back, reshaped on the way."""

    def forward(self, q, k, v):
        b, h, length, _ = q.shape
        scores = torch.matmul(q, k.transpose(2, 3)).reshape(b * h, length, -1)
        scores = scores.float().clamp(min=-30.0, max=30.0).view(b, h, length, -1)
        probs = torch.softmax(scores, dim=3, dtype=torch.float32).to(q.dtype)
        return torch.matmul(probs, v)


def test_cast_clamp_softmax_dtype():
    q, k, v = qkv(dtype=torch.bfloat16)
    prepared, site = prepare_one(CastClampAttention(), q, k, v)
    assert site.quantized
    scores = torch.matmul(q8(q), q8(k.transpose(2, 3), -2)).float().clamp(min=-30.0, max=30.0)
    want = torch.matmul(q8(torch.softmax(scores, dim=3, dtype=torch.float32).to(torch.bfloat16)), q8(v, -2))
    assert bits_equal(prepared(q, k, v), want)


class EinsumPreTransposed(torch.nn.Module):
    """einsum for both products, K given as [..., D, S], '...' batch dims, dropout after softmax."""

    def forward(self, q, k_t, v):
        scores = torch.einsum("...ld,...ds->...ls", q, k_t) * q.shape[-1] ** -0.5
        probs = F.dropout(scores.softmax(dim=-1), p=0.1, training=self.training)
        return torch.einsum("...ls,...sd->...ld", probs, v)


def test_einsum_both_products_pre_transposed_key():
    q, k, v = qkv()
    k_t = k.transpose(-1, -2)
    prepared, site = prepare_one(EinsumPreTransposed().eval(), q, k_t, v)
    assert site.quantized and site.form == "einsum"
    scores = torch.einsum("...ld,...ds->...ls", q8(q), q8(k_t, -2)) * 32 ** -0.5
    want = torch.einsum("...ls,...sd->...ld", q8(scores.softmax(dim=-1)), q8(v, -2))
    assert bits_equal(prepared(q, k_t, v), want)
    assert_idempotent(prepared)


# ---- negative cases: left alone, recorded when they look like attention ---------------------------

def assert_untouched(model, args, prepared):
    assert count(prepared, "fake_quantize") == 0 and count(prepared, "attention") == 0
    assert bits_equal(prepared(*args), model(*args))


class BiasFromMatmul(torch.nn.Module):
    """A position bias computed by a matmul (broadcast over batch and heads) added to the scores."""

    def forward(self, q, k, v, pos):
        scores = q @ k.transpose(-2, -1)
        bias = pos @ pos.transpose(-2, -1)  # from activations: a matmul in the bias branch
        return (scores + bias).softmax(-1) @ v


def test_matmul_in_bias_branch_is_not_qk():
    q, k, v = qkv()
    pos = torch.randn(12, 8)  # bias [L, S], broadcast over batch and heads
    model = BiasFromMatmul()
    prepared, site = prepare_one(model, q, k, v, pos)
    assert site.quantized
    qk = next(n for n in prepared.graph.nodes if n.name == site.nodes[0])
    assert [a.target for a in qk.args] == [torch.ops.mxfx.fake_quantize.default] * 2
    bias_matmul = [n for n in prepared.graph.nodes if n.target is torch.ops.aten.matmul.default
                   and n.meta["val"].shape == (12, 12)]
    assert len(bias_matmul) == 1 and all(a.op == "placeholder" or a.target is torch.ops.aten.transpose.int
                                         for a in bias_matmul[0].args)  # the bias product is untouched
    want = ((q8(q) @ q8(k.transpose(-2, -1), -2)) + pos @ pos.T).softmax(-1)
    assert bits_equal(prepared(q, k, v, pos), q8(want) @ q8(v, -2))


def test_two_full_shape_products_are_ambiguous():
    q, k, v = qkv()
    pos = torch.randn(2, 2, 12, 8)  # bias [B, H, L, S], as large as the scores
    model = BiasFromMatmul()
    with pytest.warns(mxfx.MXFXWarning, match="left in high precision"):  # never silent
        prepared, site = prepare_one(model, q, k, v, pos)
    assert site.status == "check failed" and "ambiguous" in site.reason and not site.nodes
    assert_untouched(model, (q, k, v, pos), prepared)


class SoftmaxOverQueries(torch.nn.Module):
    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1)).softmax(dim=-2) @ v


def test_softmax_over_query_axis_is_not_attention():
    q, k, v = qkv()
    model = SoftmaxOverQueries()
    with pytest.warns(mxfx.MXFXWarning, match="left in high precision"):  # never silent
        prepared, site = prepare_one(model, q, k, v)
    assert site.status == "check failed" and "not the key (last) axis" in site.reason
    assert_untouched(model, (q, k, v), prepared)


class RouterAndHead(torch.nn.Module):
    """An MoE router's softmax (then top-k) and a classifier head's softmax: not attention."""

    def __init__(self, d=32, experts=4, classes=8):
        super().__init__()
        self.router, self.experts = torch.nn.Linear(d, experts), torch.nn.Linear(d, d * experts)
        self.head = torch.nn.Linear(d, classes)

    def forward(self, x):
        weights, chosen = self.router(x).softmax(-1).topk(2, dim=-1)
        expert_out = self.experts(x).unflatten(-1, (4, -1))
        mixed = (expert_out.gather(-2, chosen[..., None].expand(-1, -1, -1, 32)) * weights[..., None]).sum(-2)
        return self.head(mixed).softmax(-1)


def test_router_and_classifier_softmax_are_not_sites():
    model, x = RouterAndHead(), torch.randn(2, 6, 32)
    prepared = mxfx.prepare(model, QuantConfig((Rule(match=".*", attention=AttentionSpec(E4M3, E4M3, E4M3, E4M3)),)), (x,))
    assert attention_sites(prepared) == [] and count(prepared, "fake_quantize") == 0
    assert bits_equal(prepared(x), model(x))


class ProbsOnTheRight(torch.nn.Module):
    """v^T @ p^T: the probabilities are the right operand of the second product (keys not contracted
    as P @ V would): a candidate that fails the PV check."""

    def forward(self, q, k, v):
        probs = (q @ k.transpose(-2, -1)).softmax(-1)
        return v.transpose(-2, -1) @ probs


def test_probabilities_as_right_operand_check_failed():
    q, k, v = qkv()
    model = ProbsOnTheRight()
    with pytest.warns(mxfx.MXFXWarning, match="left in high precision"):  # never silent
        prepared, site = prepare_one(model, q, k, v)
    assert site.status == "check failed" and "left operand" in site.reason
    assert_untouched(model, (q, k, v), prepared)


class MixingAndPermutedScores(torch.nn.Module):
    """Learned mixing weights (a softmax of a parameter) applied by a matmul: not attention; then a
    real Q @ K^T whose scores are permuted before the softmax (a form the pass does not follow)."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Parameter(torch.randn(12, 12))

    def forward(self, q, k, v):
        v = self.mix.softmax(-1) @ v
        scores = (q @ k.transpose(-2, -1)).permute(0, 1, 3, 2)
        return scores.softmax(-1) @ v


def test_mixing_weights_not_a_site_permuted_scores_unsupported():
    q, k, v = qkv()
    model = MixingAndPermutedScores()
    with pytest.warns(mxfx.MXFXWarning, match="left in high precision"):
        prepared, site = prepare_one(model, q, k, v)
    assert site.status == "unsupported" and "scores come from 'matmul_1'" in site.reason and site.form == "softmax"
    assert_untouched(model, (q, k, v), prepared)


def test_baddbmm_with_only_the_key_quantized_is_a_quantized_site():
    """baddbmm's operands are args 1 and 2 (not 0 and 1): quantizing K alone still counts."""
    q, k, v = qkv()
    mask = torch.zeros(2, 1, 1, 12)
    prepared = mxfx.prepare(AlibiAttention(), attention_config(query=None, value=None, probs=None), (q, k, v, mask))
    (site,) = attention_sites(prepared)
    assert site.quantized and count(prepared, "fake_quantize") == 1
    baddbmm = next(n for n in prepared.graph.nodes if n.target is torch.ops.aten.baddbmm.default)
    assert baddbmm.args[2].target is torch.ops.mxfx.fake_quantize.default and baddbmm.args[2].args[3] == -2
