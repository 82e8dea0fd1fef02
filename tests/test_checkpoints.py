"""mxfx.save_pretrained: checkpoints written by mxfx, loaded by the formats' own libraries in a fresh
process that never imports mxfx (compressed-tensors + transformers, gguf-py, transformers' GGUF
loader; Quark when amd-quark is importable by MXFX_QUARK_PYTHON or this interpreter).

The references are independent of the code under test: the loaders' own decoders, hand-written
expected values for planted blocks (ties, saturation, zeros), and llama.cpp's q/k permutation
written out below.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import mxfx
from mxfx.graph.weights import site_weights

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
HAS_CT = importlib.util.find_spec("compressed_tensors") is not None
HAS_GGUF = importlib.util.find_spec("gguf") is not None

# Block 0 of q_proj row 0: scale 1 (floor(log2 7) - 2 = 0). Ties between FP4 neighbours round to
# the even code (OCP MX v1.0 §6.3: RNE): 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2,
# 3.5 -> 4, 5 -> 4; 7 saturates to 6.
TIES = [0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0]
TIES_FP4 = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]


def _planted_llama():
    from mxfx.testing import zoo

    model, args, _ = zoo.llama()
    with torch.no_grad():
        w = model.model.layers[0].self_attn.q_proj.weight
        block = torch.tensor(TIES + [0.0] * 8 + [-t for t in TIES] + [0.0] * 8)
        w[0, :32] = block
        w[0, 32:64] = 0.0  # an all-zero block
        w[1, :32] = block * 2.0**-20  # the same ties far down the scale range
    return model, args


def _prepare(model, args, rules, calibration=None):
    """Prepare `model` (or an ExportedProgram of it, exported once: no re-tracing) with `rules`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mxfx.MXFXWarning)
        return mxfx.prepare(model, mxfx.QuantConfig(tuple(rules)), args, calibration=calibration)


@pytest.fixture(scope="module")
def tiny():
    """(model, example args, its ExportedProgram): the planted tiny Llama, exported once."""
    model, args = _planted_llama()
    return model, args, mxfx.export(model, args)


def _rule(match, fmt, **kw):
    return mxfx.Rule(match, weight=mxfx.MXSpec(fmt), **kw)


CONFIGS = {
    "mxfp4": [mxfx.Rule("lm_head", skip=True), _rule(".*", "fp4_e2m1")],
    "mxfp8": [_rule(".*", "fp8_e4m3")],  # the head too
    "mxfp6": [mxfx.Rule("lm_head", skip=True), _rule(".*", "fp6_e2m3")],
    "mixed": [_rule(r"model\.layers\.0\..*", "fp4_e2m1"), _rule(r".*(proj)", "fp8_e4m3")],  # lm_head: no rule
    # GPTQ with error-minimizing scales: the checkpoint must hold GPTQ's codes, not a re-quantization
    "gptq_mse": [mxfx.Rule("lm_head", skip=True),
                 mxfx.Rule(".*", weight=mxfx.MXSpec("fp4_e2m1", scale_mode="mse"), weight_rounding="gptq")],
}
CALIBRATION = [(torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(seed)),) for seed in (5, 6)]

LOADER = textwrap.dedent('''
    import json, sys, torch
    from pathlib import Path
    root = Path(sys.argv[1])
    jobs = json.loads((root / "jobs.json").read_text())
    ids = torch.load(root / "ids.pt")
    out = {}
    for name, kind in jobs.items():
        folder = root / name
        if kind == "compressed-tensors":
            from transformers import AutoModelForCausalLM, CompressedTensorsConfig
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                         quantization_config=CompressedTensorsConfig(dequantize=True))
        elif kind == "compressed-tensors-mixed":
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(folder)
            model.hf_quantizer.compressor.decompress_model(model)
            torch.nn.Module.float(model)
        elif kind == "quark":
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        else:
            from transformers import AutoModelForCausalLM
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file="model.gguf", dtype=torch.float32)
            from gguf import GGUFReader, dequantize
            reader = GGUFReader(folder / "model.gguf")
            out[name + ":gguf"] = {t.name: (int(t.tensor_type), torch.from_numpy(dequantize(t.data, t.tensor_type).copy()),
                                            torch.from_numpy(t.data.copy()))
                                   for t in reader.tensors}
            out[name + ":meta"] = {k: str(reader.fields[k].contents()) for k in ("llama.vocab_size", "llama.block_count")}
        model.eval()
        with torch.no_grad():
            logits = model(ids).logits
        state = {k: v for k, v in model.state_dict().items() if not k.endswith(("weight_scale", "weight_packed"))}
        out[name] = {"logits": logits, "state": state}
    assert not any(m == "mxfx" or m.startswith("mxfx.") for m in sys.modules), "the loader imported mxfx"
    torch.save(out, root / "loaded.pt")
''')


