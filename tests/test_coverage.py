"""Forms beyond the plain linear, and the completeness pass that makes "never silent" hold.

- kernel-1 `Conv1d` projections (one group, stride 1, unpadded) are linears over their channels;
- einsum with 3-D weights: linears over flattened indices (`'ibh,hnd->ibnd'`, `'ibnd,hnd->ibh'`) and
  per-head batched linears (`'bind,snd->bnis'`, one linear per head);
- attention with sink logits (`cat([scores, sinks], -1)`, max subtraction, softmax, `P[..., :-1]`), and
  elementwise max/min/clamp against constants on a scores path;
- `passes/report_unquantized.py`: a custom op, a convolution or a product reading a weight, and a softmax
  over a product of two activations, that no pass made a site, are UNSUPPORTED rows in the report, the
  summary (table and JSON) and the one-time MXFXWarning; `find_sites` and `prepare` agree site by site.

Numerics are checked against `zoo_reference.e4m3_fake_quantize` (itself checked against the exact
scalar reference in test_zoo) applied by hand to the equivalent plain linears and attention; each
hand reference is first checked to reproduce the model with quantization off.
"""

import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from mxfx.passes.report_unquantized import ReportUnquantizedPass
from torch import nn
from zoo_reference import e4m3_fake_quantize

import mxfx
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.graph.sites import ATTENTION, CHECK_FAILED, LINEAR, QUANTIZED, UNSUPPORTED

E4M3 = MXSpec("fp8_e4m3")
ATTENTION_ONLY = QuantConfig((Rule(match=".*", attention=AttentionSpec(E4M3, E4M3, E4M3, E4M3)),))


def linears(storage="simulated", activation=E4M3):
    return QuantConfig((Rule(match=".*", weight=E4M3, activation=activation, weight_storage=storage),))


def fq(x, axis=-1):
    return e4m3_fake_quantize(x, axis)


def identity(x, axis=-1):
    return x


def prepare_quietly(model, config, args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mxfx.MXFXWarning)
        return mxfx.prepare(model, config, args)


def report(prepared):
    return {s.fqn: s for s in prepared.mxfx_report.sites}


def count(gm, target):
    return sum(n.op == "call_function" and n.target is target for n in gm.graph.nodes)


def assert_close(got, want, rtol=1e-6):
    assert got.shape == want.shape
    assert ((got - want).abs().max() / want.abs().max()).item() <= rtol


# ---- kernel-1 Conv1d --------------------------------------------------------------------------

