"""Every linear-like form becomes a linear site (issue #12), and nothing is missed in silence.

Each form (nn.Linear, F.linear on a parameter, x @ W.T, x @ W, GPT-2's Conv1D addmm, einsum,
bmm with an expanded weight, a cast weight, nn.MultiheadAttention's packed in_proj_weight, GPT-2
from transformers) is checked for its exact sites and names, and for numerics against a reference
built here from `scalar_reference`'s format grids (independent of mxfx.numerics): the layer's
input and its (out_features, in_features) weight are MX-quantized by hand and F.linear recomputed.
Candidates mxfx does not rewrite are recorded UNSUPPORTED / CHECK_FAILED, shown by the summary,
and warned about once when a rule asked for them.
"""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import bits_equal
from mxfx.passes.canonicalize_linear import CanonicalizeLinearPass
from mxfx.passes.insert_qdq import InsertQDQPass
from mxfx.passes.lower_linear import LowerLinearPass
from mxfx.passes.match_linear_sites import MatchLinearSitesPass
from scalar_reference import positive_grid, shared_exponent
from torch import nn

import mxfx
from mxfx.graph.config import MXSpec, QuantConfig, Rule
from mxfx.graph.sites import CHECK_FAILED, LINEAR, NO_RULE, QUANTIZED, SKIPPED, UNSUPPORTED

W_FMT, A_FMT = "fp6_e3m2", "fp8_e4m3"


def config(storage="packed", *extra):
    return QuantConfig((*extra, Rule(match=".*", weight=MXSpec(W_FMT), activation=MXSpec(A_FMT), weight_storage=storage)))


def ref_fq(x: torch.Tensor, name: str, block: int = 32) -> torch.Tensor:
    """MX quantize -> dequantize along the last axis (floor scale, round to nearest even), from
    the scalar reference's grid and shared exponent, vectorised over elements in float64."""
    grid = torch.tensor([float(v) for v, _ in positive_grid(name)], dtype=torch.float64)
    codes = torch.tensor([c for _, c in positive_grid(name)])
    shape, k = x.shape, x.shape[-1]
    rows = x.detach().to(torch.float64).reshape(-1, k)
    pad = (-k) % block
    rows = F.pad(rows, (0, pad)).reshape(rows.shape[0], -1, block)
    amax = rows.abs().amax(-1)
    exps = torch.tensor([shared_exponent(float(a), name, "floor") for a in amax.flatten().tolist()], dtype=torch.float64)
    scale = torch.pow(2.0, exps).reshape(amax.shape)[..., None]
    v = (rows / scale).abs().contiguous()
    hi_i = torch.searchsorted(grid, v, right=False).clamp(max=len(grid) - 1)
    lo_i = (hi_i - (grid[hi_i] > v).long()).clamp(min=0)
    lo, hi = grid[lo_i], grid[hi_i]
    pick_hi = (hi - v < v - lo) | ((hi - v == v - lo) & (codes[lo_i] % 2 == 1))
    q = torch.where(v >= grid[-1], grid[-1], torch.where(pick_hi, hi, lo)) * torch.sign(rows) * scale
    q = q.reshape(rows.shape[0], -1)[:, :k].reshape(shape)
    return q.to(x.dtype)


def ref_linear(x, weight_out_in, bias=None):
    return F.linear(ref_fq(x, A_FMT), ref_fq(weight_out_in, W_FMT), bias)


def test_reference_agrees_with_the_scalar_reference():
    from scalar_reference import fake_quantize_block

    torch.manual_seed(0)
    x = torch.randn(3, 64) * torch.logspace(-3, 3, 64)
    for name in (W_FMT, A_FMT, "fp4_e2m1"):
        want = [fake_quantize_block(row[i:i + 32], name) for row in x.tolist() for i in (0, 32)]
        assert ref_fq(x, name).flatten().tolist() == [v for block in want for v in block]


# --- the forms, each inside a container so that its site has a module path -------------------

class Param(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*shape) / math.sqrt(shape[-1]))


class LinearModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 32)

    def forward(self, x):
        return self.proj(x)

    def reference(self, x):
        return ref_linear(x, self.proj.weight, self.proj.bias)


class FunctionalOnParam(nn.Module):  # F.linear on a bare parameter: the site is the parameter's path
    def __init__(self):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.w1 = nn.Parameter(torch.randn(32, 64) / 8)

    def forward(self, x):
        return F.linear(x, self.mlp.w1)

    def reference(self, x):
        return ref_linear(x, self.mlp.w1)


