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
from pathlib import Path
from typing import Any

import torch
from torch import fx

from mxfx.errors import ConfigError, InputGuardError, MXFXWarning, MXTypeError
from mxfx.graph import shape_classes
from mxfx.graph.config import QuantConfig, load_config
from mxfx.graph.export import export, tracing_lock, used_dynamic_shapes
from mxfx.graph.sites import ATTENTION, CHECK_FAILED, LINEAR, UNSUPPORTED, Site, annotate, graph_sites, site_of
from mxfx.passes._utils import MXFX_META, mxfx_meta
from mxfx.passes.canonicalize_linear import CanonicalizeLinearPass
from mxfx.passes.gptq_experts import GPTQExpertsPass
from mxfx.passes.gptq_weights import GPTQWeightsPass
from mxfx.passes.insert_expert_qdq import InsertExpertQDQPass
from mxfx.passes.insert_qdq import InsertQDQPass
from mxfx.passes.lower_linear import LowerLinearPass
from mxfx.passes.match_attention_sites import SDPA, MatchAttentionSitesPass
from mxfx.passes.match_expert_sites import MatchExpertSitesPass
from mxfx.passes.match_linear_sites import MatchLinearSitesPass
from mxfx.passes.quantize_attention import QuantizeAttentionPass
from mxfx.passes.report_unquantized import ReportUnquantizedPass
from mxfx.passes.rotate_attention import RotateAttentionPass
from mxfx.passes.rotate_experts import RotateExpertsPass
from mxfx.passes.rotate_linear import RotateLinearPass
from mxfx.passes.transplant_experts import TransplantExpertsPass
from mxfx.passes.transplant_linears import TransplantLinearsPass
from mxfx.progress import Progress

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
    dynamic_shapes: Any = "auto",
    calibration: Any = None,
    progress: Progress = True,
    gptq_resume: str | Path | None = None,
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
        dynamic_shapes: "auto" (default): every input dimension the model lets vary stays dynamic
            (other batch sizes and sequence lengths need no new prepare; see `mxfx.export`);
            None: static shapes; else torch.export's dynamic_shapes.
        calibration: batches for rules with `weight_rounding = "gptq"` (an iterable of tensors,
            tuples of positional inputs, or dicts with "args"/"kwargs"), run through the graph.
        progress: GPTQ's progress, per calibration batch then per site: True (a tqdm bar on a
            terminal, else log lines), False, or a callable progress(done, total, elapsed_s, label)
            (`mxfx.progress`); the callable may raise (e.g. KeyboardInterrupt) to stop the run.
        gptq_resume: a directory where GPTQ saves each site's result as soon as it is computed. A
            prepare given the same directory again (same model, config and calibration batches)
            loads the saved sites instead of computing them, so an interrupted run resumed repeats
            at most the site it was in; the unit is the site (a linear, or an expert site with all
            its experts). Calibration runs again unless every site is saved. A directory written by
            another run is refused (ResumeError). See `mxfx.recovery.gptq_resume`.

    Returns:
        An nn.Module (fx.GraphModule) with the model's call signature and output structure, for
        inference: its parameters share the model's storage and do not require grad (for
        experiments with gradients, `requires_grad_()` them: mxfx.linear and fake_quantize have
        straight-through gradients; mxfx.attention has none). Its `mxfx_report` attribute (a
        PrepareReport) lists the sites and rule match counts.

    Raises:
        ConfigError: a bad config. ExportError: torch.export failed (with what to try).
        ResumeError: `gptq_resume` holds results of another run (the message names the site and what differs).
    """
    if not isinstance(model, (torch.nn.Module, torch.export.ExportedProgram)):
        raise MXTypeError(f"prepare takes an nn.Module or an ExportedProgram, got {type(model).__name__}")
    config = load_config(config)
    if calibration is None and any(r.weight_rounding == "gptq" and not r.skip for r in config.rules):
        raise ConfigError("weight_rounding = 'gptq' needs calibration data: mxfx.prepare(..., calibration=[batch, ...])")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    with tracing_lock():  # export and the passes' symbolic fake shapes: one thread at a time
        if isinstance(model, torch.export.ExportedProgram):
            program = model
            example_inputs, example_kwargs = program.example_inputs or (example_inputs, example_kwargs)
        else:
            program = export(model, example_inputs, example_kwargs=example_kwargs, strict=strict,
                             dynamic_shapes=dynamic_shapes)
        gm = program.module()
        gm.meta.pop(MXFX_META, None)  # re-preparing a prepared module: start a fresh record
        _detach_parameters(gm)
        wrap_guards(gm)
        for pass_ in pipeline(config, calibration, progress, gptq_resume):
            pass_(gm)
    gm.mxfx_report = _report(gm, config)
    # Kept for mxfx.save, which re-exports the prepared module.
    gm.mxfx_export_args = (example_inputs, example_kwargs or {}, used_dynamic_shapes(program, dynamic_shapes), strict)
    if isinstance(model, torch.nn.Module):  # sizes the model's code treats apart: re-exported on first use
        shape_classes.install(gm, model, config, strict, used_dynamic_shapes(program, dynamic_shapes) is None,
                              example_inputs, example_kwargs, setup_class_module)
    return gm


def wrap_guards(gm: fx.GraphModule) -> None:
    """Make the input guards of a module from `ExportedProgram.module()` raise InputGuardError."""
    if isinstance(getattr(gm, "_guards_fn", None), torch.nn.Module):
        gm._guards_fn = _ExplainedGuards(gm._guards_fn)


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
            explained = InputGuardError(
                f"the prepared module's export does not cover these input shapes ({error}). Sizes are "
                "fixed at export where the model needs them (a linear's in_features) or its code branches "
                "on them (e.g. Hugging Face masks treat batch 1 or sequence length 1 apart: a module "
                "prepared from a model re-exports it for such a shape class, mxfx.graph.shape_classes), or where a "
                "dimension is static (size 1 in the example inputs, the static fallback warned about at "
                "prepare, dynamic_shapes=None, or an explicit dynamic_shapes without it): prepare with "
                "example inputs of this shape, or pass dynamic_shapes to mxfx.graph.prepare, e.g. "
                "dynamic_shapes=({0: torch.export.Dim('batch')},)"
            )
            explained.guard = str(error).removeprefix("Guard failed: ")  # what mxfx.graph.shape_classes reads
            raise explained from None


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


def matching_passes(config: QuantConfig) -> list:
    """The passes that find and annotate sites (the graph's math is unchanged apart from
    rewriting linear-like products into `aten.linear`), ending with the completeness pass that
    records every weight use and attention-like softmax no other pass decided about."""
    return [CanonicalizeLinearPass(), MatchLinearSitesPass(config), MatchExpertSitesPass(config),
            MatchAttentionSitesPass(config), ReportUnquantizedPass(config)]


def setup_class_module(module: fx.GraphModule, prepared: fx.GraphModule, config: QuantConfig) -> None:
    """Prepare `module`, a re-export of a prepared model for another shape class
    (`mxfx.graph.shape_classes`), with the weights `prepared` already computed: prepare's passes,
    with the ones that compute weights replaced by a copy of their result (nothing quantized twice)."""
    wrap_guards(module)
    _detach_parameters(module)
    transplants = [TransplantLinearsPass(prepared), TransplantExpertsPass(config, prepared)]
    for pass_ in shape_classes.class_pipeline(pipeline(config, calibration=()), transplants):
        pass_(module)


def pipeline(config: QuantConfig, calibration: Any = None, progress: Progress = True,
             gptq_resume: str | Path | None = None) -> list:
    """The passes prepare runs, in order (`calibration`: batches for GPTQ sites; `progress` and
    `gptq_resume`: GPTQ's progress reports and resume directory, see `prepare`)."""
    recovery = [RotateLinearPass(config), RotateExpertsPass(config), RotateAttentionPass(config),
                GPTQWeightsPass(config, calibration, progress, gptq_resume),
                GPTQExpertsPass(config, calibration, progress, gptq_resume)]
    return [*matching_passes(config), *recovery, InsertQDQPass(config), InsertExpertQDQPass(config), LowerLinearPass(),
            QuantizeAttentionPass(config)]


def _report(gm: fx.GraphModule, config: QuantConfig) -> PrepareReport:
    _record_unrewritten_attention(gm)
    sites = tuple(graph_sites(gm))
    counts = [0] * len(config.rules)
    for site in sites:
        if site.rule is not None:
            counts[site.rule] += 1
    for index, count in enumerate(counts):
        if count == 0:
            warnings.warn(f"mxfx: {config.rule_label(index)} matched no site", MXFXWarning, stacklevel=3)
    _warn_left_out(sites, config)
    rewrites = dict(mxfx_meta(gm)["rewrites"])
    return PrepareReport(sites, tuple((config.rule_label(i), c) for i, c in enumerate(counts)), rewrites)


def _record_unrewritten_attention(gm: fx.GraphModule) -> None:
    """A safety net: an explicit attention site a rule quantizes whose matmuls the attention pass
    left without a quantized operand is recorded UNSUPPORTED, not QUANTIZED. (Forms the attention
    pass cannot rewrite, such as an SDPA call with dropout, are UNSUPPORTED at matching already, so
    that `find_sites` reports them too.)"""
    by_name = {node.name: node for node in gm.graph.nodes}
    for node in gm.graph.nodes:
        site = site_of(node)
        if site is None or site.kind != ATTENTION or not site.quantized or node.target is SDPA:
            continue
        if site.nodes and not any(_has_quantized_operand(by_name.get(name)) for name in site.nodes):
            why = "the attention pass quantized neither matmul (a form it does not handle)"
            annotate(node, dataclasses.replace(site, status=UNSUPPORTED, reason=why, attention=None))


def _has_quantized_operand(matmul: fx.Node | None) -> bool:
    if matmul is None:
        return False
    from mxfx.passes.match_attention_sites import product_operands  # baddbmm: args 1, 2; einsum: args[1]

    operands = product_operands(matmul)
    return any(isinstance(o, fx.Node) and o.target is torch.ops.mxfx.fake_quantize.default for o in operands)


def _warn_left_out(sites: tuple[Site, ...], config: QuantConfig) -> None:
    """Warn once when sites the config asked to quantize were left in high precision.

    A site is *asked for* when the first rule matching its name quantizes its kind (a linear rule
    with a weight or activation spec, an attention rule with an operand spec): `match = ".*"`
    asks for every site. Such a site that mxfx could not quantize (UNSUPPORTED, CHECK_FAILED)
    warns; a site a rule skips, or that no rule matches, does not.
    """
    left_out = []
    for site in sites:
        if site.status not in (UNSUPPORTED, CHECK_FAILED) or site.rule is None:
            continue
        rule = config.rules[site.rule]
        if rule.quantizes_linear if site.kind == LINEAR else rule.quantizes_attention:
            left_out.append(site)
    if not left_out:
        return
    by_status = ", ".join(f"{sum(s.status == status for s in left_out)} {status}"
                          for status in (UNSUPPORTED, CHECK_FAILED) if any(s.status == status for s in left_out))
    first = "; ".join(f"{s.fqn} ({s.kind} {s.form}: {s.reason})" for s in left_out[:3])
    more = f"; and {len(left_out) - 3} more" if len(left_out) > 3 else ""
    warnings.warn(f"mxfx: {len(left_out)} site(s) the config asks to quantize were left in high precision "
                  f"({by_status}): {first}{more}. See prepared.mxfx_report.unquantized.", MXFXWarning, stacklevel=4)


def find_sites(model: fx.GraphModule | torch.export.ExportedProgram, config: QuantConfig | str | None = None) -> list[Site]:
    """The sites of an exported graph and what `config` would do to each (nothing is quantized).

    Args:
        model: an `ExportedProgram` (from `mxfx.export`) or a GraphModule from one (it is
            canonicalized and annotated in place; pass a program to leave it untouched).
        config: a QuantConfig, preset name or TOML path; None finds the sites with no rule.

    Returns:
        One Site per linear and attention site, in graph order, including the candidates mxfx saw
        but would not quantize (their `status` and `reason` say why).
    """
    gm = model.module() if isinstance(model, torch.export.ExportedProgram) else model
    config = QuantConfig() if config is None else load_config(config)
    with tracing_lock():  # the passes compute symbolic fake shapes (see mxfx.export)
        for pass_ in matching_passes(config):
            pass_(gm)
    return graph_sites(gm)