class ConvProjections(nn.Module):
    """SqueezeBERT-style projections: kernel-1 Conv1d over [B, C, L], then convolutions that are not linears."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Conv1d(64, 48, 1)
        self.up = nn.Conv1d(48, 96, 1, padding="same")  # "same" pads nothing for kernel 1
        self.down = nn.Conv1d(96, 40, 1, bias=False, dilation=2)  # dilation spaces taps: one tap, no effect
        self.k3 = nn.Conv1d(40, 40, 3, padding=1)
        self.strided = nn.Conv1d(40, 40, 1, stride=2)
        self.grouped = nn.Conv1d(40, 40, 1, groups=2)

    def forward(self, x):  # x [B, L, C]
        h = self.down(F.gelu(self.up(self.q(x.permute(0, 2, 1)))))
        return self.k3(h), self.strided(h), self.grouped(h)


def conv_reference(model, x, quantize):
    def linear(h, conv):  # [B, C, L] -> [B, out, L] as a linear over channels
        return F.linear(quantize(h.transpose(1, 2)), quantize(conv.weight.squeeze(-1)), conv.bias).transpose(1, 2)

    h = linear(F.gelu(linear(linear(x.permute(0, 2, 1), model.q), model.up)), model.down)
    return model.k3(h), model.strided(h), model.grouped(h)


def test_kernel1_conv1d_is_a_linear_site():
    model, x = ConvProjections().eval(), torch.randn(2, 9, 64)
    with torch.no_grad():
        for got, want in zip(conv_reference(model, x, identity), model(x)):
            assert_close(got, want)  # the hand reference is the model
        with pytest.warns(mxfx.MXFXWarning, match="3 site"):
            prepared = mxfx.prepare(model, linears(), (x,))
        sites = report(prepared)
        assert {n: (s.form, s.status, s.weight_shape) for n, s in sites.items() if s.quantized} == {
            "q": ("conv1d", QUANTIZED, (48, 64)), "up": ("conv1d", QUANTIZED, (96, 48)),
            "down": ("conv1d", QUANTIZED, (40, 96))}
        assert sites["k3"].status == UNSUPPORTED and "kernel size 3" in sites["k3"].reason
        assert sites["strided"].status == UNSUPPORTED and "stride=[2]" in sites["strided"].reason
        assert sites["grouped"].status == UNSUPPORTED and "groups=2" in sites["grouped"].reason
        assert count(prepared, torch.ops.aten.conv1d.default) == 3 and count(prepared, torch.ops.aten.linear.default) == 3
        assert mxfx.find_sites(mxfx.export(model, (x,)), linears()) == list(prepared.mxfx_report.sites)
        for got, want in zip(prepared(x), conv_reference(model, x, fq)):
            assert torch.equal(got, want)
        packed = prepare_quietly(model, linears("packed"), (x,))
        assert count(packed, torch.ops.mxfx.linear.default) == 3
        for got, want in zip(packed(x), conv_reference(model, x, fq)):
            assert_close(got, want)


def test_squeezebert_convolutions_are_quantized_linears():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    groups = dict(q_groups=1, k_groups=1, v_groups=1, post_attention_groups=1, intermediate_groups=1, output_groups=1)
    config = transformers.SqueezeBertConfig(vocab_size=96, hidden_size=64, embedding_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, intermediate_size=128, max_position_embeddings=32,
                                            **groups)
    model = transformers.SqueezeBertModel(config).eval()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    prepared = mxfx.prepare(model, linears(), (ids,))
    sites = prepared.mxfx_report.sites
    convs = [s.fqn for s in sites if s.form == "conv1d"]
    assert convs == [f"encoder.layers.0.{m}" for m in ("attention.query", "attention.key", "attention.value",
                                                       "post_attention.conv1d", "intermediate.conv1d", "output.conv1d")]
    assert all(s.quantized for s in sites if s.kind == LINEAR) and all(s.supported for s in sites)

    def hook(module, args, output):  # the Conv1d recomputed as a linear over channels, from quantized operands
        h = args[0]
        return F.linear(fq(h.transpose(1, 2)), fq(module.weight.squeeze(-1)), module.bias).transpose(1, 2)

    def linear_hook(module, args, output):
        return F.linear(fq(args[0]), fq(module.weight), module.bias)

    handles = [m.register_forward_hook(hook if isinstance(m, nn.Conv1d) else linear_hook)
               for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]
    try:
        with torch.no_grad():
            want = model(ids).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        assert_close(prepared(ids).last_hidden_state, want)


# ---- einsum with 3-D weights --------------------------------------------------------------------

class EinsumHeads(nn.Module):
    """XLNet-style projections stored as [hidden, heads, head_dim] and applied by einsum."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q = nn.Parameter(torch.randn(32, 4, 16) / 6)  # 'ibh,hnd->ibnd': W viewed as (n*d, h)
        self.o = nn.Parameter(torch.randn(24, 4, 16) / 8)  # 'ibnd,hnd->ibh': x's (n, d) flattened
        self.seg = nn.Parameter(torch.randn(3, 4, 40) / 6)  # 'bind,snd->bnis': one (s, d) linear per head n

    def forward(self, h, r):
        q = torch.einsum("ibh,hnd->ibnd", h, self.q)
        return torch.einsum("ibnd,hnd->ibh", q, self.o), torch.einsum("bind,snd->bnis", r, self.seg)


def einsum_reference(model, h, r, quantize):
    q = F.linear(quantize(h), quantize(model.q.flatten(1).t())).unflatten(-1, (4, 16))
    o = F.linear(quantize(q.flatten(2)), quantize(model.o.flatten(1)))
    e = torch.stack([F.linear(quantize(r[:, :, n]), quantize(model.seg[:, n])) for n in range(4)], dim=1)
    return o, e