class MatmulT(Param):  # x @ W.T, W (out, in)
    def __init__(self):
        super().__init__((32, 64))

    def forward(self, x):
        return x @ self.weight.T

    def reference(self, x):
        return ref_linear(x, self.weight)


class MatmulInOut(Param):  # x @ W, W stored (in, out)
    def __init__(self):
        super().__init__((64, 32))

    def forward(self, x):
        return x @ self.weight

    def reference(self, x):
        return ref_linear(x, self.weight.t())


class Conv1D(nn.Module):  # transformers.pytorch_utils.Conv1D: W (in, out), addmm on a 2-D view
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(64, 32) / 8)
        self.bias = nn.Parameter(torch.randn(32))

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(x.shape[:-1] + (32,))

    def reference(self, x):
        return ref_linear(x, self.weight.t(), self.bias)


class Einsum(Param):
    def __init__(self):
        super().__init__((32, 64))

    def forward(self, x):
        return torch.einsum("bsk,nk->bsn", x, self.weight)

    def reference(self, x):
        return ref_linear(x, self.weight)


class EinsumPermuted(Param):  # W (in, out), output axes reordered: x and the result are permuted
    def __init__(self):
        super().__init__((64, 32))

    def forward(self, x):
        return torch.einsum("bsk,kn->bns", x, self.weight)

    def reference(self, x):
        return ref_linear(x, self.weight.t()).transpose(1, 2)


class BmmExpand(Param):
    def __init__(self):
        super().__init__((32, 64))

    def forward(self, x):
        return torch.bmm(x, self.weight.t().expand(x.shape[0], 64, 32))

    def reference(self, x):
        return ref_linear(x, self.weight)


class CastWeight(nn.Module):  # a bf16 layer applied to fp32 activations through W.to(x.dtype)
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 32).to(torch.bfloat16)

    def forward(self, x):
        return F.linear(x, self.proj.weight.to(x.dtype), self.proj.bias.to(x.dtype))

    def reference(self, x):
        return ref_linear(x, self.proj.weight.float(), self.proj.bias.float())


class Container(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.layer = inner

    def forward(self, x):
        return self.layer(x)

    def reference(self, x):
        return self.layer.reference(x)


FORMS = [  # (module, expected site name, form, bitwise)
    (LinearModule, "layer.proj", "linear", True),
    (FunctionalOnParam, "layer.mlp.w1", "linear", True),
    (MatmulT, "layer", "matmul", True),
    (MatmulInOut, "layer", "matmul", True),
    (Conv1D, "layer", "addmm", False),
    (Einsum, "layer", "einsum", True),
    (EinsumPermuted, "layer", "einsum", False),
    (BmmExpand, "layer", "bmm", True),
    (CastWeight, "layer.proj", "linear", True),
]


@pytest.mark.parametrize("storage", ["packed", "simulated"])
@pytest.mark.parametrize("make,name,form,bitwise", FORMS, ids=[f[0].__name__ for f in FORMS])
def test_each_form_is_one_named_site_with_reference_numerics(make, name, form, bitwise, storage):
    torch.manual_seed(0)
    model, x = Container(make()), torch.randn(2, 8, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mxfx.MXFXWarning)
        prepared = mxfx.prepare(model, config(storage), (x,))
    sites = [s for s in prepared.mxfx_report.sites if s.kind == LINEAR]
    assert [(s.fqn, s.form, s.status) for s in sites] == [(name, form, QUANTIZED)]
    assert sites[0].weight_shape == (32, 64)
    ops = {n.target for n in prepared.graph.nodes if n.op == "call_function"}
    if storage == "packed":
        assert torch.ops.mxfx.linear.default in ops
        assert not any(t.startswith("mxfx_w") and t.endswith("simulated") for t, _ in prepared.named_buffers())
    out, want = prepared(x), model.reference(x)
    if bitwise:
        assert bits_equal(out, want)
    else:  # the same math, another GEMM call (2-D view, permuted operands)
        torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def test_packed_storage_drops_the_fp_weight_of_every_form():
    model, x = Container(Conv1D()), torch.randn(2, 8, 64)
    prepared = mxfx.prepare(model, config(), (x,))
    assert {name for name, _ in prepared.named_parameters()} == {"layer.bias"}


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)

    def forward(self, x, memory):
        return self.attn(x, memory, memory, need_weights=False)[0]

    def reference(self, x, memory):
        """nn.MultiheadAttention computed by hand with MX-quantized projections."""
        E, H = 64, 4
        w, b = self.attn.in_proj_weight, self.attn.in_proj_bias
        q = ref_linear(x, w[:E], b[:E])
        if memory is x:
            k, v = ref_linear(x, w[E:2 * E], b[E:2 * E]), ref_linear(x, w[2 * E:], b[2 * E:])
        else:
            kv = ref_linear(memory, w[E:], b[E:])
            k, v = kv[..., :E], kv[..., E:]
        heads = lambda t: t.view(t.shape[0], t.shape[1], H, E // H).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(x.shape)
        return ref_linear(y, self.attn.out_proj.weight, self.attn.out_proj.bias)


class SelfMHA(MHA):
    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]

    def reference(self, x):
        return super().reference(x, x)


