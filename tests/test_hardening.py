"""Bad or unusual input of every kind: a correct result or an MXFXError that names the problem and
the fix, never a silently wrong answer. Plus property tests, a bit-pattern fuzz, and threads."""

import math
import threading
import warnings
import zlib

import pytest
import torch
from conftest import FORMAT_NAMES, bits_equal
from hypothesis import given, settings
from hypothesis import strategies as st
from scalar_reference import fake_quantize_block

import mxfx
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.testing.models import MLP, CausalSelfAttention

E4M3 = MXSpec("fp8_e4m3")
ALL = QuantConfig((Rule(match=".*", weight=E4M3, activation=E4M3),))


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


# --- configs (each a distinct kind of bad input) -------------------------------------------------
CONFIG_CASES = [
    ("unknown key", "[[rule]]\nmatch='.*'\nformat='fp8'\n", "unknown key 'format'"),
    ("bad regex", "[[rule]]\nmatch='*'\nweight='fp8'\n", "bad regex"),
    ("unknown format", "[[rule]]\nmatch='.*'\nweight='fp3'\n", "valid formats"),
    ("zero block size", "[[rule]]\nmatch='.*'\nweight={format='fp8', block_size=0}\n", "positive integer"),
    ("negative block size", "[[rule]]\nmatch='.*'\nweight={format='fp8', block_size=-1}\n", "positive integer"),
    ("float block size", "[[rule]]\nmatch='.*'\nweight={format='fp8', block_size=32.0}\n", "positive integer"),
    ("string skip", "[[rule]]\nmatch='.*'\nskip='true'\n", "true or false"),
    ("list as spec", "[[rule]]\nmatch='.*'\nweight=['fp8']\n", "format name or a table"),
    ("empty file", "", "empty"),
    ("no rules", "[defaults]\nrounding='even'\n", "at least one rule"),
    ("bad scale mode", "[[rule]]\nmatch='.*'\nweight={format='fp8', scale_mode='nearest'}\n", "floor, ceil, even, rceil"),
]


@pytest.mark.parametrize("name,text,message", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_bad_configs(tmp_path, name, text, message):
    with pytest.raises(mxfx.ConfigError, match=message):
        mxfx.load_config(write(tmp_path, text))


def test_rule_matching_nothing_warns_by_name():
    cfg = QuantConfig((Rule(match="decoder\\..*", weight=E4M3), *ALL.rules))
    with pytest.warns(mxfx.MXFXWarning, match="decoder"):
        mxfx.prepare(MLP(), cfg, (torch.randn(2, 64),))


# --- tensors ---------------------------------------------------------------------------------
TENSOR_ERRORS = [
    ("int32", lambda: torch.arange(64, dtype=torch.int32), mxfx.MXTypeError, "int32.*float32, bfloat16, float16"),
    ("uint8", lambda: torch.zeros(64, dtype=torch.uint8), mxfx.MXTypeError, "uint8"),
    ("bool", lambda: torch.zeros(64, dtype=torch.bool), mxfx.MXTypeError, "bool"),
    ("complex", lambda: torch.zeros(64, dtype=torch.complex64), mxfx.MXTypeError, "complex"),
    ("float64", lambda: torch.zeros(64, dtype=torch.float64), mxfx.MXTypeError, r"\.float\(\)"),
    ("0-d", lambda: torch.tensor(3.0), mxfx.MXValueError, "reshape to 1-D"),
    ("numpy-like list", lambda: [1.0] * 64, mxfx.MXTypeError, "torch.Tensor"),
]


@pytest.mark.parametrize("name,make,error,message", TENSOR_ERRORS, ids=[c[0] for c in TENSOR_ERRORS])
@pytest.mark.parametrize("fn", [mxfx.quantize, mxfx.fake_quantize])
def test_bad_tensors(fn, name, make, error, message):
    with pytest.raises(error, match=message):
        fn(make(), "fp8_e4m3")


def reference_rows(x, name, block):
    rows = x.float().reshape(-1, x.shape[-1]).tolist()
    out = []
    for row in rows:
        q = []
        for i in range(0, len(row), block):
            q += fake_quantize_block(row[i:i + block], name)
        out.append(q)
    return torch.tensor(out).reshape(x.shape)


UNUSUAL = [
    ("zero-size", lambda: torch.empty(0, 64)),
    ("non-contiguous", lambda: torch.randn(64, 96).t()),
    ("channels-last", lambda: torch.randn(2, 32, 4, 4).to(memory_format=torch.channels_last)),
    ("huge values", lambda: torch.randn(4, 64) * 3e38),
    ("all NaN", lambda: torch.full((2, 64), math.nan)),
    ("mixed NaN/Inf blocks", lambda: torch.tensor([[math.nan, math.inf, -math.inf, 1.0] * 16])),
    ("fp32 subnormals", lambda: torch.randn(4, 64) * 1e-40),
    ("not a multiple of the block", lambda: torch.randn(3, 50)),
    ("shorter than a block", lambda: torch.randn(3, 7)),
    ("single element", lambda: torch.randn(1)),
]


@pytest.mark.parametrize("name,make", UNUSUAL, ids=[c[0] for c in UNUSUAL])
@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp4_e2m1", "int8"])
def test_unusual_tensors_give_the_spec_result(name, make, fmt):
    x = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mxfx.MXFXWarning)
        got = mxfx.fake_quantize(x, fmt)
        assert bits_equal(mxfx.quantize(x, fmt).dequantize(), got)
    assert got.shape == x.shape
    if x.numel():
        want = reference_rows(x.contiguous(), fmt, 32)
        nan = torch.isnan(want)
        assert torch.equal(torch.isnan(got), nan)
        assert torch.equal(got[~nan], want[~nan])