def test_einsum_3d_weights_are_linears():
    model, h, r = EinsumHeads().eval(), torch.randn(5, 2, 32), torch.randn(2, 5, 4, 40)
    with torch.no_grad():
        for got, want in zip(einsum_reference(model, h, r, identity), model(h, r)):
            assert_close(got, want)
        prepared = mxfx.prepare(model, linears(), (h, r))
        assert [(s.fqn, s.form, s.status, s.weight_shape) for s in prepared.mxfx_report.sites] == [
            ("q", "einsum", QUANTIZED, (64, 32)), ("o", "einsum", QUANTIZED, (24, 64)),
            *[(f"seg.{n}", "einsum", QUANTIZED, (3, 40)) for n in range(4)]]
        assert count(prepared, torch.ops.aten.einsum.default) == 0
        assert mxfx.find_sites(mxfx.export(model, (h, r)), linears()) == list(prepared.mxfx_report.sites)
        for got, want in zip(prepared(h, r), einsum_reference(model, h, r, fq)):
            assert torch.equal(got, want)
        packed = mxfx.prepare(model, linears("packed"), (h, r))
        assert count(packed, torch.ops.mxfx.linear.default) == 6
        for got, want in zip(packed(h, r), einsum_reference(model, h, r, fq)):
            assert_close(got, want)


def test_xlnet_einsum_projections_are_quantized_and_its_attention_is_reported():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.XLNetModel(transformers.XLNetConfig(vocab_size=96, d_model=64, n_layer=1, n_head=2, d_inner=96,
                                                             d_head=32)).eval()
    ids = torch.randint(0, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        program = torch.export.export(model, (ids,), strict=False)
    weights_only = linears(activation=None)
    with pytest.warns(mxfx.MXFXWarning, match="1 check failed"):
        prepared = mxfx.prepare(program, QuantConfig((Rule(match=".*", weight=E4M3,
                                                           attention=AttentionSpec(E4M3, E4M3, E4M3, E4M3)),)))
    sites = report(prepared)
    assert all(sites[f"layer.0.rel_attn.{p}"].quantized for p in "qkvro")
    attention = sites["layer.0.rel_attn"]
    assert attention.status == CHECK_FAILED and "relative-position" in attention.reason
    assert mxfx.find_sites(program, weights_only) == list(mxfx.prepare(program, weights_only).mxfx_report.sites)
    # weight-only reference: the model run with each 3-D weight quantized along the axes it contracts
    prepared = mxfx.prepare(program, weights_only)
    attn = model.layer[0].rel_attn
    originals = {p: getattr(attn, p).detach().clone() for p in "qkvro"}
    try:
        with torch.no_grad():
            for p in "qkvr":  # [h, n, d] contracted over h
                getattr(attn, p).copy_(fq(originals[p], axis=0))
            attn.o.copy_(fq(originals["o"].flatten(1)).view_as(originals["o"]))  # contracted over (n, d)
            for name in ("layer_1", "layer_2"):
                layer = getattr(model.layer[0].ff, name)
                layer.weight.copy_(fq(layer.weight))
            want = model(ids).last_hidden_state
    finally:
        with torch.no_grad():
            for p, value in originals.items():
                getattr(attn, p).copy_(value)
    with torch.no_grad():
        got = prepared(ids).last_hidden_state
    assert_close(got, want)


# ---- attention with sink logits, bounds on the scores path -------------------------------------

H, S, D = 2, 32, 32


class SinkAttention(nn.Module):
    """gpt-oss's eager attention: sink logits joined to the scores, dropped from the probabilities."""

    def __init__(self, prepend=False, keep="keys"):
        super().__init__()
        torch.manual_seed(0)
        self.sinks = nn.Parameter(torch.randn(H))
        self.prepend, self.keep = prepend, keep

    def forward(self, q, k, v):
        b, _, length, _ = q.shape
        mask = torch.full((length, length), float("-inf")).triu(1)
        scores = torch.matmul(q, k.transpose(2, 3)) * D**-0.5 + mask
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(b, -1, length, -1)
        combined = torch.cat([sinks, scores] if self.prepend else [scores, sinks], dim=-1)
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1, dtype=combined.dtype)
        keys = probs[..., 1:] if self.prepend == (self.keep == "keys") else probs[..., :-1]
        return torch.matmul(F.dropout(keys, p=0.1, training=self.training), v)


