"""mxfx.prepare end to end: structure, numerics vs a hand reference, export round trip, compile,
idempotence, dynamic batch, dtypes, presets, and the original model left alone."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import bits_equal
from mxfx.passes.canonicalize_linear import CanonicalizeLinearPass
from mxfx.passes.insert_qdq import InsertQDQPass
from mxfx.passes.lower_linear import LowerLinearPass
from mxfx.passes.match_linear_sites import MatchLinearSitesPass

import mxfx
from mxfx.graph.config import MXSpec, QuantConfig, Rule
from mxfx.testing.models import MLP, FunctionalLinear, NanoGPT, TiedLM

E4M3, E3M2 = MXSpec("fp8_e4m3"), MXSpec("fp6_e3m2")


def count_ops(gm, name: str) -> int:
    target = getattr(torch.ops.mxfx, name).default
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is target)


def config(weight=E3M2, activation=E4M3, storage="packed", skip=()):
    rules = [Rule(match=pattern, skip=True) for pattern in skip]
    rules.append(Rule(match=".*", weight=weight, activation=activation, weight_storage=storage))
    return QuantConfig(tuple(rules))


def reference_mlp(model: MLP, x, weight="fp6_e3m2", activation="fp8_e4m3"):
    """The MLP computed by hand with the reference ops on the original weights."""
    h = x
    for layer in model.net:
        if isinstance(layer, torch.nn.Linear):
            h = F.linear(mxfx.fake_quantize(h, activation), mxfx.fake_quantize(layer.weight, weight), layer.bias)
        else:
            h = layer(h)
    return h


def test_mlp_structure_numerics_and_memory():
    torch.manual_seed(0)
    model, x = MLP(), torch.randn(8, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prepared = mxfx.prepare(model, config(), (x,))
    assert count_ops(prepared, "linear") == 3 and count_ops(prepared, "fake_quantize") == 0
    assert not any(n.target is torch.ops.aten.linear.default for n in prepared.graph.nodes if n.op == "call_function")
    assert bits_equal(prepared(x), reference_mlp(model, x))
    # packed: no fp weight left, only codes + scales (+ fp biases)
    assert {name for name, _ in prepared.named_parameters()} == {"net.0.bias", "net.2.bias", "net.4.bias"}
    weight_bytes = sum(b.nbytes for name, b in prepared.named_buffers() if name.startswith("mxfx_w"))
    fp_bytes = sum(layer.weight.nbytes for layer in model.net if isinstance(layer, torch.nn.Linear))
    assert weight_bytes == fp_bytes * (6 / 32 + 1 / 32 / 4)  # 6 bits per element + one byte per 32
    # the original model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training  # mode restored


def test_report_counts_and_rewrites():
    model = MLP()
    prepared = mxfx.prepare(model, config(skip=["net\\.4"]), (torch.randn(2, 64),))
    report = prepared.mxfx_report
    assert [s.fqn for s in report.sites] == ["net.0", "net.2", "net.4"]
    assert [count for _, count in report.rule_matches] == [1, 2]
    assert report.rewrites["InsertQDQPass"] == 2 and report.rewrites["LowerLinearPass"] == 2
    assert count_ops(prepared, "linear") == 2
    assert sum(1 for n in prepared.graph.nodes if n.target is torch.ops.aten.linear.default) == 1  # net.4 untouched


def test_unmatched_sites_stay_high_precision_and_rule_matching_nothing_warns():
    model, x = MLP(), torch.randn(2, 64)
    cfg = QuantConfig((Rule(match="nothing\\.here", weight=E4M3), Rule(match="net\\.0", weight=E4M3)))
    with pytest.warns(mxfx.MXFXWarning, match="nothing"):
        prepared = mxfx.prepare(model, cfg, (x,))
    assert count_ops(prepared, "linear") == 1


def test_empty_effect_config_changes_nothing():
    model, x = MLP(), torch.randn(4, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepared = mxfx.prepare(model, QuantConfig((Rule(match=".*", skip=True),)), (x,))
    assert count_ops(prepared, "linear") + count_ops(prepared, "fake_quantize") == 0
    assert torch.equal(prepared(x), model(x))


def test_simulated_storage_keeps_fake_quantized_weights():
    model, x = MLP(), torch.randn(8, 64)
    prepared = mxfx.prepare(model, config(storage="simulated"), (x,))
    assert count_ops(prepared, "fake_quantize") == 3 and count_ops(prepared, "linear") == 0
    assert bits_equal(prepared(x), reference_mlp(model, x))


def test_weight_only_and_activation_only():
    model, x = MLP(), torch.randn(8, 64)
    weight_only = mxfx.prepare(model, config(weight=MXSpec("fp4_e2m1"), activation=None), (x,))
    h = x
    for layer in model.net:
        h = F.linear(h, mxfx.fake_quantize(layer.weight, "fp4_e2m1"), layer.bias) if isinstance(layer, torch.nn.Linear) else layer(h)
    assert bits_equal(weight_only(x), h)
    act_only = mxfx.prepare(model, config(weight=None, activation=MXSpec("int8")), (x,))
    assert count_ops(act_only, "fake_quantize") == 3 and count_ops(act_only, "linear") == 0


def test_functional_linear_and_output_structure():
    model, x = FunctionalLinear(), torch.randn(3, 5, 64)
    prepared = mxfx.prepare(model, config(), (x,))
    assert [s.fqn for s in prepared.mxfx_report.sites] == ["w1", "w2"]
    out, extra = prepared(x)
    ref_h = F.gelu(F.linear(mxfx.fake_quantize(x, "fp8_e4m3"), mxfx.fake_quantize(model.w1, "fp6_e3m2"), model.b1))
    assert isinstance(extra, dict) and bits_equal(extra["hidden"], ref_h)
    assert bits_equal(out, F.linear(mxfx.fake_quantize(ref_h, "fp8_e4m3"), mxfx.fake_quantize(model.w2, "fp6_e3m2")))


def test_tied_weights_quantized_once_and_lm_head_named_by_module():
    model, idx = TiedLM(), torch.randint(0, 128, (2, 10))
    prepared = mxfx.prepare(model, config(), (idx,))
    assert [s.fqn for s in prepared.mxfx_report.sites] == ["proj", "lm_head"]
    # lm_head's codes replace its use of the shared weight; the embedding still reads the fp weight
    assert count_ops(prepared, "linear") == 2
    skipped = mxfx.prepare(model, "llm_mxfp8", (idx,))
    assert [s.fqn for s in skipped.mxfx_report.sites if s.rule == 1] == ["proj"]


def test_shared_weight_used_by_two_linears_is_quantized_once():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(64, 64)

        def forward(self, x):
            return self.fc(torch.relu(self.fc(x)))  # the same module called twice

    model, x = Shared(), torch.randn(4, 64)
    prepared = mxfx.prepare(model, config(), (x,))
    assert count_ops(prepared, "linear") == 2
    assert sum(1 for name, _ in prepared.named_buffers() if name.endswith("_codes")) == 1
    w = mxfx.fake_quantize(model.fc.weight, "fp6_e3m2")
    h = torch.relu(F.linear(mxfx.fake_quantize(x, "fp8_e4m3"), w, model.fc.bias))
    assert bits_equal(prepared(x), F.linear(mxfx.fake_quantize(h, "fp8_e4m3"), w, model.fc.bias))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_models(dtype):
    model, x = copy.deepcopy(MLP()).to(dtype), torch.randn(4, 64, dtype=dtype)
    prepared = mxfx.prepare(model, config(), (x,))
    out = prepared(x)
    assert out.dtype == dtype and bits_equal(out, reference_mlp(model, x))


def test_passes_are_idempotent_with_honest_modified():
    model, x = MLP(), torch.randn(2, 64)
    gm = torch.export.export(model, (x,)).module()
    cfg = config()
    passes = [CanonicalizeLinearPass(), MatchLinearSitesPass(cfg), InsertQDQPass(cfg), LowerLinearPass()]
    assert [p(gm).modified for p in passes] == [False, True, True, True]
    code = gm.code
    assert [p(gm).modified for p in passes] == [False, False, False, False]
    assert gm.code == code


def test_new_nodes_have_correct_meta_val():
    model, x = FunctionalLinear(), torch.randn(3, 5, 64)
    prepared = mxfx.prepare(model, config(), (x,))
    recorded = {n.name: n.meta["val"] for n in prepared.graph.nodes if n.op == "call_function" and "val" in n.meta}
    real = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in recorded:
                real[n.name] = out
            return out

    Recorder(prepared).run(x)
    for name, val in recorded.items():
        if isinstance(val, torch.Tensor):
            assert tuple(val.shape) == tuple(real[name].shape) and val.dtype == real[name].dtype, name


def test_addmm_and_mm_forms_are_canonicalized():
    model, x = MLP(), torch.randn(4, 64)
    decomposed = torch.export.export(model, (x,)).run_decompositions().module()
    assert any(n.target is torch.ops.aten.addmm.default for n in decomposed.graph.nodes)
    result = CanonicalizeLinearPass()(decomposed)
    assert result.modified
    assert sum(1 for n in decomposed.graph.nodes if n.target is torch.ops.aten.linear.default) == 3
    torch.testing.assert_close(decomposed(x), model(x))


def test_export_round_trip_reexport_and_save_load():
    model, x = MLP(), torch.randn(4, 64)
    prepared = mxfx.prepare(model, config(), (x,))
    want = prepared(x)
    program = torch.export.export(prepared, (x,))
    assert count_ops(program.graph_module, "linear") == 3
    program = program.run_decompositions()
    assert count_ops(program.graph_module, "linear") == 3
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    buffer.seek(0)
    assert bits_equal(torch.export.load(buffer).module()(x), want)


def test_dynamic_batch_size():
    model = MLP()
    batch = torch.export.Dim("batch")
    prepared = mxfx.prepare(model, config(), (torch.randn(4, 64),), dynamic_shapes=({0: batch},))
    for n in (1, 7, 33):
        x = torch.randn(n, 64)
        assert bits_equal(prepared(x), reference_mlp(model, x))


def test_export_failure_is_explained():
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(8, 8)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.fc(x)
            return x

    with pytest.raises(mxfx.ExportError, match="(?s)Branchy.*data-dependent.*Try:.*strict=True.*torch.cond"):
        mxfx.prepare(Branchy(), config(), (torch.randn(2, 8),))


@pytest.mark.parametrize("preset", ["mxfp8", "mxfp6_weights_mxfp8_activations", "mxfp4_weight_only", "mxint8", "llm_mxfp8"])
def test_presets_load_and_quantize(preset):
    model, idx = NanoGPT(n_layer=1), torch.randint(0, 256, (2, 16))
    prepared = mxfx.prepare(model, preset, (idx,))
    n_linear = count_ops(prepared, "linear")
    assert n_linear == (4 if preset == "llm_mxfp8" else 5)  # c_attn, c_proj, c_fc, c_proj (+ lm_head)
    logits = prepared(idx)
    assert logits.shape == (2, 16, 256) and torch.isfinite(logits).all()


@pytest.mark.slow
def test_compile_fullgraph_matches_eager(fresh_dynamo):
    model, idx = NanoGPT(), torch.randint(0, 256, (2, 32))
    for storage in ("packed", "simulated"):
        prepared = mxfx.prepare(model, config(weight=E4M3, storage=storage), (idx,))
        eager = prepared(idx)
        compiled = torch.compile(prepared, fullgraph=True)(idx)
        # quantized operands are bitwise equal; GEMM accumulation order may differ
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
        torch._dynamo.reset()
