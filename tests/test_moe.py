"""Mixture-of-experts sites: stacked expert parameters quantized per expert, in every exported form.

Architectures: small random transformers configs (mxfx/testing/moe.py; hidden 64, expert hidden
96, 2 layers, 4 experts, top-2) with each experts implementation that exports ("grouped_mm": an
opaque `transformers.grouped_mm_fallback` op in fp32, `aten._grouped_mm` in bf16; "batched_mm":
`W[expert_ids]` then `bmm`). References, written without mxfx's code:

- the experts' math re-implemented per expert (`experts_reference`: routing from the model's own
  router outputs, then `F.linear` per expert on the tokens routed to it), validated first: with
  quantization off it reproduces the model's experts module exactly;
- the E4M3 MX quantizer of tests/zoo_reference.py (itself checked against the scalar reference)
  applied per expert along in_features, and per token to the expert inputs;
- the expected sites from the model's modules and parameters, not from the graph.
"""

import contextlib
import re

import pytest
import torch
import torch.nn.functional as F
from mxfx.passes.transplant_linears import TransplantError
from zoo_reference import e4m3_fake_quantize, quantized_linears

import mxfx
from mxfx.graph.config import MXSpec, QuantConfig, Rule
from mxfx.graph.sites import CHECK_FAILED, EXPERT_BMM, EXPERT_FORMS, GROUPED_MM, QUANTIZED
from mxfx.testing import moe

pytest.importorskip("transformers")

E4M3 = MXSpec("fp8_e4m3")
ARCHITECTURES = sorted(moe.MOE)
FORM = {"grouped_mm": GROUPED_MM, "batched_mm": EXPERT_BMM, "bmm": EXPERT_BMM}
# Routers compute the routing (top-k): quantized in both the reference and the prepared model they
# would be, but the reference cannot hook a router that is no nn.Linear, so the numeric tests keep
# routers in high precision (every other linear, experts included, is quantized).
ROUTERS = r".*\.(gate|router)"


def linears_config(storage: str = "packed", **fields) -> QuantConfig:
    return QuantConfig((Rule(match=ROUTERS, skip=True),
                        Rule(match=".*", weight=E4M3, activation=E4M3, weight_storage=storage, **fields)))


def experts_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in model.named_modules() if getattr(m, "down_proj", None) is not None
            and isinstance(m.down_proj, torch.nn.Parameter) and m.down_proj.dim() == 3}


def _gate(module, h: torch.Tensor) -> torch.Tensor:
    """act(gate) * up, re-implemented: gpt-oss's clamped, interleaved GLU, else SiLU(first half) * second half."""
    if type(module).__name__ == "GptOssExperts":
        gate, up = h[..., ::2].clamp(max=module.limit), h[..., 1::2].clamp(-module.limit, module.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * module.alpha))
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def dense_experts_reference(module, x, quantize=None) -> torch.Tensor:
    """Llama 4's experts: every row block x.view(E, -1, in)[e] through expert e (inputs already
    scaled by the router), each product an `F.linear` of the (out, in) expert matrix."""
    q = quantize or (lambda t: t)
    x = x.view(module.gate_up_proj.shape[0], -1, x.shape[-1])
    out = [F.linear(q(_gate(module, F.linear(q(x[e]), q(module.gate_up_proj[e].T)))), q(module.down_proj[e].T))
           for e in range(x.shape[0])]
    return torch.stack(out).view(-1, out[0].shape[-1])