def sink_reference(model, q, k, v, quantize):
    """Q, K quantized along D; the probabilities over the keys only (never the sink column) and V along S."""
    length = q.shape[2]
    mask = torch.full((length, length), float("-inf")).triu(1)
    scores = torch.matmul(quantize(q), quantize(k).transpose(2, 3)) * D**-0.5 + mask
    sinks = model.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, length, -1)
    combined = torch.cat([sinks, scores] if model.prepend else [scores, sinks], dim=-1)
    probs = F.softmax(combined - combined.max(dim=-1, keepdim=True).values, dim=-1)
    keys = probs[..., 1:] if model.prepend else probs[..., :-1]
    return torch.matmul(quantize(keys), quantize(v, axis=-2))


def qkv(length=S):
    g = torch.Generator().manual_seed(2)
    return tuple(torch.randn(2, H, length, D, generator=g) for _ in range(3))


@pytest.mark.parametrize("prepend", [False, True])
def test_attention_with_sinks_quantizes_keys_only(prepend):
    model, (q, k, v) = SinkAttention(prepend).eval(), qkv()
    with torch.no_grad():
        assert_close(sink_reference(model, q, k, v, identity), model(q, k, v))
        prepared = mxfx.prepare(model, ATTENTION_ONLY, (q, k, v))
        (site,) = prepared.mxfx_report.sites
        assert (site.kind, site.form, site.status) == (ATTENTION, "matmul", QUANTIZED)
        fake_quantize = [n for n in prepared.graph.nodes if n.target is torch.ops.mxfx.fake_quantize.default]
        # the operands as the products receive them: Q [.., L, D], K^T [.., D, S], P [.., L, S] (no sink column), V
        assert sorted(tuple(n.args[0].meta["val"].shape[-2:]) for n in fake_quantize) == sorted(
            [(S, D), (D, S), (S, S), (S, D)])
        assert torch.equal(prepared(q, k, v), sink_reference(model, q, k, v, fq))
        assert mxfx.find_sites(mxfx.export(model, (q, k, v)), ATTENTION_ONLY) == list(prepared.mxfx_report.sites)


def test_sink_probabilities_sliced_off_the_keys_are_refused():
    model, (q, k, v) = SinkAttention(keep="wrong").eval(), qkv()  # keeps the sink column, drops a key
    with pytest.warns(mxfx.MXFXWarning, match="check failed"):
        prepared = mxfx.prepare(model, ATTENTION_ONLY, (q, k, v))
    (site,) = prepared.mxfx_report.sites
    assert site.status == CHECK_FAILED and "as columns [1, " in site.reason  # (sequence lengths are symbolic)
    assert "the keys of 'matmul' are its columns [0, " in site.reason
    assert count(prepared, torch.ops.mxfx.fake_quantize.default) == 0


class BoundedScores(nn.Module):
    """Scores clamped against constants (OPT-style `torch.max(scores, finfo.min)`), or against another product."""

    def __init__(self, against_product=False):
        super().__init__()
        self.against_product = against_product

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.transpose(-1, -2))
        if self.against_product:
            scores = torch.maximum(scores, torch.matmul(k, q.transpose(-1, -2)))
        else:
            scores = torch.max(scores, torch.tensor(torch.finfo(q.dtype).min))
            scores = torch.minimum(scores, torch.full((), 1e4)).clamp(-1e4, 1e4).clamp_min(-5e3)
        return torch.matmul(scores.softmax(-1), v)


def test_max_min_clamp_against_constants_on_the_scores_path():
    (q, k, v) = qkv()
    prepared = mxfx.prepare(BoundedScores(), ATTENTION_ONLY, (q, k, v))
    (site,) = prepared.mxfx_report.sites
    assert site.status == QUANTIZED and count(prepared, torch.ops.mxfx.fake_quantize.default) == 4
    scores = torch.matmul(fq(q), fq(k).transpose(-1, -2)).clamp(-5e3, 1e4)
    assert torch.equal(prepared(q, k, v), torch.matmul(fq(scores.softmax(-1)), fq(v, axis=-2)))
    with pytest.warns(mxfx.MXFXWarning, match="check failed"):
        prepared = mxfx.prepare(BoundedScores(against_product=True), ATTENTION_ONLY, (q, k, v))
    (site,) = prepared.mxfx_report.sites
    assert site.status == CHECK_FAILED and "several matmuls" in site.reason


# ---- the completeness pass ----------------------------------------------------------------------

@torch.library.custom_op("mxfxtest::opaque_linear", mutates_args=())
def opaque_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x @ weight.t()


@opaque_linear.register_fake
def _(x, weight):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