def _load_elsewhere(root: Path, jobs: dict, python: str = sys.executable) -> dict:
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "loader.py").write_text(LOADER)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    result = subprocess.run([python, str(root / "loader.py"), str(root)], capture_output=True, text=True, env=env,
                            timeout=900, cwd=root)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(root / "loaded.pt")


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny):
    """Write every checkpoint once, load them all in one fresh process."""
    root = tmp_path_factory.mktemp("checkpoints")
    model, args, program = tiny
    torch.save(args[0], root / "ids.pt")
    jobs, refs = {}, {}
    for name, rules in CONFIGS.items():
        if name == "mxfp6" and HAS_CT:
            from compressed_tensors.config import CompressionFormat
            if "mxfp6-pack-quantized" not in {f.value for f in CompressionFormat}:
                continue
        prepared = _prepare(program, args, rules, CALIBRATION if name == "gptq_mse" else None)
        mxfx.save_pretrained(prepared, root / name, format="compressed-tensors", model=model)
        jobs[name] = "compressed-tensors-mixed" if name == "mixed" else "compressed-tensors"
        refs[name] = prepared
    if HAS_GGUF:
        mxfx.save_pretrained(refs["mxfp4"], root / "gguf", format="gguf", model=model)
        jobs["gguf"] = "gguf"
        refs["gguf"] = refs["mxfp4"]
    # Tied embeddings with a quantized head: the checkpoint unties them (the embedding stays dense).
    from mxfx.testing.zoo import _DECODER, _text

    tied, tied_args, _ = _text("LlamaConfig", "LlamaForCausalLM", "eager", mask=False,
                               **(_DECODER | {"tie_word_embeddings": True}))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    refs["tied"] = _prepare(tied, tied_args, [_rule(".*", "fp8_e4m3")])
    mxfx.save_pretrained(refs["tied"], root / "tied", format="compressed-tensors", model=tied)
    jobs["tied"] = "compressed-tensors"
    refs["tied_model"] = tied
    if not HAS_CT:
        jobs = {k: v for k, v in jobs.items() if v == "gguf"}
    loaded = _load_elsewhere(root, jobs) if jobs else {}
    return model, args, refs, loaded, root


def _weights(prepared) -> dict[str, torch.Tensor]:
    return {f"{e.site.fqn}.weight": e.data.dequantize(torch.float32) for e in site_weights(prepared)}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return (t.float() + 0.0).view(torch.int32)  # + 0.0: -0 and +0 compare equal (gguf-py decodes -0 as +0)


def _check_loaded(model, prepared, loaded):
    quantized = _weights(prepared)
    state = loaded["state"]
    for name, tensor in model.state_dict().items():
        got = state[name]
        want = quantized.get(name, tensor.detach())
        assert got.shape == want.shape, name
        assert torch.equal(_bits(got), _bits(want)), f"{name} differs"
    ref = prepared(*model_args(prepared)).logits
    err = (loaded["logits"] - ref).abs().max() / ref.abs().max()
    assert err <= 1e-5, f"logits differ by {err:.2e} relative"


def model_args(prepared):
    return prepared.mxfx_export_args[0]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed")