def experts_reference(module, x, top_k_index, top_k_weights, quantize=None) -> torch.Tensor:
    """The experts' output, one expert at a time: y_t = sum_k w_tk * down_e(gate(gate_up_e(x_t))),
    each product an `F.linear` of the (out, in) expert matrix, operands through `quantize`."""
    q = quantize or (lambda t, axis=-1: t)
    tokens, top_k = top_k_index.shape
    out = torch.zeros(tokens, top_k, x.shape[-1], dtype=torch.promote_types(x.dtype, top_k_weights.dtype))
    bias = getattr(module, "has_bias", False)
    for e in range(module.down_proj.shape[0]):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        w1, w2 = module.gate_up_proj[e], module.down_proj[e]
        if module.is_transposed:  # stored [in, out]
            w1, w2 = w1.T, w2.T
        h = F.linear(q(x[token]), q(w1), module.gate_up_proj_bias[e] if bias else None)
        h = F.linear(q(_gate(module, h)), q(w2), module.down_proj_bias[e] if bias else None)
        out[token, slot] = h * top_k_weights[token, slot, None]
    return out.sum(1).to(x.dtype)


@contextlib.contextmanager
def reference_experts(model, quantize=None):
    """Within the context, each experts module returns `experts_reference` of its own inputs."""
    def hook(module, args, output):
        if len(args) == 1:
            return dense_experts_reference(module, args[0], quantize=quantize)
        return experts_reference(module, *args[:3], quantize=quantize)

    handles = [m.register_forward_hook(hook) for m in experts_modules(model).values()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def quantized_linears_but_routers(model):
    """`zoo_reference.quantized_linears` for every nn.Linear except routers (kept in high precision
    by `linears_config`; Llama 4's router is an nn.Linear returning a tuple). The test models carry
    no other hooks."""
    with quantized_linears(model):
        for name, module in model.named_modules():
            if re.fullmatch(ROUTERS, name):
                module._forward_hooks.clear()
        yield


def logits(output):
    return output.logits if hasattr(output, "logits") else output


def relative(got, want) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


# ---- the reference itself ------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reference_reproduces_each_experts_implementation(arch):
    """Quantization off, the per-expert re-implementation equals the model's experts: exactly for
    the grouped product (per-expert mm, as F.linear), to rounding for bmm (another GEMM kernel)."""
    for impl in moe.implementations(arch):
        model, args, kwargs = moe.MOE[arch](impl)
        with torch.no_grad():
            want = logits(model(*args, **kwargs))
            with reference_experts(model):
                got = logits(model(*args, **kwargs))
        if impl == "grouped_mm":
            assert torch.equal(got, want), arch
        else:
            assert relative(got, want) < 1e-6, (arch, relative(got, want))


def test_reference_quantizer_moves_the_output():
    """The quantized reference differs from the unquantized one (the comparison below can fail)."""
    model, args, kwargs = moe.mixtral()
    with torch.no_grad(), reference_experts(model, e4m3_fake_quantize):
        quantized = logits(model(*args, **kwargs))
    assert relative(quantized, logits(model(*args, **kwargs))) > 1e-3


# ---- every architecture x experts implementation -------------------------------------------------

# each prepare takes 10-30 s on 2 cores: the batched_mm half is marked slow (it still runs in CI)
CASES = [pytest.param((arch, impl), id=f"{arch}-{impl}", marks=[pytest.mark.slow] if impl == "batched_mm" else [])
         for arch in ARCHITECTURES for impl in moe.implementations(arch)]


@pytest.fixture(scope="module", params=CASES)
def moe_case(request):
    """(arch, impl, model, args, kwargs, prepared): packed weights for grouped_mm, simulated for bmm."""
    arch, impl = request.param
    model, args, kwargs = moe.MOE[arch](impl)
    storage = "packed" if impl == "grouped_mm" else "simulated"
    # static shapes: 3-4x faster to export (dynamic shapes: test_find_sites_agrees_with_prepare)
    prepared = mxfx.prepare(model, linears_config(storage), args, example_kwargs=kwargs, dynamic_shapes=None)
    return arch, impl, model, args, kwargs, prepared


def test_every_expert_parameter_is_a_quantized_site(moe_case):
    arch, impl, model, args, kwargs, prepared = moe_case
    sites = {s.fqn: s for s in prepared.mxfx_report.sites if s.kind == "linear"}
    expected = moe.expected_linear_sites(model)
    assert set(sites) == expected, (arch, sorted(set(sites) ^ expected))
    experts = {name for name in expected if name.endswith(("gate_up_proj", "down_proj")) and ".experts." in name}
    assert len(experts) == 2 * sum(1 for _ in experts_modules(model))
    for name in experts:
        site = sites[name]
        assert (site.form, site.status) == (FORM[impl], QUANTIZED), site
        param = model.get_parameter(name)
        e, a, b = param.shape
        module = experts_modules(model)[name.rpartition(".")[0]]
        transposed = getattr(module, "is_transposed", type(module).__name__ == "Llama4TextExperts")  # [E, in, out]
        assert site.weight_shape == ((e, b, a) if transposed else (e, a, b))
        assert site.weight_numel == param.numel()
    unquantized = [(s.fqn, s.status) for s in prepared.mxfx_report.unquantized if s.kind == "linear"]
    assert all(fqn.endswith((".gate", ".router")) and status == "skipped" for fqn, status in unquantized), unquantized


def test_linears_and_experts_equal_the_reference(moe_case):
    """Every linear and every expert quantized (E4M3 weights and activations): the prepared model
    equals the hook reference within 1e-5 relative."""
    arch, impl, model, args, kwargs, prepared = moe_case
    with torch.no_grad():
        got = logits(prepared(*args, **kwargs))
        with quantized_linears_but_routers(model), reference_experts(model, e4m3_fake_quantize), torch.no_grad():
            want = logits(model(*args, **kwargs))
    assert relative(got, want) < 1e-5, (arch, impl, relative(got, want))


def test_summary_has_a_row_per_expert_site(moe_case):
    arch, impl, model, args, kwargs, prepared = moe_case
    rows = [r for r in mxfx.summary(prepared).rows if r["kind"].startswith("linear (")]
    assert {r["site"] for r in rows} == {f"{n}.{p}" for n in experts_modules(model) for p in ("gate_up_proj", "down_proj")}
    packed = impl == "grouped_mm"
    for row in rows:
        assert row["kind"] == "linear (4 experts)" and row["weight"] == "fp8_e4m3/32"
        assert row["storage"] == ("packed" if packed else "simulated")
        if packed:  # 8 bits a code + one 8-bit scale per 32
            assert row["bits_per_weight"] == 8.25


# ---- forms ---------------------------------------------------------------------------------------


def _targets(gm) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


def test_bf16_export_is_aten_grouped_mm_and_quantized():
    model, args, kwargs = moe.mixtral("grouped_mm", torch.bfloat16)
    program = mxfx.export(model, args, dynamic_shapes=None)
    assert "aten._grouped_mm.default" in _targets(program.module())
    prepared = mxfx.prepare(program, linears_config("packed"))
    sites = [s for s in prepared.mxfx_report.sites if s.form in EXPERT_FORMS]
    assert len(sites) == 4 and all(s.form == GROUPED_MM and s.quantized for s in sites)
    with torch.no_grad():
        got = logits(prepared(*args))
        with quantized_linears_but_routers(model), reference_experts(model, e4m3_fake_quantize):
            want = logits(model(*args))
    # bf16 end to end (measured: bit-equal on CPU, the reference's F.linear per expert rounds as
    # aten._grouped_mm does); the quantization itself moves the logits by ~8%
    assert relative(got, want) < 1e-5, relative(got, want)


def test_fp32_grouped_form_is_the_opaque_transformers_op():
    model, args, _ = moe.gpt_oss("grouped_mm")
    assert "transformers.grouped_mm_fallback.default" in _targets(mxfx.export(model, args, dynamic_shapes=None).module())


def test_per_expert_linear_lists_keep_readable_names():
    model, args, _ = moe.expert_list()
    prepared = mxfx.prepare(model, QuantConfig((Rule(match=".*", weight=E4M3, activation=E4M3),)), args)
    names = {s.fqn for s in prepared.mxfx_report.sites}
    assert names == {"router"} | {f"experts.{e}.{i}" for e in range(4) for i in (0, 2)}
    with torch.no_grad(), quantized_linears(model):
        want = model(*args)
    assert relative(prepared(*args), want) < 1e-5


def test_a_gather_feeding_both_bmm_operands_is_check_failed():
    """Expert matrices gathered on both sides of a bmm are not a linear: CHECK_FAILED, with the reason."""

    class Both(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 64, 64))

        def forward(self, ids):
            return torch.bmm(self.w[ids], self.w[ids])

    ids = torch.randint(0, 4, (6,))
    sites = [s for s in mxfx.find_sites(mxfx.export(Both(), (ids,), dynamic_shapes=None), linears_config())
             if s.form in EXPERT_FORMS]
    assert [(s.fqn, s.status) for s in sites] == [("w", CHECK_FAILED)]
    assert "both bmm operands" in sites[0].reason


