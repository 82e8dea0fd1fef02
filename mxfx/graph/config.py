"""Quantization configs: frozen dataclasses, TOML presets, and first-matching-rule semantics.

A config is an ordered list of rules. Each rule's regex is matched with `re.fullmatch` against
the fully qualified name of a site (a linear layer, or an attention module); the first rule that
matches decides the site; a site no rule matches stays in high precision. A TOML file:

    [defaults]                 # optional: defaults for every spec and rule below
    block_size = 32

    [[rule]]
    match = 'lm_head'
    skip = true

    [[rule]]
    match = '.*'
    weight = "fp6_e3m2"
    activation = { format = "fp8_e4m3", block_size = 32 }
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from mxfx.errors import ConfigError, MXFXError
from mxfx.numerics.spec import MXSpec

WEIGHT_STORAGES = ("packed", "simulated")
ATTENTION_OPERANDS = ("query", "key", "value", "probs")
ROTATIONS = ("hadamard",)  # "" (the default) rotates nothing
WEIGHT_ROUNDINGS = ("nearest", "gptq")


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check_rotation(rotation: str, where: str) -> None:
    if rotation not in ("", *ROTATIONS):
        raise ConfigError(f"{where}: unknown rotation {rotation!r}; valid: {', '.join(ROTATIONS)} (or none)")


@dataclasses.dataclass(frozen=True)
class AttentionSpec:
    """MX specs for the operands of an attention site's two matmuls; None keeps one in high precision."""

    query: MXSpec | None = None  # Q in Q @ K^T, blocked along head_dim
    key: MXSpec | None = None  # K in Q @ K^T, blocked along head_dim
    value: MXSpec | None = None  # V in P @ V, blocked along the sequence axis
    probs: MXSpec | None = None  # softmax output P in P @ V, blocked along the key axis

    def is_empty(self) -> bool:
        return all(getattr(self, name) is None for name in ATTENTION_OPERANDS)