@pytest.mark.parametrize("storage", ["packed", "simulated"])
def test_multihead_attention_packed_weight_slices(storage):
    torch.manual_seed(0)
    model, x, memory = MHA(), torch.randn(2, 8, 64), torch.randn(2, 5, 64)
    prepared = mxfx.prepare(model, config(storage), (x, memory))
    sites = prepared.mxfx_report.sites
    assert [(s.fqn, s.weight_shape) for s in sites if s.kind == LINEAR] == [
        ("attn.in_proj.q", (64, 64)), ("attn.in_proj.kv", (128, 64)), ("attn.out_proj", (64, 64))]
    assert all(s.quantized and s.weight_target.startswith("attn.") for s in sites if s.kind == LINEAR)
    want = model.eval().reference(x, memory)
    torch.testing.assert_close(prepared(x, memory), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    if storage == "packed":  # both slices quantized: the packed fp weight is gone
        assert "attn.in_proj_weight" not in dict(prepared.named_parameters())


def test_multihead_attention_self_attention_is_one_in_proj_site():
    torch.manual_seed(0)
    model, x = SelfMHA(), torch.randn(2, 8, 64)
    prepared = mxfx.prepare(model, config(), (x,))
    assert [(s.fqn, s.weight_shape) for s in prepared.mxfx_report.sites if s.kind == LINEAR] == [
        ("attn.in_proj", (192, 64)), ("attn.out_proj", (64, 64))]
    want = model.eval().reference(x)
    torch.testing.assert_close(prepared(x), want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


def test_a_skipped_slice_keeps_the_packed_weight_for_the_other():
    torch.manual_seed(0)
    model, x, memory = MHA(), torch.randn(2, 8, 64), torch.randn(2, 5, 64)
    prepared = mxfx.prepare(model, config("packed", Rule(match=r".*\.kv", skip=True)), (x, memory))
    status = {s.fqn: s.status for s in prepared.mxfx_report.sites if s.kind == LINEAR}
    assert status == {"attn.in_proj.q": QUANTIZED, "attn.in_proj.kv": SKIPPED, "attn.out_proj": QUANTIZED}
    assert "attn.in_proj_weight" in dict(prepared.named_parameters())  # the kv slice still reads it


class StackedExperts(nn.Module):
    """Matrices picked out of a stacked (n, out, in) parameter, by index and by unbind."""

    def __init__(self):
        super().__init__()
        self.moe = nn.Module()
        self.moe.w = nn.Parameter(torch.randn(3, 32, 64) / 8)

    def forward(self, x):
        first, second, third = self.moe.w.unbind(0)
        return F.linear(x, self.moe.w[0]) + x @ self.moe.w[2].T + F.linear(x, second)


def test_matrices_of_a_stacked_parameter_are_named_by_index():
    model, x = StackedExperts(), torch.randn(4, 64)
    prepared = mxfx.prepare(model, config(), (x,))
    assert [(s.fqn, s.form) for s in prepared.mxfx_report.sites] == [
        ("moe.w.0", "linear"), ("moe.w.2", "matmul"), ("moe.w.1", "linear")]
    w = model.moe.w
    assert bits_equal(prepared(x), ref_linear(x, w[0]) + ref_linear(x, w[2]) + ref_linear(x, w[1]))


class TiedProducts(nn.Module):
    """One parameter read by two products through the same chain (x @ W.T twice)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32, 64) / 8)

    def forward(self, x, y):
        return x @ self.weight.T + y @ self.weight.T


def test_tied_weight_through_a_chain_is_quantized_once():
    model, x, y = TiedProducts(), torch.randn(4, 64), torch.randn(4, 64)
    for storage, n_buffers in (("packed", 2), ("simulated", 1)):
        prepared = mxfx.prepare(model, config(storage), (x, y))
        assert len([s for s in prepared.mxfx_report.sites if s.quantized]) == 2
        assert len([n for n, _ in prepared.named_buffers() if n.startswith("mxfx_w")]) == n_buffers
        assert bits_equal(prepared(x, y), ref_linear(x, model.weight) + ref_linear(y, model.weight))


class Mixed(nn.Module):
    """A linear, a product of two activations, a parameter on the left, a failed check."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(64, 64)
        self.mix = nn.Module()
        self.mix.weight = nn.Parameter(torch.randn(8, 8) / 3)  # applied as W @ x: mixes tokens
        self.odd = nn.Module()
        self.odd.weight = nn.Parameter(torch.randn(64, 64) / 8)
        self.odd.bias = nn.Parameter(torch.randn(8, 64))  # a 2-D bias: addmm, but not a linear's bias

    def forward(self, x):  # x: (8, 64)
        h = self.proj(x)
        scores = h @ x.T  # two activations: not a site
        h = self.mix.weight @ h  # the parameter on the left: UNSUPPORTED
        h = torch.addmm(self.odd.bias, h, self.odd.weight)  # CHECK_FAILED (bias is not (out,))
        return h + scores.sum()


def mixed_prepared(cfg=None, **kw):
    torch.manual_seed(0)
    model, x = Mixed(), torch.randn(8, 64)
    return model, x, mxfx.prepare(model, cfg or config(), (x,), **kw)


def test_unsupported_and_check_failed_are_recorded_and_left_alone():
    model, x = Mixed(), torch.randn(8, 64)
    program = mxfx.export(model, (x,))
    sites = {s.fqn: s for s in mxfx.find_sites(program, config())}
    assert set(sites) == {"proj", "mix", "odd"}  # h @ x.T is not a site
    assert sites["proj"].status == QUANTIZED
    assert sites["mix"].status == UNSUPPORTED and "left operand" in sites["mix"].reason
    assert sites["odd"].status == CHECK_FAILED and "bias of shape (8, 64)" in sites["odd"].reason
    assert sites["mix"].rule == 0 and sites["odd"].rule == 0  # the rule that asked for them

    with pytest.warns(mxfx.MXFXWarning, match="2 site"):
        prepared = mxfx.prepare(program, config())
    targets = [n.target for n in prepared.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.aten.addmm.default) == 1 and targets.count(torch.ops.aten.matmul.default) == 2
    assert targets.count(torch.ops.mxfx.linear.default) == 1
    want = model.eval()(x)
    h = ref_linear(x, model.proj.weight, model.proj.bias)
    want = torch.addmm(model.odd.bias, model.mix.weight @ h, model.odd.weight) + (h @ x.T).sum()
    assert bits_equal(prepared(x), want)


def test_summary_and_json_list_every_unquantized_site(tmp_path):
    _, x, prepared = mixed_prepared(QuantConfig((Rule(match="mix", skip=True),
                                                 Rule(match="proj", weight=MXSpec(W_FMT)))))
    summary = mxfx.summary(prepared)
    rows = {r["site"]: r for r in summary.rows}
    assert rows["proj"]["status"] == QUANTIZED
    assert rows["mix"]["status"] == UNSUPPORTED and "left operand" in rows["mix"]["reason"]
    assert rows["odd"]["status"] == CHECK_FAILED and rows["odd"]["rule"] == "(no rule)"
    assert summary.totals["quantized sites"] == 1 and summary.totals["unsupported sites"] == 1
    assert summary.totals["check failed sites"] == 1 and summary.totals["no rule sites"] == 0
    data = json.loads(summary.to_json())
    assert {r["site"]: r["status"] for r in data["sites"]} == {"proj": QUANTIZED, "mix": UNSUPPORTED, "odd": CHECK_FAILED}
    assert "check failed" in summary.to_csv() and "left operand" in summary.table()
    assert {s.fqn for s in prepared.mxfx_report.unquantized} == {"mix", "odd"}
    loaded = mxfx.load(mxfx.save(prepared, tmp_path / "mixed.pt2"))  # what `mxfx inspect --format json` reads
    data = json.loads(mxfx.summary(loaded).to_json())
    assert {r["site"]: r["status"] for r in data["sites"]} == {"proj": QUANTIZED, "mix": UNSUPPORTED, "odd": CHECK_FAILED}
    assert data["totals"]["unsupported sites"] == 1 and bits_equal(loaded(x), prepared(x))


def test_left_out_warning_fires_once_and_not_for_skip_rules_or_no_rule():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixed_prepared()
    left_out = [w for w in caught if issubclass(w.category, mxfx.MXFXWarning) and "left in high precision" in str(w.message)]
    assert len(left_out) == 1
    assert "mix" in str(left_out[0].message) and "odd" in str(left_out[0].message)
    assert "mxfx_report.unquantized" in str(left_out[0].message)
    for cfg in (config("packed", Rule(match="mix|odd", skip=True)),  # deliberately skipped
                QuantConfig((Rule(match="proj", weight=MXSpec(W_FMT)),))):  # no rule for them
        with warnings.catch_warnings():
            warnings.simplefilter("error", mxfx.MXFXWarning)
            _, _, prepared = mixed_prepared(cfg)
        statuses = {s.fqn: s.status for s in prepared.mxfx_report.sites}
        assert statuses["mix"] == UNSUPPORTED and statuses["odd"] == CHECK_FAILED


def test_passes_twice_report_modified_false():
    model, x = Mixed(), torch.randn(8, 64)
    gm = mxfx.export(Container(BmmExpand()), (torch.randn(2, 8, 64),)).module()
    gm2 = mxfx.export(model, (x,)).module()
    cfg = config()
    for module in (gm, gm2):
        passes = [CanonicalizeLinearPass(), MatchLinearSitesPass(cfg), InsertQDQPass(cfg), LowerLinearPass()]
        assert all(p(module).modified for p in passes)
        code = module.code
        assert [p(module).modified for p in passes] == [False] * 4
        assert module.code == code


def test_no_rule_sites_keep_their_form_and_the_bitwise_fp_result():
    torch.manual_seed(0)
    model, x = Container(Conv1D()), torch.randn(2, 8, 64)
    prepared = mxfx.prepare(model, QuantConfig(), (x,))
    assert [(s.fqn, s.form, s.status) for s in prepared.mxfx_report.sites] == [("layer", "addmm", NO_RULE)]
    assert bits_equal(prepared(x), model(x))


class EinsumTwoContracted(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 16, 8))

    def forward(self, x):  # x (b, h, k): contracts h and k with a 3-D parameter
        return torch.einsum("bhk,hkn->bn", x, self.weight)


class EinsumOuter(EinsumTwoContracted):
    def forward(self, x):  # no index contracted: an outer product per (h, k), not a linear
        return torch.einsum("bhk,hkn->bhkn", x, self.weight)


class Bmm3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(2, 16, 8))  # one matrix per batch entry: a stacked linear

    def forward(self, x):
        return torch.bmm(x, self.weight)


class MaskedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(16, 8)
        self.register_buffer("mask", torch.ones(8, 16).tril())

    def forward(self, x):
        return F.linear(x, self.proj.weight * self.mask, self.proj.bias)


class SDPADropout(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.25)


class ImplicitEinsumAttention(nn.Module):
    """Single-head attention spelled with implicit-output einsums (which the attention pass skips)."""

    def forward(self, q, k, v):
        p = torch.softmax(torch.einsum("id,jd", q, k), dim=-1)
        return torch.einsum("ij,jd", p, v).t()


def test_unsupported_einsum_and_sdpa_with_dropout_are_recorded():
    sites = mxfx.find_sites(mxfx.export(EinsumTwoContracted(), (torch.randn(2, 4, 16),)), config())
    assert [(s.fqn, s.form, s.status, s.weight_shape) for s in sites] == [("weight", "einsum", QUANTIZED, (8, 64))]
    sites = mxfx.find_sites(mxfx.export(EinsumOuter(), (torch.randn(2, 4, 16),)), config())
    assert [(s.fqn, s.form, s.status) for s in sites] == [("weight", "einsum", UNSUPPORTED)]
    assert "no contracted index" in sites[0].reason
    sites = mxfx.find_sites(mxfx.export(Bmm3D(), (torch.randn(2, 4, 16),)), config())
    # one matrix per batch entry: a stacked linear (passes/match_expert_sites.py), quantized per matrix
    assert [(s.fqn, s.form, s.status, s.weight_shape) for s in sites] == [("weight", "expert_bmm", QUANTIZED, (2, 8, 16))]
    sites = mxfx.find_sites(mxfx.export(MaskedWeight(), (torch.randn(2, 16),)), config())
    assert [(s.fqn, s.form, s.status) for s in sites] == [("proj", "linear", UNSUPPORTED)]
    assert "computed by aten.mul.Tensor" in sites[0].reason
    from mxfx.graph.config import AttentionSpec

    spec = MXSpec(A_FMT)
    cfg = QuantConfig((Rule(match=".*", attention=AttentionSpec(spec, spec, spec, spec)),))
    q = torch.randn(1, 2, 8, 32)
    with pytest.warns(Warning) as caught:
        prepared = mxfx.prepare(SDPADropout(), cfg, (q, q, q))
    (site,) = prepared.mxfx_report.sites
    assert site.status == UNSUPPORTED and "dropout_p=0.25" in site.reason
    assert sum("left in high precision" in str(w.message) for w in caught) == 1
    q = torch.randn(8, 32)
    with pytest.warns(mxfx.MXFXWarning, match="left in high precision"):
        prepared = mxfx.prepare(ImplicitEinsumAttention(), cfg, (q, q, q))
    (site,) = prepared.mxfx_report.sites
    assert site.form == "einsum" and site.status == UNSUPPORTED and "explicit output" in site.reason


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_gpt2_from_transformers_has_nine_linear_sites(attn):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=96, n_positions=32,
                                  bos_token_id=0, eos_token_id=0, attn_implementation=attn, use_cache=False)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    idx = torch.randint(0, 96, (2, 8))
    prepared = mxfx.prepare(model, config(), (idx,))
    sites = [s for s in prepared.mxfx_report.sites if s.kind == LINEAR]
    names = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert [s.fqn for s in sites] == [*names, "lm_head"] and all(s.quantized for s in sites)
    assert [s.form for s in sites] == ["addmm"] * 8 + ["linear"]
    attention = [s.form for s in prepared.mxfx_report.sites if s.kind != LINEAR]
    assert attention == ["matmul" if attn == "eager" else "sdpa"] * 2

    def hook(module, args, output):  # the layer recomputed from its MX-quantized input and weight
        weight = module.weight.t() if type(module).__name__ == "Conv1D" else module.weight
        return ref_linear(args[0], weight, module.bias).view(output.shape)

    handles = [m.register_forward_hook(hook) for n, m in model.named_modules() if n in names or n == "lm_head"]
    try:
        with torch.no_grad():
            want = model(idx).logits
    finally:
        for h in handles:
            h.remove()
    out = prepared(idx)
    out = out.logits if hasattr(out, "logits") else out["logits"]
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())