def test_grouped_product_on_a_stored_in_out_parameter():
    """`aten._grouped_mm(x, W)` on a parameter stored [E, in, out]: one site, blocked along axis 1,
    equal to the per-expert reference (each expert's rows between consecutive offsets)."""

    class Grouped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 64, 96, dtype=torch.bfloat16))

        def forward(self, x, offs):
            return torch._grouped_mm(x, self.w, offs)

    x, offs = torch.randn(10, 64, dtype=torch.bfloat16), torch.tensor([2, 5, 5, 10], dtype=torch.int32)
    model = Grouped()
    config = QuantConfig((Rule(match=".*", weight=E4M3, activation=E4M3, weight_storage="simulated"),))
    prepared = mxfx.prepare(model, config, (x, offs), dynamic_shapes=None)
    (site,) = [s for s in prepared.mxfx_report.sites]
    assert (site.fqn, site.form, site.status, site.weight_shape) == ("w", GROUPED_MM, QUANTIZED, (4, 96, 64))
    want = torch.zeros(10, 96, dtype=torch.bfloat16)
    for e, (start, end) in enumerate(zip([0, 2, 5, 5], [2, 5, 5, 10])):
        if start == end:
            continue
        want[start:end] = F.linear(e4m3_fake_quantize(x[start:end]), e4m3_fake_quantize(model.w[e].T)).detach()
    with torch.no_grad():
        assert relative(prepared(x, offs), want) < 1e-2  # bf16 GEMMs: rounding of the accumulations
        exact = mxfx.prepare(model, QuantConfig((Rule(match="w", skip=True),)), (x, offs), dynamic_shapes=None)
        assert relative(exact(x, offs), want) > 1e-2  # the check above can fail: quantization shows


