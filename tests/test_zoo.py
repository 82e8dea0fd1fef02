"""The architecture zoo: 20 transformer architectures from small random configs (offline), each
prepared with a config quantizing every linear and every attention, checked against counts and
references computed independently of mxfx (tests/zoo_reference.py):

- every linear-like product with a parameter operand in the plain export is a quantized linear site;
- every softmax over the last axis fed by a product of two activations, and every SDPA call, is a
  quantized attention site;
- with linears only, the prepared model equals the model run with hooks that quantize each
  nn.Linear / Conv1D / MultiheadAttention input and weight (1e-6 relative);
- `torch.compile` of the fully prepared model traces in one graph and agrees with eager.
"""

import pytest
import torch
from zoo_reference import attention_softmaxes, linear_product_count, quantized_linears, sdpa_calls

import mxfx
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.testing import zoo as zoo_models

pytest.importorskip("transformers")

E4M3 = MXSpec("fp8_e4m3")
LINEARS = QuantConfig((Rule(match=".*", weight=E4M3, activation=E4M3),))
EVERYTHING = QuantConfig((Rule(match=".*", weight=E4M3, activation=E4M3,
                               attention=AttentionSpec(E4M3, E4M3, E4M3, E4M3)),))
ARCHITECTURES = sorted(zoo_models.ZOO) + ["gpt2_sdpa"]
# The weight uses each architecture leaves in high precision, reported by the completeness pass
# (passes/report_unquantized.py): (site, form, status). Everything else is a quantized site.
_PATCH_EMBEDDING = {("embeddings.patch_embeddings.projection", "conv2d", "unsupported")}
EXPECTED_UNQUANTIZED = {
    "vit": _PATCH_EMBEDDING, "dinov2": _PATCH_EMBEDDING, "swin": _PATCH_EMBEDDING,
    "whisper": {("encoder.conv1", "conv1d", "unsupported"), ("encoder.conv2", "conv1d", "unsupported")},
}


def build(name):
    if name == "gpt2_sdpa":
        return zoo_models.gpt2("sdpa")
    return zoo_models.ZOO[name]()


def tensors(output):
    """The tensors of a model output (a tensor, a tuple, or a Hugging Face ModelOutput), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    items = output.to_tuple() if hasattr(output, "to_tuple") else output
    return [t for item in items for t in tensors(item)] if isinstance(items, (tuple, list)) else []


def relative_error(got, want):
    return max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)).item()
               for g, w in zip(got, want, strict=True))


@pytest.fixture(scope="module", params=ARCHITECTURES)
def zoo_case(request):
    """(name, model, args, kwargs, plain export program) for one architecture."""
    model, args, kwargs = build(request.param)
    with torch.no_grad():
        program = torch.export.export(model, args, kwargs, strict=False)
    return request.param, model, args, kwargs, program


def test_every_site_found_and_quantized(zoo_case):
    name, model, args, kwargs, program = zoo_case
    plain = program.module()
    linears, softmaxes, sdpas = linear_product_count(plain), attention_softmaxes(plain), sdpa_calls(plain)
    assert linears > 0 and softmaxes + sdpas, name
    prepared = mxfx.prepare(program, EVERYTHING)
    sites = prepared.mxfx_report.sites
    assert mxfx.find_sites(program, EVERYTHING) == list(sites)  # what find_sites says is what prepare did
    unquantized = {(s.fqn, s.form, s.status) for s in prepared.mxfx_report.unquantized}
    assert unquantized == EXPECTED_UNQUANTIZED.get(name, set()), [(s.fqn, s.reason) for s in prepared.mxfx_report.unquantized]
    assert all(s.reason for s in prepared.mxfx_report.unquantized)
    assert sum(s.quantized for s in sites if s.kind == "linear") == linears
    attention = [s for s in sites if s.kind == "attention"]
    assert sorted(s.node for s in attention if s.form != "sdpa") == sorted(softmaxes)
    assert sorted(s.node for s in attention if s.form == "sdpa") == sorted(sdpas)
    assert all(s.quantized for s in attention)
    expected_ops = {"fake_quantize": 4 * len(softmaxes), "attention": len(sdpas)}
    for op, expected in expected_ops.items():
        target = getattr(torch.ops.mxfx, op).default
        # attention operands only: linear activations are quantized inside mxfx.linear
        assert sum(n.target is target for n in prepared.graph.nodes) == expected, op
    with torch.no_grad():
        assert all(torch.isfinite(t).all() for t in tensors(prepared(*args, **kwargs)))


def test_linears_equal_hook_reference(zoo_case):
    name, model, args, kwargs, program = zoo_case
    prepared = mxfx.prepare(program, LINEARS)
    with torch.no_grad():
        got = tensors(prepared(*args, **kwargs))
    with quantized_linears(model):
        want = [t.detach() for t in tensors(model(*args, **kwargs))]
    with torch.no_grad():
        plain = tensors(model(*args, **kwargs))
    assert relative_error(got, want) <= 1e-6, name
    assert relative_error(got, plain) > 1e-4, name  # the reference did quantize something


@pytest.mark.slow
def test_compiles(zoo_case, fresh_dynamo):
    """torch.compile traces the prepared model in one graph (Dynamo + AOTAutograd, through the mxfx
    ops' fake implementations) and agrees with eager. Inductor's code generation is checked on
    smaller graphs (test_attention, test_hf_models): here it would cost minutes per architecture."""
    name, model, args, kwargs, program = zoo_case
    prepared = mxfx.prepare(program, EVERYTHING)
    with torch.no_grad():
        eager = tensors(prepared(*args, **kwargs))
        compiled = tensors(torch.compile(prepared, backend="aot_eager", fullgraph=True)(*args, **kwargs))
    assert relative_error(compiled, eager) <= 1e-6, name


def test_zoo_quantizer_matches_the_scalar_reference():
    """The zoo's vectorised E4M3 reference agrees with the exact-arithmetic scalar reference,
    including a short last block, zeros, subnormal results and saturation."""
    from scalar_reference import fake_quantize_block
    from zoo_reference import e4m3_fake_quantize

    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 70, generator=g) * torch.logspace(-6, 6, 70)  # 70 = 32 + 32 + 6
    x[1, :32] = 0.0
    x[2, 5] = 1e-30
    want = torch.tensor([[v for start in range(0, 70, 32) for v in fake_quantize_block(row[start:start + 32], "fp8_e4m3")]
                         for row in x.tolist()])
    assert torch.equal(e4m3_fake_quantize(x), want)
    assert torch.equal(e4m3_fake_quantize(x.T.contiguous(), axis=0), want.T)