@pytest.mark.parametrize("make", [EinsumPermuted, BmmExpand, Conv1D, MatmulInOut])
def test_new_nodes_have_correct_meta_val(make):
    model, x = Container(make()), torch.randn(2, 8, 64)
    gm = mxfx.export(model, (x,)).module()
    assert CanonicalizeLinearPass()(gm).modified
    recorded = {n.name: n.meta["val"] for n in gm.graph.nodes
                if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)}
    real = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            real[n.name] = out
            return out

    Recorder(gm).run(x)
    for name, val in recorded.items():
        assert tuple(val.shape) == tuple(real[name].shape) and val.dtype == real[name].dtype, name
    assert sum(n.target is torch.ops.aten.linear.default for n in gm.graph.nodes) == 1
    assert bits_equal(gm(x), model(x)) or torch.allclose(gm(x), model(x), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_compiled_conv1d_and_bmm_forms_equal_eager(fresh_dynamo):
    torch.manual_seed(0)
    model = nn.Sequential(Container(Conv1D()), nn.Linear(32, 64), Container(BmmExpand()))
    x = torch.randn(2, 8, 64)
    prepared = mxfx.prepare(model, config(), (x,))
    assert [s.form for s in prepared.mxfx_report.sites] == ["addmm", "linear", "bmm"]
    compiled = torch.compile(prepared, fullgraph=True)
    assert bits_equal(compiled(x), prepared(x))
