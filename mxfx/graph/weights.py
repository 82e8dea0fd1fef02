"""The stored weights of a prepared module's quantized linear sites: codes, scales, bias, rotation.

Checkpoint writers (and anyone else who needs what a prepared model *computes with*, not what
its config asked for) read the codes and E8M0 scales through `site_weights`, which walks the
prepared graph's `mxfx.linear` calls and reads their operands by the op's argument names.
The codes are the ones the model uses: after GPTQ, mse scales or a searched mixed config.

    for entry in mxfx.graph.weights.site_weights(prepared):
        print(entry.site.fqn, entry.data.elem_format, entry.data.codes.shape, entry.rotation)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, fx

from mxfx.graph.sites import LINEAR, site_of
from mxfx.numerics import ops as _ops  # noqa: F401  (registers torch.ops.mxfx.*)
from mxfx.numerics.api import MXData
from mxfx.numerics.spec import MXSpec


@dataclasses.dataclass(frozen=True)
class SiteWeight:
    """What one quantized linear site of a prepared graph computes with.

    `data` is None when the site keeps no packed weight (weight_storage "simulated", or a rule
    that quantizes only the activations); `weight` then holds the dense weight tensor the
    linear reads, when it is a stored tensor.
    """

    site: Any  # mxfx.graph.sites.Site: the site record (fqn, rule, specs, weight_target, shape)
    node: str  # the graph node that computes the product
    data: MXData | None  # packed codes + E8M0 scales, blocked along in_features (axis 1)
    weight: Tensor | None  # the dense weight a non-packed site reads (None for packed sites)
    bias: Tensor | None  # the bias the product adds, if any
    activation: MXSpec | None  # how the graph quantizes the input (None: high precision)
    rotation: int  # elements per Hadamard block applied to the input and weight (0: none): the Site's
    # rotation_block, or an mxfx.hadamard call found on the input


def _attribute(gm: fx.GraphModule, node: Any) -> Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    owner_path, _, name = str(node.target).rpartition(".")
    return getattr(gm.get_submodule(owner_path) if owner_path else gm, name)


def _named_args(node: fx.Node) -> dict[str, Any]:
    """A call's arguments by the op schema's names (never by position)."""
    schema = node.target._schema
    return {arg.name: value for arg, value in zip(schema.arguments, node.args)} | dict(node.kwargs)


def _is(node: Any, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target


def _rotation(x: Any) -> int:
    """The Hadamard block size applied to a linear input (looking through an activation fake-quantize)."""
    if _is(x, torch.ops.mxfx.fake_quantize.default):
        x = _named_args(x)["x"]
    if _is(x, torch.ops.mxfx.hadamard.default):
        return int(_named_args(x)["block_size"])
    return 0


def _activation_spec(x: Any) -> MXSpec | None:
    if not _is(x, torch.ops.mxfx.fake_quantize.default):
        return None
    args = _named_args(x)
    return MXSpec(args["elem_format"], args["block_size"], args["scale_mode"], args["rounding"])


def site_weights(prepared: fx.GraphModule) -> list[SiteWeight]:
    """One SiteWeight per quantized linear site of a prepared module, in graph order.

    Args:
        prepared: a module from `mxfx.prepare` (a module read back by `mxfx.load` has no site
            annotations on its nodes: the list is empty).

    Returns:
        For each linear node annotated with a QUANTIZED site: the packed codes and scales of an
        `mxfx.linear` call (as `MXData`, with the site's weight spec), its bias, the input's
        activation spec and the Hadamard rotation block applied to its input (0 for none).

    Example:
        >>> entries = site_weights(prepared)
        >>> w = entries[0].data.dequantize(torch.float32)  # the weight the model computes with
    """
    entries = []
    for node in prepared.graph.nodes:
        site = site_of(node)
        if site is None or site.kind != LINEAR or not site.quantized or node.op != "call_function":
            continue
        if _is(node, torch.ops.mxfx.linear.default):
            args = _named_args(node)
            codes, scales = _attribute(prepared, args["weight_codes"]), _attribute(prepared, args["weight_scales"])
            spec = site.weight or MXSpec(args["weight_format"], args["weight_block_size"])
            in_features = int(args["in_features"])
            out_features = int(scales.shape[0])
            data = MXData(codes, scales, args["weight_format"], int(args["weight_block_size"]), 1,
                          (out_features, in_features), torch.float32, spec.scale_mode, spec.rounding)
            activation = None
            if args["act_format"]:
                activation = MXSpec(args["act_format"], args["act_block_size"], args["act_scale_mode"],
                                    args["act_rounding"])
            entries.append(SiteWeight(site, node.name, data, None, _attribute(prepared, args.get("bias")),
                                      activation, site.rotation_block or _rotation(args["x"])))
        elif _is(node, torch.ops.aten.linear.default):
            args = _named_args(node)
            entries.append(SiteWeight(site, node.name, None, _attribute(prepared, args["weight"]),
                                      _attribute(prepared, args.get("bias")), _activation_spec(args["input"]),
                                      site.rotation_block or _rotation(args["input"])))
    return entries