@dataclasses.dataclass(frozen=True)
class Rule:
    """One config rule: sites whose FQN fully matches `match` get these specs."""

    match: str  # regex, matched with re.fullmatch against the site's fully qualified name
    weight: MXSpec | None = None  # linear weights, blocked along in_features
    activation: MXSpec | None = None  # linear inputs, blocked along in_features
    attention: AttentionSpec | None = None  # attention sites
    skip: bool = False  # matched sites stay in high precision
    weight_storage: str = "packed"  # "packed": keep codes + scales only; "simulated": fake-quantized fp weights
    rotation: str = ""  # "hadamard": rotate input and weight blocks along in_features (online / offline)
    rotation_size: int = 0  # elements per Hadamard block; 0: the rule's MX block size
    weight_rounding: str = "nearest"  # "gptq": GPTQ error feedback (needs calibration= in prepare)
    # "hadamard": rotate Q and K of attention sites along head_dim (blocks of Q's MX block size).
    # A rule field rather than an AttentionSpec one: Site records keep AttentionSpec operand-only.
    # In TOML it is the key `rotation` of the rule's attention table.
    attention_rotation: str = ""
    name: str = ""  # for messages, e.g. "rule 2 in configs/llm.toml"

    def __post_init__(self) -> None:
        where = self.name or f"rule {self.match!r}"
        if not isinstance(self.match, str):
            raise ConfigError(f"{where}: 'match' must be a regex string, got {self.match!r}")
        try:
            object.__setattr__(self, "_pattern", re.compile(self.match))
        except re.error as error:
            raise ConfigError(f"{where}: bad regex {self.match!r}: {error}") from None
        if self.weight_storage not in WEIGHT_STORAGES:
            raise ConfigError(f"{where}: weight_storage must be one of {', '.join(WEIGHT_STORAGES)}, got {self.weight_storage!r}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ConfigError(f"{where}: weight_rounding must be one of {', '.join(WEIGHT_ROUNDINGS)}, got {self.weight_rounding!r}")
        if self.weight_rounding == "gptq" and self.weight is None and not self.skip:
            raise ConfigError(f"{where}: weight_rounding = 'gptq' needs a weight spec")
        _check_rotation(self.rotation, where)
        size = self.rotation_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ConfigError(f"{where}: rotation_size must be a non-negative integer, got {size!r}")
        if self.rotation and not self.skip:
            blocks = {spec.block_size for spec in (self.weight, self.activation) if spec is not None}
            if not blocks:
                raise ConfigError(f"{where}: rotation needs a weight or activation spec")
            if size == 0 and len(blocks) > 1:
                raise ConfigError(f"{where}: weight and activation block sizes differ ({sorted(blocks)}); set rotation_size")
            if not _is_power_of_two(self.rotation_block):
                raise ConfigError(f"{where}: a Hadamard rotation needs a power-of-two block size, got {self.rotation_block}")
        _check_rotation(self.attention_rotation, f"{where}, attention")
        if self.attention_rotation and not self.skip:
            spec = self.attention or AttentionSpec()
            sizes = {s.block_size for s in (spec.query, spec.key) if s is not None}
            if not sizes:
                raise ConfigError(f"{where}, attention: rotation needs a query or key spec (it rotates Q and K before quantizing them)")
            if len(sizes) > 1:
                raise ConfigError(f"{where}, attention: rotation needs one block size for query and key, got {sorted(sizes)}")
            if not _is_power_of_two(self.attention_rotation_block):
                raise ConfigError(f"{where}, attention: a Hadamard rotation needs a power-of-two block size, "
                                  f"got {self.attention_rotation_block}")

    @property
    def rotation_block(self) -> int:
        """Elements of in_features each Hadamard block rotates (0: no rotation)."""
        if not self.rotation or self.skip:
            return 0
        if self.rotation_size:
            return self.rotation_size
        return (self.activation or self.weight).block_size

    @property
    def attention_rotation_block(self) -> int:
        """Elements of head_dim each Hadamard block rotates at attention sites (0: no rotation)."""
        if not self.attention_rotation or self.skip or self.attention is None:
            return 0
        return (self.attention.query or self.attention.key).block_size

    def matches(self, fqn: str) -> bool:
        return self._pattern.fullmatch(fqn) is not None

    @property
    def quantizes_linear(self) -> bool:
        return not self.skip and (self.weight is not None or self.activation is not None)

    @property
    def quantizes_attention(self) -> bool:
        return not self.skip and self.attention is not None and not self.attention.is_empty()


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """An ordered list of rules; the first rule whose regex matches a site decides it."""

    rules: tuple[Rule, ...] = ()
    source: str = "<python>"  # where the config came from, for messages

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        for rule in self.rules:
            if not isinstance(rule, Rule):
                raise ConfigError(f"QuantConfig.rules must hold mxfx.Rule objects, got {type(rule).__name__}")

    def first_match(self, fqn: str, kind: str = "linear") -> tuple[int, Rule] | None:
        """(index, rule) of the first rule matching `fqn`, or None. `kind` is unused by matching
        (one list of rules for all sites) and kept for messages."""
        for index, rule in enumerate(self.rules):
            if rule.matches(fqn):
                return index, rule
        return None

    def rule_label(self, index: int) -> str:
        rule = self.rules[index]
        return rule.name or f"rule {index} ({rule.match!r})"


# --- TOML -------------------------------------------------------------------------------------

_SPEC_KEYS = {"format", "block_size", "scale_mode", "rounding"}
_RULE_KEYS = {"match", "skip", "weight", "activation", "attention", "weight_storage", "rotation", "rotation_size",
              "weight_rounding"}
_ATTENTION_KEYS = (*ATTENTION_OPERANDS, "rotation")
_DEFAULT_KEYS = _SPEC_KEYS - {"format"} | {"weight_storage"}


def _spec(value: Any, defaults: dict, where: str) -> MXSpec | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = {"format": value}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: a spec is a format name or a table with {sorted(_SPEC_KEYS)}, got {value!r}")
    unknown = set(value) - _SPEC_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (valid: {', '.join(sorted(_SPEC_KEYS))})")
    if "format" not in value:
        raise ConfigError(f"{where}: a spec table needs 'format'")
    merged = {key: defaults[key] for key in _SPEC_KEYS - {"format"} if key in defaults} | value
    try:
        return MXSpec(**merged)
    except MXFXError as error:
        raise ConfigError(f"{where}: {error}") from None


def config_from_dict(data: dict, source: str = "<dict>") -> QuantConfig:
    """Build a QuantConfig from parsed TOML (a dict with `rule` and optional `defaults`)."""
    unknown = set(data) - {"rule", "defaults"}
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key {sorted(unknown)[0]!r} (valid: 'rule', 'defaults')")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, dict) or set(defaults) - _DEFAULT_KEYS:
        bad = sorted(set(defaults) - _DEFAULT_KEYS) if isinstance(defaults, dict) else [repr(defaults)]
        raise ConfigError(f"{source}: unknown key {bad[0]!r} in [defaults] (valid: {', '.join(sorted(_DEFAULT_KEYS))})")
    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list) or not raw_rules:
        raise ConfigError(f"{source}: no [[rule]] tables; a config needs at least one rule")
    rules = []
    for index, raw in enumerate(raw_rules):
        where = f"rule {index} in {source}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: a rule is a table, got {raw!r}")
        if "match" in raw:
            where = f"rule {index} ({raw['match']!r}) in {source}"
        unknown = set(raw) - _RULE_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r} (valid: {', '.join(sorted(_RULE_KEYS))})")
        if "match" not in raw:
            raise ConfigError(f"{where}: missing 'match' (a regex for module names)")
        skip = raw.get("skip", False)
        if not isinstance(skip, bool):
            raise ConfigError(f"{where}: 'skip' must be true or false, got {skip!r}")
        attention = None
        if "attention" in raw:
            table = raw["attention"]
            if not isinstance(table, dict):
                raise ConfigError(f"{where}: 'attention' must be a table with {', '.join(ATTENTION_OPERANDS)}")
            bad = set(table) - set(_ATTENTION_KEYS)
            if bad:
                raise ConfigError(f"{where}: unknown key {sorted(bad)[0]!r} in attention (valid: {', '.join(_ATTENTION_KEYS)})")
            attention = AttentionSpec(**{k: _spec(v, defaults, f"{where}, attention.{k}")
                                         for k, v in table.items() if k != "rotation"})
        try:
            rules.append(Rule(
                match=raw["match"],
                weight=_spec(raw.get("weight"), defaults, f"{where}, weight"),
                activation=_spec(raw.get("activation"), defaults, f"{where}, activation"),
                attention=attention,
                skip=skip,
                weight_storage=raw.get("weight_storage", defaults.get("weight_storage", "packed")),
                rotation=raw.get("rotation", ""),
                rotation_size=raw.get("rotation_size", 0),
                weight_rounding=raw.get("weight_rounding", "nearest"),
                attention_rotation=raw.get("attention", {}).get("rotation", "") if isinstance(raw.get("attention"), dict) else "",
                name=where,
            ))
        except ConfigError:
            raise
        except MXFXError as error:
            raise ConfigError(f"{where}: {error}") from None
    return QuantConfig(tuple(rules), source)


