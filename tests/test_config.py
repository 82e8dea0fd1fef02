"""Configs: TOML parsing, presets, first-matching-rule semantics, and error messages."""

import pytest

import mxfx
from mxfx.graph.config import MXSpec, QuantConfig, Rule, config_from_dict, load_config


def write(tmp_path, text: str):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    return path


def test_toml_example_from_the_issue(tmp_path):
    cfg = load_config(write(tmp_path, """
[defaults]
scale_mode = "rceil"

[[rule]]
match = 'lm_head'
skip = true

[[rule]]
match = '.*'
weight = "fp6_e3m2"
activation = { format = "mxfp8_e4m3", block_size = 16 }
weight_storage = "simulated"
"""))
    assert cfg.rules[0].skip and not cfg.rules[0].quantizes_linear
    rule = cfg.rules[1]
    assert rule.weight == MXSpec("fp6_e3m2", 32, "rceil") and rule.activation == MXSpec("fp8_e4m3", 16, "rceil")
    assert rule.weight_storage == "simulated"
    assert cfg.first_match("lm_head")[0] == 0 and cfg.first_match("lm_head.x")[0] == 1  # fullmatch
    assert cfg.first_match("blocks.0.mlp")[0] == 1


def test_first_matching_rule_wins():
    cfg = QuantConfig((Rule(match="a.*", weight=MXSpec("int8")), Rule(match="ab", weight=MXSpec("fp4_e2m1"))))
    assert cfg.first_match("ab")[1].weight.format == "int8"
    assert cfg.first_match("b") is None


def test_attention_specs(tmp_path):
    cfg = load_config(write(tmp_path, """
[[rule]]
match = 'h\\.\\d+\\.attn'
attention = { query = "fp8_e4m3", key = "e4m3", probs = { format = "int8", block_size = 16 } }
"""))
    attention = cfg.rules[0].attention
    assert attention.query.format == "fp8_e4m3" and attention.value is None and attention.probs.block_size == 16
    assert cfg.rules[0].quantizes_attention and not cfg.rules[0].quantizes_linear


@pytest.mark.parametrize(
    "text,message",
    [
        ("[[rule]]\nmatch = '.*'\nwieght = 'fp8'\n", r"rule 0 \('\.\*'\) in .*cfg.toml: unknown key 'wieght'"),
        ("[[rule]]\nmatch = '(unclosed'\nweight = 'fp8'\n", r"rule 0 \('\(unclosed'\).*bad regex"),
        ("[[rule]]\nmatch = '.*'\nweight = 'fp7'\n", r"rule 0.*weight.*unknown MX element format 'fp7'"),
        ("[[rule]]\nmatch = '.*'\nweight = { format = 'fp8', block_size = 0 }\n", "block_size must be a positive integer"),
        ("[[rule]]\nmatch = '.*'\nweight = { format = 'fp8', block_size = -32 }\n", "block_size must be a positive integer"),
        ("[[rule]]\nmatch = '.*'\nweight = { format = 'fp8', block_size = '32' }\n", "block_size must be a positive integer"),
        ("[[rule]]\nmatch = '.*'\nweight = { format = 'fp8', rounding = 'up' }\n", "unknown rounding 'up'"),
        ("[[rule]]\nmatch = '.*'\nweight = { format = 'fp8', colour = 'red' }\n", "unknown key 'colour'"),
        ("[[rule]]\nmatch = '.*'\nweight = 8\n", "a spec is a format name or a table"),
        ("[[rule]]\nmatch = '.*'\nskip = 'yes'\n", "'skip' must be true or false"),
        ("[[rule]]\nmatch = '.*'\nweight_storage = 'zip'\n", "weight_storage must be one of packed, simulated"),
        ("[[rule]]\nmatch = '.*'\nweight = { format = 'fp8', scale_mode = 'mean' }\n", "unknown scale_mode 'mean'"),
        ("[[rule]]\nmatch = '.*'\nweight = 'fp8'\nrotation = 'haar'\n", "unknown rotation 'haar'"),
        ("[[rule]]\nmatch = '.*'\nweight = { format = 'fp8', block_size = 48 }\nrotation = 'hadamard'\n", "power-of-two"),
        ("[[rule]]\nmatch = '.*'\nweight = 'fp8'\nrotation = 'hadamard'\nrotation_size = -1\n", "rotation_size must be"),
        ("[[rule]]\nmatch = '.*'\nactivation = 'fp8'\nweight_rounding = 'gptq'\n", "'gptq' needs a weight spec"),
        ("[[rule]]\nmatch = '.*'\nweight = 'fp8'\nweight_rounding = 'round'\n", "weight_rounding must be one of"),
        ("[[rule]]\nweight = 'fp8'\n", "missing 'match'"),
        ("[[rule]]\nmatch = 3\n", "'match' must be a regex string"),
        ("[[rule]]\nmatch = '.*'\nattention = { qurey = 'fp8' }\n", "unknown key 'qurey' in attention"),
        ("[defaults]\nformat = 'fp8'\n[[rule]]\nmatch = '.*'\n", r"unknown key 'format' in \[defaults\]"),
        ("[rules]\nmatch = '.*'\n", "unknown top-level key 'rules'"),
        ("[defaults]\nblock_size = 32\n", r"no \[\[rule\]\] tables"),
        ("", "is empty"),
        ("[[rule]\nmatch = ", "not valid TOML"),
    ],
)
def test_config_errors_name_the_problem(tmp_path, text, message):
    with pytest.raises(mxfx.ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_missing_file_lists_presets():
    with pytest.raises(mxfx.ConfigError, match="presets: llm_mxfp8, mxfp4_weight_only"):
        load_config("no_such_preset")
    with pytest.raises(mxfx.ConfigError, match="QuantConfig, a preset name or a TOML path"):
        load_config(42)


def test_presets_are_package_data():
    assert set(mxfx.preset_names()) >= {"mxfp8", "mxfp6_weights_mxfp8_activations", "mxfp4_weight_only", "mxint8", "llm_mxfp8"}
    for name in mxfx.preset_names():
        assert load_config(name).rules


def test_python_api_validates():
    with pytest.raises(mxfx.FormatError):
        MXSpec("fp9")
    with pytest.raises(mxfx.ConfigError, match="bad regex"):
        Rule(match="[")
    with pytest.raises(mxfx.ConfigError, match="mxfx.Rule"):
        QuantConfig(("not a rule",))
    assert config_from_dict({"rule": [{"match": ".*", "weight": "mxfp4"}]}).rules[0].weight.format == "fp4_e2m1"


def test_recovery_keys(tmp_path):
    config = load_config(write(tmp_path, """
[[rule]]
match = '.*'
weight = { format = 'fp4', scale_mode = 'mse' }
activation = { format = 'fp8', block_size = 16 }
rotation = 'hadamard'
rotation_size = 64
weight_rounding = 'gptq'
attention = { query = 'fp8', key = 'fp8', rotation = 'hadamard' }
"""))
    rule = config.rules[0]
    assert (rule.weight.scale_mode, rule.rotation, rule.rotation_block, rule.weight_rounding) == ("mse", "hadamard", 64, "gptq")
    assert (rule.attention_rotation, rule.attention_rotation_block) == ("hadamard", 32)
    with pytest.raises(mxfx.ConfigError, match="block sizes differ"):
        Rule(".*", weight=MXSpec("fp4"), activation=MXSpec("fp8", 16), rotation="hadamard")
    assert Rule(".*", weight=MXSpec("fp4")).rotation_block == 0
