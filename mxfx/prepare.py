"""mxfx.prepare: torch.export the model, then run the MX passes on its graph.

    prepared = mxfx.prepare(model, config, example_inputs=(x,))
    compiled = torch.compile(prepared)

The model is exported (the original is not modified), its graph becomes an `nn.Module` with the
model's call signature and output structure (`ExportedProgram.module()`), and the passes insert
and lower the MX ops there.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import torch
from torch import fx

from mxfx.config import QuantConfig, load_config
from mxfx.errors import ConfigError, InputGuardError, MXFXWarning, MXTypeError
from mxfx.export import export
from mxfx.passes._utils import MXFX_META, mxfx_meta
from mxfx.passes.canonicalize_linear import CanonicalizeLinearPass
from mxfx.passes.gptq_weights import GPTQWeightsPass
from mxfx.passes.insert_qdq import InsertQDQPass
from mxfx.passes.lower_linear import LowerLinearPass
from mxfx.passes.match_attention_sites import MatchAttentionSitesPass
from mxfx.passes.match_linear_sites import MatchLinearSitesPass
from mxfx.passes.quantize_attention import QuantizeAttentionPass
from mxfx.passes.rotate_attention import RotateAttentionPass
from mxfx.passes.rotate_linear import RotateLinearPass
from mxfx.sites import Site, graph_sites, site_of

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PrepareReport:
    """What prepare did: every site it saw (quantized or not, and why), rule match counts, rewrites."""

    sites: tuple[Site, ...]  # every linear and attention site, in graph order
    rule_matches: tuple[tuple[str, int], ...]  # (rule label, sites matched)
    rewrites: dict  # pass name -> rewrites

    @property
    def unquantized(self) -> tuple[Site, ...]:
        """The sites left in high precision, each with its status and reason."""
        return tuple(site for site in self.sites if not site.quantized)

    def to_dict(self) -> dict:
        return {"sites": [s.to_dict() for s in self.sites], "rule_matches": [list(r) for r in self.rule_matches],
                "rewrites": dict(self.rewrites)}

    @classmethod
    def from_dict(cls, data: dict) -> PrepareReport:
        return cls(tuple(Site.from_dict(s) for s in data["sites"]), tuple(map(tuple, data["rule_matches"])),
                   dict(data["rewrites"]))


def prepare(
    model: torch.nn.Module | torch.export.ExportedProgram,
    config: QuantConfig | str,
    example_inputs: tuple = (),
    *,
    example_kwargs: dict | None = None,
    strict: bool = False,
    dynamic_shapes: Any = None,
    calibration: Any = None,
) -> fx.GraphModule:
    """Export `model` and quantize the linear sites its config selects to MX.

    Args:
        model: the model; it is not modified (it is exported in eval mode, then restored). Or an
            ExportedProgram from `mxfx.export`, which is used as it is (no re-tracing); the
            example inputs and export options are then ignored.
        config: a QuantConfig, a preset name (`mxfx.preset_names()`) or a TOML path.
        example_inputs: positional example inputs for torch.export.
        example_kwargs: keyword example inputs.
        strict: torch.export's strict mode (default non-strict, which traces more models).
        dynamic_shapes: torch.export dynamic_shapes (e.g. a dynamic batch dimension).
        calibration: batches for rules with `weight_rounding = "gptq"` (an iterable of tensors,
            tuples of positional inputs, or dicts with "args"/"kwargs"), run through the graph.

    Returns:
        An nn.Module (fx.GraphModule) with the model's call signature and output structure, for
        inference: its parameters share the model's storage and do not require grad (for
        experiments with gradients, `requires_grad_()` them: mxfx.linear and fake_quantize have
        straight-through gradients; mxfx.attention has none). Its `mxfx_report` attribute (a
        PrepareReport) lists the sites and rule match counts.

    Raises:
        ConfigError: a bad config. ExportError: torch.export failed (with what to try).
    """
    if not isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        raise MXTypeError(f"prepare takes an nn.Module or an ExportedProgram, got {type(model).__name__}")
    config = load_config(config)
    if calibration is None and any(r.weight_rounding == "gptq" and not r.skip for r in config.rules):
        raise ConfigError("weight_rounding = 'gptq' needs calibration data: mxfx.prepare(..., calibration=[batch, ...])")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if isinstance(model, torch.export.ExportedProgram):
        program = model
        example_inputs, example_kwargs = program.example_inputs or (example_inputs, example_kwargs)
    else:
        program = export(model, example_inputs, example_kwargs=example_kwargs, strict=strict,
                         dynamic_shapes=dynamic_shapes)
    gm = program.module()
    gm.meta.pop(MXFX_META, None)  # re-preparing a prepared module: start a fresh record
    _detach_parameters(gm)
    if isinstance(getattr(gm, "_guards_fn", None), torch.nn.Module):
        gm._guards_fn = _ExplainedGuards(gm._guards_fn)
    for pass_ in pipeline(config, calibration):
        pass_(gm)
    gm.mxfx_report = _report(gm, config)
    # Kept for mxfx.save, which re-exports the prepared module.
    gm.mxfx_export_args = (example_inputs, example_kwargs or {}, dynamic_shapes, strict)
    return gm


class _ExplainedGuards(torch.nn.Module):
    """torch.export's input guards, re-raised as an mxfx error that says what to do."""

    def __init__(self, guards: torch.nn.Module) -> None:
        super().__init__()
        self.guards = guards
        self._is_impure = True  # a side-effect-only call: keep it through dead-code elimination

    def forward(self, *args, **kwargs):
        try:
            return self.guards(*args, **kwargs)
        except AssertionError as error:
            raise InputGuardError(
                f"the prepared module was exported for other input shapes ({error}); to accept other "
                "batch or sequence sizes, pass dynamic_shapes to mxfx.prepare, e.g. "
                "dynamic_shapes=({0: torch.export.Dim('batch')},)"
            ) from None