def test_inf_input_warns_once():
    from mxfx.numerics import api

    api._WARNED_INF.clear()  # "once" is per process: start from a clean slate
    x = torch.randn(4, 64)
    x[1, 5] = math.inf
    with pytest.warns(mxfx.MXFXWarning, match="Inf"):
        mxfx.fake_quantize(x, "fp8_e4m3")
    with warnings.catch_warnings():
        warnings.simplefilter("error", mxfx.MXFXWarning)
        mxfx.fake_quantize(x, "fp8_e4m3")  # once: no second warning


def nonfinite(prepared, *inputs):
    """check_nonfinite as (site, operand, kinds) triples; its warnings are checked to match."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", mxfx.MXFXWarning)
        found = mxfx.check_nonfinite(prepared, *inputs)
    assert [str(w.message) for w in caught if w.category is mxfx.MXFXWarning] == [f"mxfx: {f}" for f in found]
    return [(f.site, f.operand, f.kinds) for f in found]


@pytest.mark.parametrize("value,kinds", [(math.inf, "Inf"), (-math.inf, "Inf"), (math.nan, "NaN")])
def test_check_nonfinite_names_site_operand_and_kind(value, kinds):
    prepared = mxfx.prepare(MLP(), ALL, (torch.randn(2, 64),))
    x = torch.randn(2, 64)
    x[0, 0] = value
    assert nonfinite(prepared, x)[0] == ("net.0", "activation", kinds)
    assert nonfinite(prepared, torch.randn(2, 64)) == []


def test_check_nonfinite_ignores_unquantized_inputs():
    """A weight-only linear does not quantize its input: a NaN there is not an MX problem."""
    weight_only = QuantConfig((Rule(match=".*", weight=E4M3),))
    prepared = mxfx.prepare(MLP(), weight_only, (torch.randn(2, 64),))
    assert nonfinite(prepared, torch.full((2, 64), math.nan)) == []


@pytest.mark.parametrize("storage", ["packed", "simulated"])
def test_check_nonfinite_reports_weight_blocks_that_decode_to_nan(storage):
    model = MLP()
    with torch.no_grad():
        model.net[2].weight[5, 40] = math.inf  # one block of 32 along in_features
    cfg = QuantConfig((Rule(match=".*", weight=E4M3, weight_storage=storage),))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mxfx.MXFXWarning)  # prepare warns about the Inf weight itself
        prepared = mxfx.prepare(model, cfg, (torch.randn(2, 64),))
        found = mxfx.check_nonfinite(prepared, torch.randn(2, 64))
    assert [(f.site, f.operand, f.nan, f.inf) for f in found] == [("net.2", "weight", 32, 0)]


def attention_with_bias(flash, operand, spec):
    """CausalSelfAttention whose c_attn bias is +Inf on one of q / k / v: that operand is all Inf."""
    model = CausalSelfAttention(32, 2, flash)
    with torch.no_grad():
        model.c_attn.bias[32 * "qkv".index(operand):][:32] = math.inf
    cfg = QuantConfig((Rule(match="", attention=spec), Rule(match=".*", skip=True)))
    return mxfx.prepare(model, cfg, (torch.randn(2, 8, 32),))


ALL_FOUR = AttentionSpec(E4M3, E4M3, E4M3, E4M3)


@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("operand,want", [
    ("q", [("", "q", "Inf"), ("", "p", "NaN")]),  # q·k = Inf - Inf: NaN scores, NaN rows of P
    ("k", [("", "k", "Inf"), ("", "p", "NaN")]),
    ("v", [("", "v", "Inf")]),
])
def test_check_nonfinite_attention_operands(flash, operand, want):
    prepared = attention_with_bias(flash, operand, ALL_FOUR)
    assert sorted(nonfinite(prepared, torch.randn(2, 8, 32))) == sorted(want)


@pytest.mark.parametrize("flash", [True, False], ids=["sdpa", "explicit"])
def test_check_nonfinite_attention_checks_only_quantized_operands(flash):
    """K is Inf but kept in high precision, and P (NaN) is not quantized either: nothing to report."""
    prepared = attention_with_bias(flash, "k", AttentionSpec(query=E4M3, value=E4M3))
    assert nonfinite(prepared, torch.randn(2, 8, 32)) == []
    prepared = attention_with_bias(flash, "k", AttentionSpec(query=E4M3, probs=E4M3))
    assert nonfinite(prepared, torch.randn(2, 8, 32)) == [("", "p", "NaN")]


# --- models ----------------------------------------------------------------------------------
class NoLinears(torch.nn.Module):
    def forward(self, x):
        return x.relu() * 2


class LoopOverList(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Linear(32, 32) for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


class DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) if x.max() > 0 else x


def test_model_without_linears_runs_unchanged():
    with pytest.warns(mxfx.MXFXWarning, match="matched no site"):
        prepared = mxfx.prepare(NoLinears(), ALL, (torch.randn(2, 8),))
    x = torch.randn(3, 2, 8)[0]
    assert torch.equal(prepared(x), NoLinears()(x))


def test_linear_in_a_loop_over_a_list():
    model, x = LoopOverList(), torch.randn(4, 32)
    prepared = mxfx.prepare(model, ALL, (x,))
    assert [s.fqn for s in prepared.mxfx_report.sites] == ["layers.0", "layers.1", "layers.2"]
    h = x
    for layer in model.layers:
        h = torch.tanh(torch.nn.functional.linear(mxfx.fake_quantize(h, "fp8_e4m3"), mxfx.fake_quantize(layer.weight, "fp8_e4m3"), layer.bias))
    assert bits_equal(prepared(x), h)


@pytest.mark.parametrize("strict", [False, True])
def test_untraceable_model_says_why_and_what_to_try(strict):
    with pytest.raises(mxfx.ExportError, match="(?s)DataDependent.*Try:.*strict=.*use_cache=False"):
        mxfx.prepare(DataDependent(), ALL, (torch.randn(2, 8),), strict=strict)


def test_prepare_twice_on_the_same_model():
    model, x = MLP(), torch.randn(2, 64)
    a, b = mxfx.prepare(model, ALL, (x,)), mxfx.prepare(model, ALL, (x,))
    assert bits_equal(a(x), b(x))


def test_prepare_a_prepared_module_again_is_harmless():
    model, x = MLP(), torch.randn(2, 64)
    once = mxfx.prepare(model, ALL, (x,))
    with pytest.warns(mxfx.MXFXWarning):
        twice = mxfx.prepare(once, ALL, (x,))  # already lowered: nothing left to match
    assert bits_equal(twice(x), once(x))


def test_other_batch_size_without_dynamic_shapes_is_explained():
    prepared = mxfx.prepare(MLP(), ALL, (torch.randn(4, 64),), dynamic_shapes=None)
    with pytest.raises(mxfx.InputGuardError, match="dynamic_shapes"):
        prepared(torch.randn(5, 64))


def test_not_a_module_and_bad_config_type():
    with pytest.raises(mxfx.MXTypeError, match="nn.Module"):
        mxfx.prepare(lambda x: x, ALL, (torch.randn(2),))
    with pytest.raises(mxfx.ConfigError):
        mxfx.prepare(MLP(), 3, (torch.randn(2, 64),))


def test_corrupted_pt2(tmp_path):
    prepared = mxfx.prepare(MLP(), ALL, (torch.randn(2, 64),))
    path = mxfx.save(prepared, tmp_path / "m.pt2")
    data = bytearray(path.read_bytes())
    data[len(data) // 3: len(data) // 3 + 4096] = b"\0" * 4096
    (tmp_path / "bad.pt2").write_bytes(bytes(data))
    with pytest.raises(mxfx.ArchiveError):
        mxfx.load(tmp_path / "bad.pt2")(torch.randn(2, 64))


# --- properties ------------------------------------------------------------------------------
@settings(max_examples=15, deadline=None)
@given(widths=st.lists(st.integers(1, 70), min_size=2, max_size=4), batch=st.integers(1, 5),
       fmt=st.sampled_from(FORMAT_NAMES), block=st.sampled_from([1, 8, 32, 48]), bias=st.booleans(),
       act=st.booleans())
def test_property_random_mlps_match_the_reference(widths, batch, fmt, block, bias, act):
    torch.manual_seed(sum(widths))
    layers = [torch.nn.Linear(a, b, bias=bias) for a, b in zip(widths, widths[1:])]
    model = torch.nn.Sequential(*layers)
    spec = MXSpec(fmt, block)
    cfg = QuantConfig((Rule(match=".*", weight=spec, activation=spec if act else None),))
    x = torch.randn(batch, widths[0])
    prepared = mxfx.prepare(model, cfg, (x,))  # every generated case is valid: no error is acceptable
    h = x
    for layer in layers:
        xin = mxfx.fake_quantize(h, fmt, block_size=block) if act else h
        h = torch.nn.functional.linear(xin, mxfx.fake_quantize(layer.weight, fmt, block_size=block), layer.bias)
    assert bits_equal(prepared(x), h)


def attention_by_hand(model, x, fmt, block):
    """CausalSelfAttention written out with mxfx.fake_quantize on each quantized operand: weights
    along in_features, Q and K along head_dim, P along the key axis, V along the sequence axis."""
    def fq(t, axis=-1):
        return mxfx.fake_quantize(t, fmt, block_size=block, axis=axis)

    B, T, C = x.shape
    qkv = torch.nn.functional.linear(x, fq(model.c_attn.weight), model.c_attn.bias)
    q, k, v = (t.view(B, T, model.n_head, C // model.n_head).transpose(1, 2) for t in qkv.split(C, dim=2))
    scores = (fq(q) @ fq(k).transpose(-2, -1)) * (1.0 / math.sqrt(C // model.n_head))
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf)
    y = fq(torch.softmax(scores, dim=-1)) @ fq(v, axis=-2)
    return torch.nn.functional.linear(y.transpose(1, 2).reshape(B, T, C), fq(model.c_proj.weight), model.c_proj.bias)


@settings(max_examples=10, deadline=None)
@given(seq=st.integers(2, 20), heads=st.sampled_from([1, 2, 4]), flash=st.booleans(), fmt=st.sampled_from(FORMAT_NAMES))
def test_property_random_attention_matches_the_reference(seq, heads, flash, fmt):
    torch.manual_seed(seq * 8 + heads)
    model, x = CausalSelfAttention(32, heads, flash), torch.randn(2, seq, 32)
    spec = MXSpec(fmt, 16)
    cfg = QuantConfig((Rule(match="", attention=AttentionSpec(spec, spec, spec, spec)), Rule(match=".*", weight=spec)))
    prepared = mxfx.prepare(model, cfg, (x,))
    assert [s.kind for s in prepared.mxfx_report.sites if s.quantized] == ["linear", "attention", "linear"]
    assert bits_equal(prepared(x), attention_by_hand(model, x, fmt, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", FORMAT_NAMES)
def test_fuzz_random_bit_patterns(dtype, fmt):
    """decode(encode(x)) over random bit patterns of every input dtype: the spec value, never an
    exception, NaN only in blocks holding NaN or Inf."""
    # zlib.crc32, not hash(): string hashes are salted per process, so a failure could not be replayed
    g = torch.Generator().manual_seed(zlib.crc32(f"{dtype}-{fmt}".encode()))
    bits = torch.randint(-(2**31), 2**31 - 1, (64, 64), generator=g, dtype=torch.int64)
    x = (bits.to(torch.int32) if dtype is torch.float32 else (bits & 0xFFFF).to(torch.int32).to(torch.int16)).view(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mxfx.MXFXWarning)
        got = mxfx.quantize(x, fmt).dequantize()
    blocks_finite = torch.isfinite(x.float()).reshape(64, 2, 32).all(-1, keepdim=True).expand(64, 2, 32).reshape(64, 64)
    assert not torch.isnan(got[blocks_finite]).any()
    assert torch.isnan(got[~blocks_finite]).all()
    want = reference_rows(x[:8], fmt, 32).to(dtype)
    nan = torch.isnan(want)
    assert torch.equal(got[:8][~nan], want[~nan])


def test_threads_prepare_concurrently_like_sequentially():
    torch.manual_seed(0)
    models = [MLP(), MLP(d=64, hidden=96), LoopOverList()]
    inputs = [torch.randn(3, 64), torch.randn(3, 64), torch.randn(3, 32)]
    configs = [ALL, "mxint8", "mxfp4_weight_only"]
    sequential = [mxfx.prepare(m, c, (x,))(x) for m, c, x in zip(models, configs, inputs)]
    results = [None] * 3

    def work(i):
        results[i] = mxfx.prepare(models[i], configs[i], (inputs[i],))(inputs[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(bits_equal(a, b) for a, b in zip(results, sequential))


def test_deliberate_errors_outside_the_numerics_are_mxfx_errors():
    from mxfx.analysis.metrics import MetricAccumulator
    from mxfx.cli import load_factory, parse_inputs

    with pytest.raises(mxfx.MXValueError, match="Site.kind"):
        mxfx.Site(fqn="a", kind="conv", form="linear", node="n")
    with pytest.raises(mxfx.MXValueError, match="Site.status"):
        mxfx.Site(fqn="a", kind="linear", form="linear", node="n", status="maybe")
    with pytest.raises(mxfx.MXValueError, match="unknown dtype"):
        parse_inputs("2x3:float99")
    with pytest.raises(mxfx.MXValueError, match="package.module:factory"):
        load_factory("no_colon_here")
    with pytest.raises(mxfx.MXValueError, match="shapes"):
        MetricAccumulator().add(torch.zeros(2, 3), torch.zeros(3, 2))