@pytest.mark.parametrize("name", ["mxfp4", "mxfp8", "mxfp6", "mixed", "gptq_mse"])
def test_compressed_tensors_loads_bit_exact(exported, name):
    model, args, refs, loaded, root = exported
    if name not in loaded:
        pytest.skip(f"the installed compressed-tensors has no layout for {name}")
    _check_loaded(model, refs[name], loaded[name])
    config = json.loads((root / name / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["quantization_status"] == "compressed"
    groups = list(config["config_groups"].values())
    if name == "mixed":
        assert config["format"] == "mixed-precision"
        assert sorted(g["format"] for g in groups) == ["mxfp4-pack-quantized", "mxfp8-quantized"]
        assert all(t.startswith("re:") for g in groups for t in g["targets"])
        assert config["ignore"] == ["lm_head"]
    else:
        assert len(groups) == 1 and groups[0]["targets"] == ["Linear"]
        assert config["ignore"] == ([] if name == "mxfp8" else ["lm_head"])
    if name == "gptq_mse":  # GPTQ moved codes away from round-to-nearest with the same scale rule
        w = model.model.layers[1].mlp.down_proj.weight.detach()
        nearest = mxfx.quantize(w, "fp4_e2m1", scale_mode="mse").dequantize(torch.float32)
        assert not torch.equal(loaded[name]["state"]["model.layers.1.mlp.down_proj.weight"], nearest)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed")
def test_quantized_tied_head_is_untied(exported):
    model, args, refs, loaded, root = exported
    tied = refs["tied_model"]
    state = loaded["tied"]["state"]
    assert torch.equal(state["model.embed_tokens.weight"], tied.model.embed_tokens.weight.detach())
    assert torch.equal(_bits(state["lm_head.weight"]), _bits(_weights(refs["tied"])["lm_head.weight"]))
    assert json.loads((root / "tied" / "config.json").read_text())["tie_word_embeddings"] is False
    ref = refs["tied"](*model_args(refs["tied"])).logits
    assert (loaded["tied"]["logits"] - ref).abs().max() <= 1e-5 * ref.abs().max()


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CT, reason="compressed-tensors is not installed")
def test_planted_ties_saturation_and_zeros(exported):
    model, args, refs, loaded, root = exported
    w = loaded["mxfp4"]["state"]["model.layers.0.self_attn.q_proj.weight"]
    expected = torch.tensor(TIES_FP4 + [0.0] * 8 + [-t for t in TIES_FP4] + [0.0] * 8)
    assert torch.equal(w[0, :32], expected)
    assert torch.equal(w[0, 32:64], torch.zeros(32))
    assert torch.equal(w[1, :32], expected * 2.0**-20)
    from safetensors.torch import load_file

    tensors = load_file(root / "mxfp4" / "model.safetensors")
    scales = tensors["model.layers.0.self_attn.q_proj.weight_scale"]
    assert scales.dtype == torch.uint8 and scales[0, 0] == 127 and scales[1, 0] == 127 - 20
    assert scales[0, 1] == 0  # an all-zero block: floor(log2 0) clamps to the smallest scale, 2^-127
    packed = tensors["model.layers.0.self_attn.q_proj.weight_packed"]
    assert packed.shape == (64, 32) and packed[0, 0] == 0x20 and packed[0, 3] == (0x7 << 4 | 0x6)  # (0, 1.0), (4.0, 6.0)


def _llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # convert_hf_to_gguf.py: weights.reshape(n_head, 2, rows // n_head // 2, *rest).swapaxes(1, 2)
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GGUF, reason="gguf is not installed")
def test_gguf_mxfp4_reader_and_transformers(exported):
    model, args, refs, loaded, root = exported
    _check_loaded(model, refs["gguf"], loaded["gguf"])  # transformers' GGUF loader (un-permutes q/k)
    tensors = loaded["gguf:gguf"]
    assert loaded["gguf:meta"]["llama.vocab_size"] == str(model.config.vocab_size)
    weights = _weights(refs["gguf"])
    heads = {"attn_q": model.config.num_attention_heads, "attn_k": model.config.num_key_value_heads}
    for layer in range(model.config.num_hidden_layers):
        for hf, gg in (("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                       ("mlp.down_proj", "ffn_down")):
            kind, values, raw = tensors[f"blk.{layer}.{gg}.weight"]
            assert kind == 39  # GGML_TYPE_MXFP4
            want = weights[f"model.layers.{layer}.{hf}.weight"]
            if gg in heads:
                want = _llama_permute(want, heads[gg])
            assert torch.equal(_bits(values), _bits(want)), f"blk.{layer}.{gg}"
    assert tensors["output.weight"][0] == 0  # lm_head skipped: F32, as in the model
    assert torch.equal(tensors["output.weight"][1], model.lm_head.weight.detach())
    # Block layout: the E8M0 byte, then byte j = element j | element j + 16 << 4 (q_proj row 0 is
    # permuted to row 0: head 0, pair 0, half 0).
    raw = tensors["blk.0.attn_q.weight"][2].reshape(-1)
    assert raw[0] == 127 and raw[1 + 1] == (0xA << 4 | 0x2)  # element 1: 0.75 -> 1.0 (2), element 17: -0.75 -> -1.0 (0xA)


QUARK_PYTHON = os.environ.get("MXFX_QUARK_PYTHON") or (sys.executable if importlib.util.find_spec("quark") else None)


@pytest.mark.slow
@pytest.mark.skipif(QUARK_PYTHON is None, reason="amd-quark is not installed (set MXFX_QUARK_PYTHON to a python that has it)")
def test_quark_loads_bit_exact(tmp_path, tiny):
    model, args, program = tiny
    torch.save(args[0], tmp_path / "ids.pt")
    fp4_even = mxfx.MXSpec("fp4_e2m1", scale_mode="even")
    refs = {"q_mixed": [mxfx.Rule("lm_head", skip=True), _rule(r"model\.layers\.0\..*", "fp6_e3m2"),
                        _rule(r"model\.layers\.1\.mlp\..*", "fp6_e2m3"), _rule(".*", "fp4_e2m1")],
            # W4A4 with the "even" activation rule: Quark's emulation quantizes the inputs itself
            "q_w4a4": [mxfx.Rule("lm_head", skip=True),
                       mxfx.Rule(".*", weight=mxfx.MXSpec("fp4_e2m1"), activation=fp4_even)]}
    prepared = {}
    for name, rules in refs.items():
        prepared[name] = _prepare(program, args, rules)
        mxfx.save_pretrained(prepared[name], tmp_path / name, format="quark", model=model)
    loaded = _load_elsewhere(tmp_path, {name: "quark" for name in refs}, QUARK_PYTHON)
    for name in refs:
        # Quark keeps codes in QParamsLinear; compare what the model computes.
        ref = prepared[name](*args).logits
        assert (loaded[name]["logits"] - ref).abs().max() <= 1e-5 * ref.abs().max()


# --- refusals ---------------------------------------------------------------------------------

def test_rotated_site_is_refused_by_name(tiny, tmp_path):
    model, args, program = tiny
    prepared = _prepare(program, args, [_rule(r"model\.layers\.0\.mlp\.up_proj", "fp4_e2m1", rotation="hadamard"),
                                      _rule(r"model\.layers\..*", "fp4_e2m1")])
    for fmt in ("compressed-tensors", "quark", "gguf"):
        with pytest.raises(mxfx.CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj .*Hadamard-rotated"):
            mxfx.save_pretrained(prepared, tmp_path / fmt, format=fmt, model=model)
    assert not (tmp_path / "compressed-tensors").exists()


def test_activation_rules_written_or_refused(tiny, tmp_path):
    model, args, program = tiny
    fp4_even = mxfx.MXSpec("fp4_e2m1", scale_mode="even")
    prepared = _prepare(program, args, [mxfx.Rule("lm_head", skip=True),
                                      mxfx.Rule(".*", weight=mxfx.MXSpec("fp4_e2m1"), activation=fp4_even)])
    mxfx.save_pretrained(prepared, tmp_path / "ct", format="compressed-tensors", model=model)
    group = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]["config_groups"]["group_0"]
    assert group["input_activations"] == {"num_bits": 4, "type": "float", "symmetric": True, "group_size": 32,
                                          "strategy": "group", "dynamic": True, "scale_dtype": "torch.uint8"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", mxfx.MXFXWarning)
        preset = mxfx.prepare(program, "parity_vllm_mxfp4")
    mxfx.save_pretrained(preset, tmp_path / "preset", format="compressed-tensors", model=model)
    preset_group = json.loads((tmp_path / "preset" / "config.json").read_text())["quantization_config"]["config_groups"]
    assert preset_group["group_0"]["input_activations"] == group["input_activations"]
    mxfx.save_pretrained(prepared, tmp_path / "quark", format="quark", model=model)
    quark = json.loads((tmp_path / "quark" / "config.json").read_text())["quantization_config"]
    assert quark["global_quant_config"]["input_tensors"]["scale_calculation_mode"] == "even"
    with pytest.raises(mxfx.CheckpointError, match=r"q_proj quantizes its input .*Q8_0"):
        mxfx.save_pretrained(prepared, tmp_path / "gguf", format="gguf", model=model)
    floor_fp8 = _prepare(program, args, [mxfx.Rule(r"model\.layers\.0\.mlp\.down_proj", weight=mxfx.MXSpec("fp4_e2m1"),
                                                 activation=mxfx.MXSpec("fp8_e4m3"))])
    with pytest.raises(mxfx.CheckpointError, match=r"down_proj quantizes its input as fp8_e4m3/b32: compressed-tensors"):
        mxfx.save_pretrained(floor_fp8, tmp_path / "ct2", format="compressed-tensors", model=model)
    mse = _prepare(program, args, [mxfx.Rule(r".*down_proj", weight=mxfx.MXSpec("fp4_e2m1"),
                                           activation=mxfx.MXSpec("fp4_e2m1", scale_mode="mse"))])
    with pytest.raises(mxfx.CheckpointError, match="Quark quantizes inputs"):
        mxfx.save_pretrained(mse, tmp_path / "q2", format="quark", model=model)


def test_formats_a_target_cannot_store_are_refused(tiny, tmp_path):
    model, args, program = tiny
    e3m2 = _prepare(program, args, [_rule(r".*k_proj", "fp6_e3m2")])
    with pytest.raises(mxfx.CheckpointError, match=r"k_proj stores fp6_e3m2 .*format='quark'"):
        mxfx.save_pretrained(e3m2, tmp_path / "a", format="compressed-tensors", model=model)
    fp8 = _prepare(program, args, [_rule(r".*q_proj", "fp8_e4m3")])
    with pytest.raises(mxfx.CheckpointError, match=r"q_proj stores fp8_e4m3 weights: Quark .*per-group FP8"):
        mxfx.save_pretrained(fp8, tmp_path / "e", format="quark", model=model)
    with pytest.raises(mxfx.CheckpointError, match="GGUF has an MX type for fp4_e2m1 only"):
        mxfx.save_pretrained(e3m2, tmp_path / "b", format="gguf", model=model)
    simulated = _prepare(program, args, [_rule(r".*v_proj", "fp4_e2m1", weight_storage="simulated")])
    with pytest.raises(mxfx.CheckpointError, match=r"v_proj .*simulated"):
        mxfx.save_pretrained(simulated, tmp_path / "c", format="compressed-tensors", model=model)
    block16 = _prepare(program, args, [mxfx.Rule(r".*o_proj", weight=mxfx.MXSpec("fp4_e2m1", block_size=16))])
    with pytest.raises(mxfx.CheckpointError, match="blocks of 16"):
        mxfx.save_pretrained(block16, tmp_path / "d", format="quark", model=model)


def test_models_that_are_not_hugging_face_are_refused(tiny, tmp_path):
    from mxfx.testing.models import MLP

    model, args, program = tiny
    prepared = _prepare(program, args, CONFIGS["mxfp4"])
    with pytest.raises(mxfx.CheckpointError, match="model=None"):
        mxfx.save_pretrained(prepared, tmp_path / "a", format="compressed-tensors")
    mlp = MLP()
    mlp_prepared = _prepare(mlp, (torch.randn(2, 64),), [_rule(".*", "fp4_e2m1")])
    with pytest.raises(mxfx.CheckpointError, match="Hugging Face checkpoints.*got MLP"):
        mxfx.save_pretrained(mlp_prepared, tmp_path / "b", format="compressed-tensors", model=mlp)
    with pytest.raises(mxfx.CheckpointError, match="from mxfx.prepare"):
        mxfx.save_pretrained(model, tmp_path / "c", format="compressed-tensors", model=model)
    with pytest.raises(mxfx.CheckpointError, match="unknown checkpoint format"):
        mxfx.save_pretrained(prepared, tmp_path / "d", format="onnx", model=model)


def test_gguf_refuses_other_architectures(tmp_path):
    pytest.importorskip("gguf")
    from mxfx.testing import zoo

    model, args, _ = zoo.qwen2()
    prepared = _prepare(model, args, [_rule(r".*mlp.*", "fp4_e2m1")])
    with pytest.raises(mxfx.CheckpointError, match="llama-family.*qwen2"):
        mxfx.save_pretrained(prepared, tmp_path / "q", format="gguf", model=model)


def test_cli_checkpoint_verb(tmp_path, monkeypatch):
    from mxfx import cli

    (tmp_path / "tiny_factory.py").write_text(textwrap.dedent("""
        from mxfx.testing import zoo
        def build():
            model, args, _ = zoo.llama()
            return model, args
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = cli.main(["checkpoint", "tiny_factory:build", "--config", "mxfp4_weight_only", "--format",
                     "compressed-tensors", "--out", str(tmp_path / "out")])
    assert code == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "mxfp4-pack-quantized"