class Opaque(nn.Module):
    """A linear site, weights that are not sites (embedding, norm scale, a 2-D elementwise scale), a
    custom op reading a weight, a conv2d, and a softmax over an activation product that is not attention."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(16, 32)
        self.proj = nn.Linear(32, 32)
        self.norm = nn.LayerNorm(32)
        self.scale = nn.Parameter(torch.randn(8, 32))
        self.secret = nn.Parameter(torch.randn(24, 32))
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, ids):
        x = self.norm(self.proj(self.emb(ids))) * self.scale[: ids.shape[1]]
        mixed = torch.softmax(torch.cumsum(x @ x.transpose(-1, -2), dim=-1), dim=-1).mean(-1)
        return opaque_linear(x, self.secret), self.conv(x.unsqueeze(1)), mixed


def test_completeness_pass_reports_what_no_pass_matched():
    model, ids = Opaque().eval(), torch.randint(0, 16, (2, 8))
    config = QuantConfig((Rule(match=".*", weight=E4M3, activation=E4M3, attention=AttentionSpec(E4M3, E4M3, E4M3, E4M3)),))
    program = mxfx.export(model, (ids,))
    found = mxfx.find_sites(program, config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepared = mxfx.prepare(program, config)
    assert found == list(prepared.mxfx_report.sites)
    rows = {s.fqn: (s.kind, s.form, s.status) for s in found}
    assert rows == {"proj": (LINEAR, "linear", QUANTIZED), "secret": (LINEAR, "mxfxtest.opaque_linear", UNSUPPORTED),
                    "conv": (LINEAR, "conv2d", UNSUPPORTED), "": (ATTENTION, "softmax", UNSUPPORTED)}
    sites = report(prepared)
    assert "mxfxtest.opaque_linear reads parameter 'secret' [24, 32]" in sites["secret"].reason
    assert sites["secret"].weight_target == "secret" and sites["secret"].rule == 0
    assert "conv2d reads parameter 'conv.weight' [4, 1, 3, 3]" in sites["conv"].reason
    assert "a product of two activations" in sites[""].reason
    left_out = [w for w in caught if issubclass(w.category, mxfx.MXFXWarning) and "left in high precision" in str(w.message)]
    assert len(left_out) == 1 and "3 site(s)" in str(left_out[0].message)
    assert "mxfxtest.opaque_linear" in str(left_out[0].message)
    summary = mxfx.summary(prepared)
    assert "mxfxtest.opaque_linear reads parameter" in summary.table()
    data = json.loads(summary.to_json())
    assert {r["site"]: r["status"] for r in data["sites"]} == {"proj": QUANTIZED, "secret": UNSUPPORTED,
                                                              "conv": UNSUPPORTED, "": UNSUPPORTED}
    assert data["totals"]["unsupported sites"] == 3
    gm = program.module()
    mxfx.find_sites(gm, config)
    assert not ReportUnquantizedPass(config)(gm).modified  # a second run changes nothing


class SDPADropout(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.25)


def test_find_sites_agrees_with_prepare_on_sdpa_with_dropout():
    q = torch.randn(1, 2, 8, 32)
    program = mxfx.export(SDPADropout(), (q, q, q))
    (found,) = mxfx.find_sites(program, ATTENTION_ONLY)
    with pytest.warns(mxfx.MXFXWarning, match="left in high precision"):
        prepared = mxfx.prepare(program, ATTENTION_ONLY)
    assert [found] == list(prepared.mxfx_report.sites)
    assert found.status == UNSUPPORTED and "dropout_p=0.25" in found.reason


class BaddbmmAttention(nn.Module):
    def forward(self, q, k, v, bias):
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=D**-0.5)
        return torch.bmm(scores.softmax(-1), v)


def test_summary_has_both_rows_of_baddbmm_attention():
    q, k, v = (t.flatten(0, 1) for t in qkv())
    bias = torch.randn(1, S, S)
    prepared = mxfx.prepare(BaddbmmAttention(), ATTENTION_ONLY, (q, k, v, bias))
    (site,) = prepared.mxfx_report.sites
    assert site.form == "baddbmm" and site.quantized
    rows = [(r["site"], r["kind"]) for r in mxfx.summary(prepared).rows]
    assert rows == [("", "QK^T"), ("", "PV")]


@pytest.mark.parametrize("name", ["MLP", "FunctionalLinear", "TiedLM", "NanoGPT", "NanoGPT-manual", "FragileMLP"])
def test_find_sites_agrees_with_prepare_on_test_models(name):
    from mxfx.testing import models

    torch.manual_seed(0)
    if name.startswith("NanoGPT"):
        model, args = models.NanoGPT(flash=name == "NanoGPT"), (torch.randint(0, 64, (2, 16)),)
    elif name == "TiedLM":
        model, args = models.TiedLM(), (torch.randint(0, 64, (2, 16)),)
    else:
        model, args = getattr(models, name)(), (torch.randn(4, 64),)
    config = QuantConfig((Rule(match=".*", weight=E4M3, activation=E4M3, attention=AttentionSpec(E4M3, E4M3, E4M3, E4M3)),))
    program = mxfx.export(model.eval(), args)
    found = mxfx.find_sites(program, config)
    assert found and found == list(prepare_quietly(program, config, ()).mxfx_report.sites)


class GatheredExperts(nn.Module):
    """Stacked expert weights picked per token by `W[expert_ids]` and applied with bmm."""

    def __init__(self):
        super().__init__()
        self.experts = nn.Parameter(torch.randn(4, 32, 16))

    def forward(self, x, expert_ids):  # x [T, 1, 32], expert_ids [T]
        return torch.bmm(x, self.experts[expert_ids])


def test_completeness_pass_alone_reports_a_gathered_weight_product():
    """With only the linear passes before it (no expert matcher), the gather + bmm form is a row."""
    from mxfx.passes.canonicalize_linear import CanonicalizeLinearPass

    x, ids = torch.randn(6, 1, 32), torch.tensor([0, 3, 1, 1, 2, 0])
    gm = torch.export.export(GatheredExperts(), (x, ids)).module()
    CanonicalizeLinearPass()(gm)
    assert ReportUnquantizedPass(linears())(gm).modified
    (site,) = [mxfx.graph.sites.site_of(n) for n in gm.graph.nodes if mxfx.graph.sites.site_of(n) is not None]
    assert (site.fqn, site.form, site.status) == ("experts", "bmm", UNSUPPORTED)
    assert "bmm reads parameter 'experts' [4, 32, 16]" in site.reason


def test_gpt_oss_attention_with_sinks_equals_a_hand_quantized_eager_attention(monkeypatch):
    """gpt-oss from a small random config, attention-only config: the prepared model equals the model
    whose eager attention function quantizes Q, K, the sliced probabilities and V by hand."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.gpt_oss import modeling_gpt_oss

    torch.manual_seed(0)
    config = transformers.GptOssConfig(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                                       num_experts_per_tok=2, sliding_window=8, max_position_embeddings=64,
                                       use_cache=False, layer_types=["sliding_attention", "full_attention"])
    config._attn_implementation = "eager"
    model = transformers.GptOssForCausalLM(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_()
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    prepared = prepare_quietly(model, ATTENTION_ONLY, (ids,))
    attention = [s for s in prepared.mxfx_report.sites if s.kind == ATTENTION]
    assert [(s.fqn, s.form, s.status) for s in attention] == [
        (f"model.layers.{i}.self_attn", "matmul", QUANTIZED) for i in range(2)]

    def hand_quantized(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        key = modeling_gpt_oss.repeat_kv(key, module.num_key_value_groups)
        value = modeling_gpt_oss.repeat_kv(value, module.num_key_value_groups)
        scores = torch.matmul(fq(query), fq(key).transpose(2, 3)) * scaling
        if attention_mask is not None:
            scores = scores + attention_mask
        sinks = module.sinks.reshape(1, -1, 1, 1).expand(query.shape[0], -1, query.shape[-2], -1)
        combined = torch.cat([scores, sinks], dim=-1)
        probs = F.softmax(combined - combined.max(dim=-1, keepdim=True).values, dim=-1)[..., :-1]
        return torch.matmul(fq(probs), fq(value, axis=-2)).transpose(1, 2).contiguous(), probs

    with torch.no_grad():
        plain = model(ids).logits
        monkeypatch.setattr(modeling_gpt_oss, "eager_attention_forward", hand_quantized)
        want = model(ids).logits
        got = prepared(ids).logits
    assert_close(got, want, rtol=1e-5)
    assert ((got - plain).abs().max() / plain.abs().max()).item() > 1e-4  # the attention was quantized