def test_an_expert_form_mxfx_does_not_follow_is_reported_not_dropped():
    """A grouped product whose weight is computed (`W * 2`) is no expert site; the completeness pass
    records it UNSUPPORTED, naming the parameter."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4, 64, 32, dtype=torch.bfloat16))

        def forward(self, x, offs):
            return torch._grouped_mm(x, self.w * 2, offs)

    offs = torch.tensor([2, 4, 6, 8], dtype=torch.int32)
    program = mxfx.export(Scaled(), (torch.randn(8, 64, dtype=torch.bfloat16), offs), dynamic_shapes=None)
    sites = mxfx.find_sites(program, linears_config())
    assert [(s.kind, s.status) for s in sites] == [("linear", "unsupported")]
    assert "w" in sites[0].reason and sites[0].form not in EXPERT_FORMS


def test_matching_twice_is_a_no_op():
    from mxfx.passes.match_expert_sites import MatchExpertSitesPass

    model, args, _ = moe.olmoe("batched_mm")
    gm = mxfx.export(model, args, dynamic_shapes=None).module()
    mxfx.find_sites(gm, linears_config())
    assert not MatchExpertSitesPass(linears_config())(gm).modified


def test_find_sites_agrees_with_prepare_and_shapes_stay_dynamic():
    """find_sites and prepare report the same expert sites; the default (dynamic) export serves
    other batch sizes and sequence lengths (the routed row counts are data-dependent sizes)."""
    model, args, _ = moe.qwen2_moe("grouped_mm")
    program = mxfx.export(model, args)
    found = [(s.fqn, s.form, s.status) for s in mxfx.find_sites(program, linears_config()) if s.form in EXPERT_FORMS]
    prepared = mxfx.prepare(program, linears_config())
    assert found == [(s.fqn, s.form, s.status) for s in prepared.mxfx_report.sites if s.form in EXPERT_FORMS]
    assert len(found) == 4
    other = torch.randint(0, moe.VOCAB, (3, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = logits(prepared(other))
        with quantized_linears_but_routers(model), reference_experts(model, e4m3_fake_quantize):
            want = logits(model(other))
    assert relative(got, want) < 1e-5


# ---- recovery and scale modes on expert sites ----------------------------------------------------


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def _rotated(t: torch.Tensor, block: int = 32) -> torch.Tensor:
    """t with each block of `block` along the last axis multiplied by the normalized Hadamard matrix."""
    blocks = t.double().reshape(*t.shape[:-1], -1, block)
    return (blocks @ _sylvester(block)).reshape(t.shape).to(t.dtype)


EXPERTS = r".*\.experts\..*"


@pytest.mark.parametrize("impl", moe.IMPLEMENTATIONS)
def test_hadamard_rotation_on_expert_sites(impl):
    """rotation = "hadamard" on the experts: x H and W_e H (blocks of 32 along in_features), then
    quantized, per expert. gpt-oss stores [E, in, out]: the rotation follows in_features there too."""
    model, args, _ = moe.gpt_oss(impl)
    config = QuantConfig((Rule(match=EXPERTS, weight=E4M3, activation=E4M3, rotation="hadamard"),))
    prepared = mxfx.prepare(model, config, args, dynamic_shapes=None)
    assert prepared.mxfx_report.rewrites["RotateExpertsPass"] == 4
    with torch.no_grad():
        got = logits(prepared(*args))
        with reference_experts(model, lambda t: e4m3_fake_quantize(_rotated(t))):
            want = logits(model(*args))
        with reference_experts(model, e4m3_fake_quantize):
            unrotated = logits(model(*args))
    assert relative(got, want) < 1e-4, relative(got, want)  # fp32 rotation rounding moves a few codes
    assert relative(unrotated, want) > 1e-3


def test_mse_scales_on_expert_sites_equal_the_dense_linear_per_expert():
    """scale_mode = "mse": the stored expert weight is, per expert, what a dense linear's weight gets."""
    mse = MXSpec("fp4_e2m1", scale_mode="mse")
    model, args, _ = moe.gpt_oss("grouped_mm")
    config = QuantConfig((Rule(match=EXPERTS, weight=mse, weight_storage="simulated"),))
    prepared = mxfx.prepare(model, config, args, dynamic_shapes=None)
    param = model.get_parameter("model.layers.0.mlp.experts.down_proj")  # [E, in, out]
    (name,) = [n for n, _ in prepared.named_buffers() if n.endswith("layers_0_mlp_experts_down_proj_simulated")]
    stored = prepared.get_buffer(name)
    floor = mxfx.fake_quantize(param[0].T.contiguous().detach(), "fp4_e2m1")
    for e in range(param.shape[0]):
        dense = mxfx.fake_quantize(param[e].T.contiguous().detach(), "fp4_e2m1", scale_mode="mse")
        assert torch.equal(stored[e].T, dense), e
    assert not torch.equal(stored[0].T, floor)  # mse picked other scales than floor somewhere