def preset_names() -> list[str]:
    """Names of the TOML presets shipped in mxfx.configs."""
    return sorted(p.name.removesuffix(".toml") for p in resources.files("mxfx.configs").iterdir() if p.name.endswith(".toml"))


def load_config(path_or_name: str | Path | QuantConfig) -> QuantConfig:
    """Load a QuantConfig from a preset name (see `preset_names()`) or a TOML file path.

    Raises:
        ConfigError: a missing file, invalid TOML, or invalid contents (the message names the
            key, the rule and the file).
    """
    if isinstance(path_or_name, QuantConfig):
        return path_or_name
    if not isinstance(path_or_name, (str, Path)):
        raise ConfigError(f"config must be a QuantConfig, a preset name or a TOML path, got {type(path_or_name).__name__}")
    text_source = str(path_or_name)
    preset = resources.files("mxfx.configs").joinpath(f"{text_source}.toml")
    if isinstance(path_or_name, str) and "/" not in text_source and preset.is_file():
        text, source = preset.read_text(), f"preset {text_source!r}"
    else:
        path = Path(path_or_name)
        if not path.is_file():
            raise ConfigError(f"no config file or preset named {text_source!r}; presets: {', '.join(preset_names())}")
        text, source = path.read_text(), str(path)
    if not text.strip():
        raise ConfigError(f"{source} is empty; a config needs at least one [[rule]]")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source} is not valid TOML: {error}") from None
    return config_from_dict(data, source)
