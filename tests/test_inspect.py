"""summary tables, graph_text, draw, save/load (.pt2, fresh process), and the mxfx CLI."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import bits_equal

import mxfx
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.testing.models import MLP, NanoGPT

E4M3 = MXSpec("fp8_e4m3")


def prepared_gpt():
    torch.manual_seed(0)
    model, idx = NanoGPT(n_layer=2, flash=True), torch.randint(0, 256, (2, 16))
    cfg = QuantConfig((
        Rule(match="lm_head", skip=True),
        Rule(match=r".*\.attn", attention=AttentionSpec(E4M3, E4M3, E4M3, E4M3)),
        Rule(match=".*", weight=MXSpec("fp4_e2m1"), activation=E4M3),
    ))
    return model, idx, mxfx.prepare(model, cfg, (idx,))


def test_summary_rows_totals_and_formats():
    _, _, prepared = prepared_gpt()
    s = mxfx.summary(prepared)
    linear = [r for r in s.rows if r["kind"] == "linear" and r["storage"] == "packed"]
    assert len(linear) == 8 and all(r["weight"] == "fp4_e2m1/32" and r["activation"] == "fp8_e4m3/32" for r in linear)
    assert all(r["bits_per_weight"] == 4.25 for r in linear)
    attention = [r for r in s.rows if r["kind"] == "attention (sdpa)"]
    assert [r["site"] for r in attention] == ["transformer.h.0.attn", "transformer.h.1.attn"]
    assert [r["site"] for r in s.rows if r["weight"] == "high precision"] == ["lm_head"]
    assert s.totals["quantized sites"] == 10 and s.totals["skipped sites"] == 1
    assert s.totals["model bytes after"] < s.totals["model bytes before"]
    assert "transformer.h.1.mlp.c_proj" in s.table() and s.to_markdown().startswith("| site")
    assert s.to_csv().splitlines()[0].startswith("site,kind,rule")
    assert json.loads(s.to_json())["totals"]["quantized sites"] == 10
    assert linear[0]["rule"] == "rule 2 ('.*')"


class DropoutCastAttention(torch.nn.Module):
    """Explicit attention with a dropout and a cast between the softmax and P @ V."""

    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.1)

    def forward(self, q, k, v):
        att = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        return self.drop(att).to(v.dtype) @ v


class Wrapped(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = DropoutCastAttention()

    def forward(self, q, k, v):
        return self.attn(q, k, v)


def attention_config():
    return QuantConfig((Rule(match=".*attn", attention=AttentionSpec(E4M3, E4M3, E4M3, E4M3)),))


def test_explicit_attention_rows_are_labelled_qk_and_pv_from_the_site():
    torch.manual_seed(0)
    model, idx = NanoGPT(n_layer=2, flash=False), torch.randint(0, 256, (2, 16))
    rows = mxfx.summary(mxfx.prepare(model, attention_config(), (idx,))).rows
    attention = [(r["site"], r["kind"], r["rule"]) for r in rows if r["kind"] in ("QK^T", "PV")]
    assert attention == [(f"transformer.h.{i}.attn", half, "rule 0 ('.*attn')") for i in range(2) for half in ("QK^T", "PV")]
    q = torch.randn(1, 2, 8, 32)
    prepared = mxfx.prepare(Wrapped(), attention_config(), (q, q, q))
    summary = mxfx.summary(prepared)
    assert [r["kind"] for r in summary.rows] == ["QK^T", "PV"]
    assert summary.totals["quantized sites"] == 1


def test_graph_text_is_small_and_annotated():
    _, _, prepared = prepared_gpt()
    text = mxfx.graph_text(prepared)
    assert text.count("# MX @") == 10
    assert "weight fp4_e2m1/32 (packed), activation fp8_e4m3/32" in text
    assert "Q fp8_e4m3/32, K fp8_e4m3/32, V fp8_e4m3/32, P fp8_e4m3/32" in text
    assert len(text.splitlines()) < 80 and "= self." not in text


def test_save_load_same_process_and_bad_files(tmp_path):
    model, idx, prepared = prepared_gpt()
    path = mxfx.save(prepared, tmp_path / "gpt.pt2")
    loaded = mxfx.load(path)
    assert bits_equal(loaded(idx), prepared(idx))
    assert sum(1 for n in loaded.graph.nodes if n.target is torch.ops.mxfx.linear.default) == 8
    assert [r["site"] for r in mxfx.summary(loaded).rows] == [r["site"] for r in mxfx.summary(prepared).rows]
    (tmp_path / "text.pt2").write_text("not an archive")
    with pytest.raises(mxfx.ArchiveError, match="not a torch.export .pt2 archive"):
        mxfx.load(tmp_path / "text.pt2")
    data = path.read_bytes()
    (tmp_path / "cut.pt2").write_bytes(data[: len(data) // 2])
    with pytest.raises(mxfx.ArchiveError):
        mxfx.load(tmp_path / "cut.pt2")
    with pytest.raises(mxfx.ArchiveError, match="no such file"):
        mxfx.load(tmp_path / "missing.pt2")


def test_load_in_a_fresh_process_is_bitwise_equal(tmp_path):
    _, idx, prepared = prepared_gpt()
    mxfx.save(prepared, tmp_path / "gpt.pt2")
    torch.save({"idx": idx, "out": prepared(idx)}, tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch, mxfx
        module = mxfx.load({str(tmp_path / 'gpt.pt2')!r})
        data = torch.load({str(tmp_path / 'io.pt')!r})
        out = module(data["idx"])
        assert torch.equal(out.view(torch.int32), data["out"].view(torch.int32))
        print("OK")
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("OK"), result.stderr[-2000:]


def test_draw_dot_highlights_exactly_the_mxfx_ops(tmp_path):
    pydot = pytest.importorskip("pydot")  # in the test extra: skipped only outside it
    _, _, prepared = prepared_gpt()
    path = mxfx.draw(prepared, tmp_path / "g.dot")
    graph = pydot.graph_from_dot_data(path.read_text())[0]
    orange = {n.get_name().strip('"') for n in graph.get_nodes() if n.get("fillcolor") == "orange"}
    mx_ops = {n.name for n in prepared.graph.nodes if str(n.target).startswith("mxfx.")}
    assert len(mx_ops) == 10 and orange == mx_ops  # 8 linears, 2 attentions
    with pytest.raises(mxfx.MXValueError, match=r"\.dot, \.svg or \.png"):
        mxfx.draw(prepared, tmp_path / "g.jpg")


@pytest.mark.skipif(__import__("shutil").which("dot") is None, reason="Graphviz's dot program is not installed")
def test_draw_svg(tmp_path):
    pytest.importorskip("pydot")
    _, _, prepared = prepared_gpt()
    text = mxfx.draw(prepared, tmp_path / "g.svg").read_text()
    assert text.lstrip().startswith(("<?xml", "<svg")) and "mxfx.linear" in text


def test_draw_names_what_is_missing(tmp_path, monkeypatch):
    _, _, prepared = prepared_gpt()
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(mxfx.MissingDependencyError, match="apt-get install graphviz") as error:
        mxfx.draw(prepared, tmp_path / "g.svg")
    assert isinstance(error.value, ImportError)
    monkeypatch.setitem(sys.modules, "pydot", None)  # import pydot raises ImportError
    with pytest.raises(mxfx.MissingDependencyError, match="pip install"):
        mxfx.draw(prepared, tmp_path / "g.dot")


def run_cli(*args, cwd=None):
    env = {**os.environ, "PYTHONPATH": os.path.dirname(__file__)}
    return subprocess.run([sys.executable, "-m", "mxfx", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


@pytest.mark.slow
def test_cli_formats_quantize_inspect_and_exit_codes(tmp_path):
    result = run_cli("formats")
    assert result.returncode == 0 and "fp6_e2m3" in result.stdout
    (tmp_path / "cli_models.py").write_text(textwrap.dedent("""
        import torch
        from mxfx.testing.models import MLP
        def mlp():
            return MLP(), (torch.randn(4, 64),)
        def bare():
            return MLP()
    """))
    out = tmp_path / "mlp.pt2"
    result = run_cli("quantize", "cli_models:mlp", "--config", "mxint8", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "net.4" in result.stdout and "exporting and quantizing" in result.stderr
    result = run_cli("quantize", "cli_models:bare", "--config", "mxfp8", "--inputs", "3x64", "--out", str(tmp_path / "b.pt2"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    result = run_cli("inspect", str(out), "--graph", "--format", "json")
    assert result.returncode == 0 and '"quantized sites": 3' in result.stdout and "# MX @ net.0" in result.stdout
    assert '"status": "quantized"' in result.stdout and '"unsupported sites": 0' in result.stdout
    result = run_cli("quantize", "cli_models:mlp", "--config", "no_such_preset", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 1 and "ConfigError" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()[-1]) < 400
    result = run_cli("inspect", str(tmp_path / "cli_models.py"))
    assert result.returncode == 1 and "ArchiveError" in result.stderr
    assert run_cli("quantize").returncode == 2
    assert run_cli("nonsense").returncode == 2


def test_summary_rejects_non_graph_modules():
    with pytest.raises(mxfx.MXTypeError):
        mxfx.summary(MLP())