def _expert_inputs(model, args):
    """{experts module name: [(hidden_states, top_k_index)]} seen by each experts module in a run."""
    seen = {name: [] for name in experts_modules(model)}
    handles = [m.register_forward_hook(lambda m, a, o, name=name: seen[name].append((a[0], a[1])))
               for name, m in experts_modules(model).items()]
    with torch.no_grad():
        model(*args)
    for handle in handles:
        handle.remove()
    return seen


@pytest.mark.parametrize("impl", moe.IMPLEMENTATIONS)
def test_gptq_per_expert_hessians_from_routed_tokens(impl):
    """GPTQ on expert sites: expert e's Hessian is X_e^T X_e of the tokens routed to it (grouped:
    the rows between offsets; bmm: the rows whose gathered id is e); an expert no calibration token
    reaches is rounded to nearest, with a warning naming the site."""
    from mxfx.recovery.gptq import gptq_quantize

    model, args, _ = moe.gpt_oss(impl)
    with torch.no_grad():
        model.model.layers[0].mlp.router.bias[3] = -1e4  # expert 3 of layer 0 is never chosen
    config = QuantConfig((Rule(match=r".*layers\.0\.mlp\.experts\.gate_up_proj", weight=E4M3,
                               weight_storage="simulated", weight_rounding="gptq"),))
    with pytest.warns(mxfx.MXFXWarning, match=r"experts\.gate_up_proj: no calibration token reached expert\(s\) \[3\]"):
        prepared = mxfx.prepare(model, config, args, calibration=[args], dynamic_shapes=None)
    (name,) = [n for n, _ in prepared.named_buffers() if "gate_up_proj" in n]
    stored = prepared.get_buffer(name)  # [E, in, out], like the parameter
    (x, index), = _expert_inputs(model, args)["model.layers.0.mlp.experts"]
    param = model.get_parameter("model.layers.0.mlp.experts.gate_up_proj").detach()
    for e in range(4):
        rows = x[(index == e).any(-1)]
        weight = param[e].T.contiguous()
        if e == 3:
            assert rows.shape[0] == 0
            assert torch.equal(stored[e].T, e4m3_fake_quantize(weight))
            continue
        want, _ = gptq_quantize(weight, rows.T @ rows, E4M3)
        # the graph sums X^T X in expert-sorted row order: a few codes may round the other way
        assert (stored[e].T == want).float().mean() > 0.99, e
        assert (stored[e].T != e4m3_fake_quantize(weight)).float().mean() > 0.05, e  # not round-to-nearest


