"""Trustworthy numbers: compiled vs eager divergence, the noise floor, shapes that just work."""

import itertools
import logging
import math

import pytest
import torch
from conftest import bits_equal

import mxfx
from mxfx.analysis import divergence, noise
from mxfx.testing.models import MLP

ALL = mxfx.QuantConfig((mxfx.Rule(match=".*", weight=mxfx.MXSpec("fp8_e4m3"), activation=mxfx.MXSpec("fp8_e4m3")),))


# --- divergence -----------------------------------------------------------------------------------------


def _perturbed_relu(x):
    """relu, then every element one ulp up: a stand-in for a kernel that rounds differently."""
    return torch.nextafter(torch.relu(x), torch.tensor(math.inf))


class _InPlaceBuckets(torch.nn.Module):
    """T5's relative-position pattern: an integer tensor written in place, then used as an index."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(8, 64)
        self.proj = torch.nn.Linear(64, 64)

    def forward(self, x):
        buckets = torch.zeros(x.shape[0], dtype=torch.long)
        buckets += 7  # in place: re-running it on the read-back value would index out of range
        return self.proj(x + self.table(buckets))


def test_divergence_in_place_op_is_not_rerun():
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    prepared = mxfx.prepare(_InPlaceBuckets(), ALL, (x,))
    assert any(n.op == "call_function" and n.target._schema.is_mutable for n in prepared.graph.nodes
               if hasattr(n.target, "_schema")), "the export no longer keeps the in-place op: the test needs another"
    report = divergence.compare(prepared, x, compile=lambda gm: gm)
    assert report.output.equal and report.local == ()
    assert len(report.not_rerun) == 2 and "in-place ops and the values they write" in report.table()


def test_divergence_identity_compile_finds_nothing():
    torch.manual_seed(0)
    prepared = mxfx.prepare(MLP(), ALL, (torch.randn(4, 64),))
    report = divergence.compare(prepared, torch.randn(4, 64), compile=lambda gm: gm)
    assert [row.site for row in report.mx_ops] == ["net.0", "net.2", "net.4"]
    assert all(row.target == "mxfx.linear" for row in report.mx_ops)
    assert report.first_site is None and report.origins == () and report.output.equal and report.local == ()


def test_divergence_finds_an_injected_difference():
    torch.manual_seed(0)
    prepared = mxfx.prepare(MLP(), ALL, (torch.randn(4, 64),))
    relus = [n.name for n in prepared.graph.nodes if n.target is torch.ops.aten.relu.default]
    assert len(relus) == 2

    def inject(gm):  # the second relu (after net.2) computes differently "compiled"
        node = next(n for n in gm.graph.nodes if n.name == relus[1])
        node.target = _perturbed_relu
        gm.recompile()
        return gm

    report = divergence.compare(prepared, torch.randn(4, 64), compile=inject)
    assert [row.node for row in report.origins] == [relus[1]]
    assert report.first_origin.inputs.equal and report.first_origin.output.count == 4 * 128
    first = report.first_site
    assert first.site == "net.4" and first.after == "aten.relu" and not first.inputs.equal
    assert [row.inputs.equal for row in report.mx_ops] == [True, True, False]
    assert [row.node for row in report.local] == [relus[1]] and report.local_ops() == {"aten.relu": 1}
    assert "net.4" in report.table()


@pytest.mark.slow
def test_divergence_with_inductor_names_every_site(fresh_dynamo):
    torch.manual_seed(0)
    prepared = mxfx.prepare(MLP(), ALL, (torch.randn(4, 64),))
    report = divergence.compare(prepared, torch.randn(4, 64))
    assert [row.site for row in report.mx_ops] == [s.fqn for s in prepared.mxfx_report.sites]
    # the mxfx ops themselves are bitwise equal compiled; the first op sees the model input
    assert report.mx_ops[0].inputs.equal and report.mx_ops[0].output.equal
    for row in (*report.origins, *report.local):  # a difference is only ever born outside mxfx
        assert not row.target.startswith("mxfx.")


# --- noise floor -----------------------------------------------------------------------------------------


def _on_grid(shape, generator):
    """Values on the MXFP8 E4M3 grid with no element a power of two (so no block maximum sits on
    a binade edge that a 1-ulp step down would cross): every product and sum below is exact."""
    mantissa = torch.tensor([1.125, 1.25, 1.375, 1.5, 1.625, 1.75])
    m = mantissa[torch.randint(0, 6, shape, generator=generator)]
    exponent = torch.randint(-3, 1, shape, generator=generator).float()
    sign = torch.where(torch.rand(shape, generator=generator) < 0.5, -1.0, 1.0)
    return sign * m * torch.exp2(exponent)


def test_noise_floor_is_zero_without_near_ties():
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(64, 32, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(32, 64, generator=generator))  # off grid: a real quantization error
    x = _on_grid((8, 64), generator)
    result = mxfx.evaluate(model, x, ALL, noise=3)
    assert math.isfinite(result["sqnr"]) and result["sqnr"] > 20
    assert result["spread"] == dict.fromkeys(("sqnr", "mse", "cosine", "kl", "rel_error"), 0.0)
    labels = [label for label, _ in result["noise"]["runs"]]
    assert labels == ["jitter seed 0", "jitter seed 1", "jitter seed 2", "batch split"]


class Deep(torch.nn.Module):
    def __init__(self, d: int, depth: int) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(d, d) for _ in range(depth))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_noise_floor_is_positive_on_a_deep_random_model():
    # A 1-ulp step crosses an E4M3 rounding boundary rarely (~1e-6 per element): it takes ~1M
    # quantized elements for a few flips, which then spread through the layers.
    torch.manual_seed(0)
    result = mxfx.evaluate(Deep(128, 16), torch.randn(1024, 128), ALL, noise=2, noise_sources=("jitter",))
    assert result["spread"]["mse"] > 0 and result["spread"]["rel_error"] > 0
    jittered = [m["sqnr"] for _, m in result["noise"]["runs"]]
    assert any(value != result["sqnr"] for value in jittered)


def test_jitter_moves_by_one_ulp_on_a_random_half():
    x = torch.randn(10_000)
    y = noise.jitter(x, seed=1)
    moved = y != x
    assert 0.45 < moved.float().mean() < 0.55
    assert torch.equal(y[moved], torch.nextafter(x[moved], torch.where(y[moved] > x[moved], math.inf, -math.inf)))
    assert torch.equal(noise.jitter(x, seed=1), y) and not torch.equal(noise.jitter(x, seed=2), y)


def test_significant_and_render():
    assert not noise.significant(30.0, 30.05, 0.1) and noise.significant(30.0, 30.2, 0.1)
    assert not noise.significant(math.inf, math.inf, 0.0) and noise.significant(1.0, math.nan, 10.0)
    assert noise.render(30.05, 30.0, 0.1) == "30.05~" and noise.render(30.2, 30.0, 0.1) == "30.2"


def test_split_that_cannot_run_is_reported():
    result = mxfx.evaluate(MLP(), torch.randn(1, 64), ALL, noise=1)
    assert result["noise"]["skipped"] == [["split", "a batch has a leading dimension below 2"]]


def test_bad_noise_arguments():
    with pytest.raises(mxfx.MXValueError, match="noise"):
        mxfx.evaluate(MLP(), torch.randn(2, 64), ALL, noise=-1)
    with pytest.raises(mxfx.MXValueError, match="unknown noise source"):
        mxfx.evaluate(MLP(), torch.randn(2, 64), ALL, noise=1, noise_sources=("nope",))


# --- shapes that just work -------------------------------------------------------------------------------


def _static(model, args):
    return mxfx.prepare(model, ALL, args, dynamic_shapes=None)


def _first(output):
    return output if isinstance(output, torch.Tensor) else output[0]


def test_mlp_prepared_once_takes_other_batch_and_sequence_sizes(caplog):
    torch.manual_seed(0)
    model = MLP()
    with caplog.at_level(logging.INFO, logger="mxfx.graph.export"):
        prepared = mxfx.prepare(model, ALL, (torch.randn(2, 5, 64),))
    assert "x[0], x[1]" in caplog.text
    for batch, length in itertools.product((1, 3, 8), (5, 9)):
        x = torch.randn(batch, length, 64)
        assert bits_equal(prepared(x), _static(model, (x,))(x))
    with pytest.raises(mxfx.InputGuardError, match="in_features"):
        prepared(torch.randn(2, 5, 32))


def _bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=32)
    return transformers.BertModel(config).eval()


def _llama():
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                      use_cache=False)
    return transformers.LlamaForCausalLM(config).eval()


def _tokens(batch, length):
    ids = torch.randint(0, 128, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, length // 2:] = 0  # one padded row
    return ids, mask


@pytest.mark.slow
def test_hf_bert_prepared_once_takes_other_batch_and_sequence_sizes():
    torch.manual_seed(0)
    model = _bert()
    prepared = mxfx.prepare(model, ALL, _tokens(2, 16))
    for batch, length in ((1, 16), (3, 16), (8, 7)):
        args = _tokens(batch, length)
        assert bits_equal(_first(prepared(*args)), _first(_static(model, args)(*args)))


@pytest.mark.slow
def test_hf_llama_prepared_once_takes_other_sizes_and_batch_one():
    torch.manual_seed(0)
    model = _llama()
    prepared = mxfx.prepare(model, ALL, (torch.randint(0, 128, (2, 16)),))
    # batch 1: transformers' mask code branches on it, so its shape class is re-exported (mxfx.graph.shape_classes)
    for batch, length in ((3, 16), (8, 7), (1, 16)):
        ids = torch.randint(0, 128, (batch, length))
        assert bits_equal(_first(prepared(ids)), _first(_static(model, (ids,))(ids)))


def test_static_fallback_warns_and_guards(monkeypatch):
    real_export = torch.export.export

    def static_only(*args, dynamic_shapes=None, **kwargs):  # a model that only exports statically
        if dynamic_shapes is not None:
            raise RuntimeError("this model needs static shapes")
        return real_export(*args, dynamic_shapes=dynamic_shapes, **kwargs)

    monkeypatch.setattr(torch.export, "export", static_only)
    model, x = MLP(), torch.randn(4, 64)
    with pytest.warns(mxfx.MXFXWarning, match="could not be exported with dynamic shapes.*needs static shapes"):
        prepared = mxfx.prepare(model, ALL, (x,))
    assert bits_equal(prepared(x), _static(model, (x,))(x))
    with pytest.raises(mxfx.InputGuardError, match="static fallback"):
        prepared(torch.randn(5, 64))


def test_save_keeps_the_dynamic_shapes(tmp_path):
    torch.manual_seed(0)
    prepared = mxfx.prepare(MLP(), ALL, (torch.randn(4, 64),))
    loaded = mxfx.load(mxfx.save(prepared, tmp_path / "mlp.pt2"))
    x = torch.randn(7, 64)
    assert bits_equal(loaded(x), prepared(x))


@pytest.mark.slow
def test_compiled_prepared_module_with_symbolic_batch(fresh_dynamo):
    torch.manual_seed(0)
    prepared = mxfx.prepare(MLP(), ALL, (torch.randn(4, 64),))
    compiled = torch.compile(prepared, fullgraph=True, dynamic=True)
    for batch in (3, 8):
        x = torch.randn(batch, 64)
        torch.testing.assert_close(compiled(x), prepared(x), rtol=0, atol=1e-6)


def test_eager_numerics_options_are_inductor_settings():
    import torch._inductor.config as inductor_config

    options = divergence.eager_numerics()
    assert options["emulate_precision_casts"] is True and options["cpp.enable_floating_point_contract_flag"] == "off"
    before = inductor_config.emulate_precision_casts
    with inductor_config.patch(options):  # an unknown key would raise here
        assert inductor_config.emulate_precision_casts is True
    assert inductor_config.emulate_precision_casts == before  # the helper itself changes no global
    options["fallback_random"] = False
    assert divergence.eager_numerics()["fallback_random"] is True  # a fresh dict each call