def _detach_parameters(gm: fx.GraphModule) -> None:
    """Give the prepared module its own Parameter objects (sharing storage: no copy) that do not
    require grad: it is an inference module, and the original model's parameters stay untouched.
    (`ExportedProgram.module()` hands back the model's own Parameter objects.)"""
    replacements: dict[int, torch.nn.Parameter] = {}
    for name, param in list(gm.named_parameters(remove_duplicate=False)):
        if id(param) not in replacements:
            replacements[id(param)] = torch.nn.Parameter(param.detach(), requires_grad=False)
        owner_path, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(owner_path) if owner_path else gm, attr, replacements[id(param)])


def check_nonfinite(prepared: fx.GraphModule, *args, **kwargs) -> list[str]:
    """Run `prepared` once and name every site whose MX-quantized operand holds ±Inf or NaN (its
    blocks decode to NaN); warns once per site. Returns the site names."""
    from mxfx.api import warn_if_infinite

    quantizing = {torch.ops.mxfx.fake_quantize.default, torch.ops.mxfx.linear.default, torch.ops.mxfx.attention.default}
    found: list[str] = []

    class Checker(fx.Interpreter):
        def run_node(self, node):
            if node.op == "call_function" and node.target in quantizing:
                x = self.env[node.args[0]]
                stack = list((node.meta.get("nn_module_stack") or {}).values())
                record = site_of(node)
                site = record.fqn if record is not None else (stack[-1][0] if stack else "<root>")
                if not torch.isfinite(x).all():
                    found.append(site)
                    warn_if_infinite(x.nan_to_num(nan=float("inf")), f"the input of MX site {site!r}")
            return super().run_node(node)

    with torch.no_grad():
        Checker(prepared).run(*torch.utils._pytree.tree_leaves((args, kwargs)))
    return list(dict.fromkeys(found))


def matching_passes(config: QuantConfig) -> list:
    """The passes that find and annotate sites (the graph's math is unchanged apart from
    rewriting linear-like products into `aten.linear`)."""
    return [CanonicalizeLinearPass(), MatchLinearSitesPass(config), MatchAttentionSitesPass(config)]


def pipeline(config: QuantConfig, calibration: Any = None) -> list:
    """The passes prepare runs, in order (`calibration`: batches for GPTQ sites)."""
    recovery = [RotateLinearPass(config), RotateAttentionPass(config), GPTQWeightsPass(config, calibration)]
    return [*matching_passes(config), *recovery, InsertQDQPass(config), LowerLinearPass(), QuantizeAttentionPass(config)]


def _report(gm: fx.GraphModule, config: QuantConfig) -> PrepareReport:
    sites = tuple(graph_sites(gm))
    counts = [0] * len(config.rules)
    for site in sites:
        if site.rule is not None:
            counts[site.rule] += 1
    for index, count in enumerate(counts):
        if count == 0:
            warnings.warn(f"mxfx: {config.rule_label(index)} matched no site", MXFXWarning, stacklevel=3)
    rewrites = dict(mxfx_meta(gm)["rewrites"])
    return PrepareReport(sites, tuple((config.rule_label(i), c) for i, c in enumerate(counts)), rewrites)