@pytest.mark.parametrize("storage", ["packed", "simulated"])
def test_check_nonfinite_names_expert_operands(storage):
    """mxfx.check_nonfinite reports an expert site's weight (a NaN stored in one expert) and its
    activation (an Inf in one token), both under the site's name."""
    model = GatheredExperts()
    with torch.no_grad():
        model.w[2, 5, 7] = float("nan")
    x, ids = torch.randn(10, 64, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3] * 2 + [2, 2])
    config = QuantConfig((Rule(match=".*", weight=E4M3, activation=E4M3, weight_storage=storage),))
    prepared = mxfx.prepare(model, config, (x, ids), dynamic_shapes=None)
    x[4, 3] = float("inf")
    with pytest.warns(mxfx.MXFXWarning):
        found = mxfx.check_nonfinite(prepared, x, ids)
    assert {(f.site, f.operand) for f in found} == {("w", "weight"), ("w", "activation")}
    activation = next(f for f in found if f.operand == "activation")
    assert (activation.nan, activation.inf) == (0, 1)


class StackedExperts(torch.nn.Module):
    """Llama 4's form: the stacked [E, in, out] parameter batched against x.view(E, -1, in)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 64, 96, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return torch.bmm(x.view(4, -1, 64), self.w)


def test_gptq_on_a_stack_batched_against_x_uses_batch_entry_e():
    """Ungathered bmm: expert e's Hessian is X_e^T X_e of batch entry e (same row order: exact)."""
    from mxfx.recovery.gptq import gptq_quantize

    model, x = StackedExperts(), torch.randn(4 * 6, 64, generator=torch.Generator().manual_seed(1))
    config = QuantConfig((Rule(match="w", weight=E4M3, weight_storage="simulated", weight_rounding="gptq"),))
    prepared = mxfx.prepare(model, config, (x,), calibration=[(x,)], dynamic_shapes=None)
    (site,) = prepared.mxfx_report.sites
    assert (site.form, site.weight_shape, prepared.mxfx_report.rewrites["GPTQExpertsPass"]) == (EXPERT_BMM, (4, 96, 64), 1)
    (stored,) = [b for n, b in prepared.named_buffers() if n.endswith("_simulated")]
    rows = x.view(4, -1, 64)
    for e in range(4):
        want, _ = gptq_quantize(model.w[e].T.detach(), rows[e].T @ rows[e], E4M3)
        assert torch.equal(stored[e].T, want), e


