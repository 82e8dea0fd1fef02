"""What a checkpoint holds: the plan (`plan_checkpoint`: every quantized linear's codes and E8M0
scales as the prepared graph computes with them, and the other tensors), the checks that refuse what
no target format can express, and the Hugging Face folder writer the format modules share
(`compressed_tensors`, `quark`, `gguf` build on this module; `checkpoints.save_pretrained` chooses one).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx

from mxfx.errors import CheckpointError, MissingDependencyError
from mxfx.graph.sites import ATTENTION, LINEAR
from mxfx.graph.weights import SiteWeight, site_weights
from mxfx.numerics.api import MXData
from mxfx.numerics.spec import MXSpec

log = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("compressed-tensors", "quark", "gguf")
MX_BLOCK = 32  # every target format fixes the OCP block size (OCP MX v1.0 §5.2)


@dataclasses.dataclass(frozen=True)
class QuantizedLinear:
    """One linear layer the checkpoint stores quantized."""

    fqn: str  # the nn.Linear module's name in the Hugging Face model (its weight is `fqn + ".weight"`)
    data: MXData  # codes [N, packed K] and E8M0 scales [N, K/32], as the prepared graph uses them
    activation: MXSpec | None  # the rule's input quantization (None: weight-only)


@dataclasses.dataclass(frozen=True)
class CheckpointPlan:
    """What a writer writes: the quantized linears, every other tensor, and the HF config."""

    model: Any  # the transformers PreTrainedModel
    config: Any  # a copy of model.config (tie_word_embeddings cleared when a tied head is quantized)
    quantized: dict[str, QuantizedLinear]  # by module name, in graph order
    dense: dict[str, Tensor]  # every other tensor of the model's state dict (tied duplicates dropped)
    unquantized_linears: tuple[str, ...]  # nn.Linear modules left in high precision


def _is_hf_model(model: Any) -> bool:
    config = getattr(model, "config", None)
    return (isinstance(model, torch.nn.Module) and config is not None and hasattr(config, "to_dict")
            and hasattr(config, "model_type") and hasattr(model, "save_pretrained"))


def plan_checkpoint(prepared: fx.GraphModule, model: Any, format: str) -> CheckpointPlan:
    """Check that `prepared` can be written as a Hugging Face checkpoint and collect its tensors.

    Raises:
        CheckpointError: `model` is not a Hugging Face model, `prepared` is not from mxfx.prepare,
            or a site cannot be written (each message names the site and says why).
    """
    if format not in CHECKPOINT_FORMATS:
        raise CheckpointError(f"unknown checkpoint format {format!r}; valid: {', '.join(CHECKPOINT_FORMATS)}")
    if not _is_hf_model(model):
        got = "model=None" if model is None else type(model).__name__
        raise CheckpointError(f"save_pretrained writes Hugging Face checkpoints: pass the transformers model the "
                              f"prepared module came from (model=...), got {got}")
    report = getattr(prepared, "mxfx_report", None)
    if not isinstance(prepared, fx.GraphModule) or report is None:
        raise CheckpointError("save_pretrained takes a module from mxfx.prepare; "
                              f"got {type(prepared).__name__} without an mxfx_report")
    entries = {entry.site.fqn: entry for entry in site_weights(prepared)}
    quantized: dict[str, QuantizedLinear] = {}
    for site in report.sites:
        if not site.quantized:
            continue
        if site.kind == ATTENTION:
            raise CheckpointError(f"attention site {site.fqn} ({site.rule_label}) quantizes attention operands: "
                                  f"{format} checkpoints carry linear weights only; prepare without attention rules")
        if site.kind == LINEAR:
            entry = entries.get(site.fqn)
            if entry is None:
                raise CheckpointError(f"linear site {site.fqn} is quantized but the prepared graph has no product "
                                      "annotated with it (a module read back by mxfx.load keeps its report but not "
                                      "the graph's site annotations: write the module mxfx.prepare returned)")
            quantized[site.fqn] = _check_site(entry, model, format)
    config = copy.deepcopy(model.config)
    dense = _dense_tensors(prepared, model, quantized, config)
    linears = tuple(name for name, module in model.named_modules()
                    if isinstance(module, torch.nn.Linear) and name not in quantized)
    return CheckpointPlan(model, config, quantized, dense, linears)


def _check_site(entry: SiteWeight, model: Any, format: str) -> QuantizedLinear:
    site = entry.site
    where = f"site {site.fqn} ({site.rule_label})"
    if entry.rotation:
        raise CheckpointError(f"{where} is Hadamard-rotated (rotation = 'hadamard', blocks of {entry.rotation}): "
                              f"a {format} loader would run the rotated weight on unrotated inputs; prepare "
                              "without rotation for this export")
    if entry.data is None:
        what = "quantizes only the activations" if site.weight is None else "keeps a simulated (fp) weight"
        raise CheckpointError(f"{where} {what}: checkpoints store packed MX weights; use a weight spec with "
                              "weight_storage = 'packed'")
    try:
        module = model.get_submodule(site.fqn)
    except AttributeError:
        module = None
    shape = tuple(entry.data.shape)
    if not isinstance(module, torch.nn.Linear) or site.weight_target != f"{site.fqn}.weight" \
            or tuple(module.weight.shape) != shape:
        raise CheckpointError(f"{where} is not a plain nn.Linear of the model (form {site.form!r}, weight "
                              f"{site.weight_target!r}, shape {shape}): checkpoint formats store nn.Linear weights")
    if entry.data.block_size != MX_BLOCK:
        raise CheckpointError(f"{where} uses MX blocks of {entry.data.block_size}; {format} stores blocks of {MX_BLOCK}")
    if shape[1] % MX_BLOCK:
        raise CheckpointError(f"{where}: in_features {shape[1]} is not a multiple of {MX_BLOCK} (a partial MX block "
                              f"has no {format} layout)")
    return QuantizedLinear(site.fqn, entry.data, entry.activation)


def _dense_tensors(prepared: fx.GraphModule, model: Any, quantized: dict[str, QuantizedLinear],
                   config: Any) -> dict[str, Tensor]:
    """Every tensor of the model's state dict that is not a quantized weight, read from the
    prepared module where it holds one of that name (they share storage), else from the model."""
    replaced = {f"{fqn}.weight" for fqn in quantized}
    have = prepared.state_dict(keep_vars=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = next((name for name, module in model.named_modules() if module is output), None) if output is not None else None
    if tied and head is not None and head in quantized:
        # The head is stored quantized while the input embedding stays dense: untie them.
        config.tie_word_embeddings = False
        tied = False
    dense: dict[str, Tensor] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in replaced:
            continue
        tensor = have.get(name, tensor).detach()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.dtype)
        if key in seen and tensor.numel():
            if tied:  # a tied weight is stored once, as Hugging Face does
                continue
            tensor = tensor.clone()
        seen.setdefault(key, name)
        dense[name] = tensor.contiguous()
    return dense


def write_hf_folder(plan: CheckpointPlan, path: Path, quantization_config: dict, tensors: dict[str, Tensor],
                    tokenizer: Any = None) -> Path:
    """config.json (with `quantization_config`), model.safetensors, generation config, tokenizer."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise MissingDependencyError("writing a checkpoint needs safetensors: pip install safetensors "
                                     "(or pip install 'mxfx[checkpoints]')") from None

    path.mkdir(parents=True, exist_ok=True)
    config = plan.config
    config.quantization_config = quantization_config
    config.save_pretrained(path)
    generation = getattr(plan.model, "generation_config", None)
    if generation is not None and getattr(plan.model, "can_generate", lambda: False)():
        generation.save_pretrained(path)
    everything = dict(plan.dense) | tensors
    save_file({name: tensor.contiguous() for name, tensor in everything.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    log.info("wrote %s: %d quantized linears, %d other tensors", path, len(plan.quantized), len(plan.dense))
    return path


def refuse_activation(layer: QuantizedLinear, format: str, why: str) -> CheckpointError:
    """The error for an activation rule a format cannot carry (never silently dropped)."""
    spec = layer.activation
    return CheckpointError(f"site {layer.fqn} quantizes its input as {spec.describe()}: {format} {why}. Prepare "
                           "with a weight-only config for this export (the runtime then applies its own activation "
                           "rule; configs/ has presets that simulate it)")
