"""Run-time checks on a prepared module: which MX-quantized operands hold NaN or ±Inf.

A block holding NaN or ±Inf gets the NaN scale (E8M0 0xFF, OCP MX v1.0 §5.4) and decodes to NaN
entirely, so one non-finite value wipes out up to block_size neighbours. `check_nonfinite` runs
a prepared module once and names, for each site, the operand whose blocks that happens to:

- linear: `activation` (only when the site quantizes its input) and `weight` (quantized when the
  module was prepared: a block that held NaN or Inf then is stored as NaN now);
- attention: `q`, `k`, `v` (each only when its spec is set) and `p`, the softmax output, when the
  probs spec is set (a fully masked row or a NaN/Inf score makes a NaN row of P).

Operands left in high precision are not checked: a NaN there is the model's own business.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
from torch import Tensor, fx

from mxfx import _compat
from mxfx.errors import MXFXWarning, MXTypeError
from mxfx.graph.sites import ATTENTION, EXPERT_FORMS, LINEAR, Site, graph_sites, site_of
from mxfx.numerics.attention import quantize_operand
from mxfx.numerics.ops import op_arguments

__all__ = ["NonFinite", "check_nonfinite"]


@dataclasses.dataclass(frozen=True)
class NonFinite:
    """One MX-quantized operand of one site that held NaN or ±Inf in a checked run."""

    site: str  # the site's fqn (what config rules match)
    operand: str  # "activation", "weight", "q", "k", "v" or "p"
    nan: int  # how many NaN values the operand held
    inf: int  # how many ±Inf values
    node: str  # the graph node that quantizes (or consumes) the operand

    @property
    def kinds(self) -> str:
        """"NaN", "Inf" or "NaN and Inf"."""
        return " and ".join(k for k, n in (("NaN", self.nan), ("Inf", self.inf)) if n)

    def __str__(self) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in (("NaN", self.nan), ("Inf", self.inf)) if n)
        return f"site {self.site!r} {self.operand}: {self.kinds} ({counts}); its MX blocks decode to NaN"


def check_nonfinite(prepared: fx.GraphModule, *args, **kwargs) -> list[NonFinite]:
    """Run `prepared` once on (args, kwargs) and report every MX-quantized operand holding NaN or ±Inf.

    Args:
        prepared: a module from `mxfx.prepare` (or `mxfx.load`).
        *args, **kwargs: its inputs, as for a normal call.

    Returns:
        One `NonFinite` per (site, operand), in graph order; empty when every quantized operand
        is finite. Each is also warned (`mxfx.MXFXWarning`).

    Raises:
        MXTypeError: `prepared` is not an fx.GraphModule.
    """
    if not isinstance(prepared, fx.GraphModule):
        raise MXTypeError(f"check_nonfinite takes a module from mxfx.graph.prepare, got {type(prepared).__name__}")
    roles = _operand_roles(prepared)
    found: dict[tuple[str, str], NonFinite] = {}

    def record(node: fx.Node, where: tuple[str, str], value: Tensor) -> None:
        nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
        if (nan or inf) and where not in found:
            found[where] = NonFinite(where[0], where[1], nan, inf, node.name)

    class Checker(fx.Interpreter):
        def run_node(self, node: fx.Node):
            if node.op == "call_function":
                for where, value in _quantized_operands(node, self.env, roles):
                    record(node, where, value)
            return super().run_node(node)

    with torch.no_grad():
        Checker(prepared).run(*_compat.tree_leaves((args, kwargs)))
    for finding in found.values():
        warnings.warn(f"mxfx: {finding}", MXFXWarning, stacklevel=2)
    return list(found.values())


def _operand_roles(gm: fx.GraphModule) -> dict[str, tuple[Site, dict[int, str]]]:
    """node name -> (site, {argument index: operand}) for the nodes whose arguments are the
    operands of a site: the site's own linear node, and an explicit attention's two matmuls."""
    roles: dict[str, tuple[Site, dict[int, str]]] = {}
    for site in graph_sites(gm):
        if site.kind == ATTENTION and len(site.nodes) == 2:
            qk, pv = site.nodes
            roles[qk] = (site, {0: "q", 1: "k"})
            roles[pv] = (site, {0: "p", 1: "v"})
        elif site.form in EXPERT_FORMS:
            node = next((n for n in gm.graph.nodes if n.name == site.node), None)
            if node is not None:
                weight = next((i for i in (1, 0) if _reads_stack(node.args[i])), 1)
                roles[site.node] = (site, {1 - weight: "activation", weight: "weight"})
        elif site.kind == LINEAR:
            roles[site.node] = (site, {0: "activation", 1: "weight"})
    return roles


def _reads_stack(node, depth: int = 6) -> bool:
    """Whether an expert product's operand is read from its stacked weight (a 3-D buffer or an
    `mxfx.dequantize`, through views and the gather) rather than from the activation."""
    for _ in range(depth):
        if not isinstance(node, fx.Node) or node.target is torch.ops.mxfx.fake_quantize.default:
            return False
        if node.op == "get_attr" or node.target is torch.ops.mxfx.dequantize.default:
            return getattr(node.meta.get("val"), "ndim", 0) == 3
        if node.op != "call_function" or not node.args:
            return False
        node = node.args[0]
    return False


# Between an expert input's fake-quantize and the product (the bmm form unsqueezes it).
_VIEWS = {torch.ops.aten.unsqueeze.default, torch.ops.aten.view.default, torch.ops.aten.reshape.default,
          torch.ops.aten._unsafe_view.default}


def _consumer(node: fx.Node, user: fx.Node) -> tuple[fx.Node, fx.Node]:
    """(the node that consumes `node` through `user`, the argument it reads): `user` itself, or the
    end of a single-user chain of views starting at it."""
    arg = node
    while user.target in _VIEWS and len(user.users) == 1:
        arg, user = user, next(iter(user.users))
    return user, arg


def _fallback_name(node: fx.Node) -> str:
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    return stack[-1][0] if stack else "<root>"


def _quantized_operands(node: fx.Node, env: dict, roles: dict) -> list[tuple[tuple[str, str], Tensor]]:
    """((site, operand), value) for each MX-quantized operand of `node` (empty for other nodes)."""
    ops = torch.ops.mxfx
    value = env.get
    if node.target is ops.fake_quantize.default:
        for user in node.users:  # which operand of which site this quantizes
            user, operand = _consumer(node, user)
            if user.name in roles:
                site, by_index = roles[user.name]
                for index, arg in enumerate(user.args):
                    if arg is operand and index in by_index:
                        return [((site.fqn, by_index[index]), value(op_arguments(node)["x"]))]
        return [((_fallback_name(node), "input"), value(op_arguments(node)["x"]))]
    site = site_of(node)
    name = site.fqn if site is not None else _fallback_name(node)
    if node.target is ops.linear.default:
        a = op_arguments(node)
        x, scales = value(a["x"]), value(a["weight_scales"])
        block, in_features = a["weight_block_size"], a["in_features"]
        nan_blocks = (scales == 0xFF).repeat_interleave(block, dim=-1)[..., :in_features]  # §5.4: 0xFF is NaN
        out = [((name, "weight"), torch.where(nan_blocks, math.nan, 0.0))]
        return out + ([((name, "activation"), x)] if a["act_format"] else [])
    if node.target is ops.attention.default:
        a = op_arguments(node)
        q, k, v, mask = (value(t) if isinstance(t, fx.Node) else t for t in (a["query"], a["key"], a["value"], a["attn_mask"]))
        is_causal, scale, gqa = a["is_causal"], a["scale"], a["enable_gqa"]
        q_spec, k_spec, v_spec, p_spec = a["query_spec"], a["key_spec"], a["value_spec"], a["probs_spec"]
        out = [((name, operand), tensor) for operand, tensor, spec in
               (("q", q, q_spec), ("k", k, k_spec), ("v", v, v_spec)) if spec]
        if p_spec:
            out.append(((name, "p"), _attention_probs(q, k, mask, is_causal, scale, gqa, q_spec, k_spec)))
        return out
    if site is not None and site.form in EXPERT_FORMS and site.quantized and site.weight is not None and node.name in roles:
        # the stacked weight as the product reads it: a block stored as NaN (packed: scale 0xFF) is NaN here
        index = next(i for i, role in roles[node.name][1].items() if role == "weight")
        return [((name, "weight"), value(node.args[index]))]
    if node.target is torch.ops.aten.linear.default and site is not None and site.quantized and site.weight is not None:
        # A simulated weight: the fake-quantized fp weight was stored when the module was prepared.
        return [((name, "weight"), value(node.args[1]))]
    return []


def _attention_probs(q, k, mask, is_causal, scale, enable_gqa, q_spec, k_spec) -> Tensor:
    """P = softmax(Q K^T * scale + mask) as `mxfx::attention` computes it before quantizing P."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(quantize_operand(q, q_spec), quantize_operand(k, k_spec).transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.float()
    return torch.softmax(scores, dim=-1)