def test_gptq_without_calibration_names_the_problem():
    model, args, _ = moe.mixtral()
    config = QuantConfig((Rule(match=EXPERTS, weight=E4M3, weight_rounding="gptq"),))
    with pytest.raises(mxfx.ConfigError, match="calibration"):
        mxfx.prepare(model, config, args, dynamic_shapes=None)


# ---- analysis, compile, files --------------------------------------------------------------------


@pytest.mark.slow
def test_sensitivity_rows_of_expert_sites_equal_evaluate():
    """Sensitivity treats an expert site as one row (cost: its numel); the isolated row equals
    prepare + evaluate of that site alone, bit for bit."""
    model, args, _ = moe.mixtral()
    names = ["model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"]
    candidate = ("fp4_e2m1", "fp8_e4m3")
    report = mxfx.sensitivity(model, args, candidates=[candidate], mode="isolated", sites=names, progress=None)
    assert [row["site"] for row in report.rows] == names
    for row in report.rows:
        assert row["weight_numel"] == model.get_parameter(row["site"]).numel()
        rule = Rule(match=row["site"].replace(".", r"\."), weight=MXSpec(candidate[0]), activation=MXSpec(candidate[1]))
        expected = mxfx.evaluate(model, args, QuantConfig((rule,)))
        assert {k: row[k] for k in expected} == expected, row["site"]
    candidates = [("fp8_e4m3", "fp8_e4m3"), ("fp4_e2m1", "fp8_e4m3")]
    local = mxfx.sensitivity(model, args, candidates=candidates, mode="local", progress=None, kinds=("linear",))
    assert set(names) <= {row["site"] for row in local.rows}
    # search: an expert site costs its numel (bits per weight: element bits + 8 scale bits per 32)
    _, result = mxfx.search(model, args, candidates=candidates, budget_bits=6.0, report=local, progress=False,
                            mode="local")
    def weight(name):  # an expert site names its parameter; a linear site its module
        return model.get_parameter(name) if name.endswith("_proj") and ".experts." in name else model.get_submodule(name).weight

    numel = {name: weight(name).numel() for name in result.assignment}
    bits = {"fp8_e4m3": 8 + 8 / 32, "fp4_e2m1": 4 + 8 / 32}
    want = sum(numel[n] * bits[c[0]] for n, c in result.assignment.items()) / sum(numel.values())
    assert abs(result.average_bits - want) < 1e-9 and result.average_bits <= 6.0
    assert set(names) <= set(result.assignment)


class GatheredExperts(torch.nn.Module):
    """The batched_mm form with the weight on the left: bmm(W[ids] [S, out, in], x [S, in, 1])."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(4, 96, 64, generator=torch.Generator().manual_seed(0)))

    def forward(self, x, ids):
        return torch.bmm(self.w[ids], x.unsqueeze(-1)).squeeze(-1)


def test_weight_left_bmm_equals_per_row_reference_and_compiles(fresh_dynamo):
    x, ids = torch.randn(10, 64, generator=torch.Generator().manual_seed(1)), torch.randint(0, 4, (10,))
    model = GatheredExperts()
    prepared = mxfx.prepare(model, QuantConfig((Rule(match=".*", weight=E4M3, activation=E4M3),)), (x, ids))
    (site,) = prepared.mxfx_report.sites
    assert (site.fqn, site.form, site.weight_shape) == ("w", EXPERT_BMM, (4, 96, 64))
    # structure: one activation fake-quantize, one dequantize of the packed stack (blocked along axis
    # 2, in_features), the fp parameter gone; running the pass again changes nothing
    ops = [n for n in prepared.graph.nodes if n.op == "call_function" and n.target.namespace == "mxfx"]
    assert sorted(str(n.target) for n in ops) == ["mxfx.dequantize.default", "mxfx.fake_quantize.default"]
    assert [n.args[4] for n in ops if n.target is torch.ops.mxfx.dequantize.default] == [2]
    assert "w" not in dict(prepared.named_parameters())
    from mxfx.passes.insert_expert_qdq import InsertExpertQDQPass

    assert not InsertExpertQDQPass(QuantConfig((Rule(match=".*", weight=E4M3, activation=E4M3),)))(prepared).modified
    want = torch.stack([F.linear(e4m3_fake_quantize(x[i]), e4m3_fake_quantize(model.w[e])) for i, e in enumerate(ids)])
    with torch.no_grad():
        got = prepared(x, ids)
        assert relative(got, want.detach()) < 1e-6
        # Inductor turns this N=1 bmm into its own reduction (another summation order): equal to
        # rounding; a quantizer that differed would move the output by ~1e-2
        assert relative(torch.compile(prepared, fullgraph=True)(x, ids), got) < 1e-6


def test_save_load_round_trip(tmp_path):
    model, args, _ = moe.olmoe("grouped_mm")
    prepared = mxfx.prepare(model, linears_config("packed"), args, dynamic_shapes=None)
    mxfx.save(prepared, tmp_path / "moe.pt2")
    loaded = mxfx.load(tmp_path / "moe.pt2")
    with torch.no_grad():
        assert torch.equal(loaded(*args).logits, prepared(*args).logits)
    rows = {r["site"]: r for r in mxfx.summary(loaded).rows}
    assert rows["model.layers.1.mlp.experts.down_proj"]["kind"] == "linear (4 experts)"


@pytest.mark.parametrize("impl,storage", [("grouped_mm", "packed"), ("batched_mm", "simulated")])
def test_batch_one_reuses_the_quantized_experts(impl, storage, monkeypatch):
    """A batch-1 call (a shape class Hugging Face masks treat apart: re-exported on first use) runs
    the experts on the prepared module's own quantized buffers, nothing quantized again, and gives
    each example's batch-2 logits."""
    model, (ids,), _ = moe.mixtral(impl)
    prepared = mxfx.prepare(model, linears_config(storage), (ids,))
    both = prepared(ids).logits
    calls = []
    real = mxfx.numerics.api.quantize
    monkeypatch.setattr(mxfx.numerics.api, "quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    for row in range(2):
        assert torch.equal(prepared(ids[row:row + 1]).logits[0], both[row]), row
    assert not calls
    one = mxfx.graph.shape_classes.module_for(prepared, (ids[:1],))
    assert one is not prepared
    ours = {n: t.data_ptr() for n, t in one.named_buffers() if n.startswith("mxfx_experts")}
    theirs = {n: t.data_ptr() for n, t in prepared.named_buffers() if n.startswith("mxfx_experts")}
    assert len(ours) == len(theirs) == (4 if storage == "packed" else 2) * moe.LAYERS and ours == theirs


def test_rotated_experts_are_refused_in_a_re_export():
    model, (ids,), _ = moe.mixtral("grouped_mm")
    prepared = mxfx.prepare(model, linears_config(rotation="hadamard"), (ids,))
    with pytest.raises(TransplantError, match="rotated expert sites"):
        prepared(ids[:1])
