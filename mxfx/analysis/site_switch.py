"""Sites as the analysis layer sees them: the measured targets, a recorder of their operands, and a
switched copy of the graph in which each site's node can be quantized with a candidate in place.

The quantized linear and SDPA here (`quantized_linear`, `mx_sdpa`, `Switch`) re-create what
prepare's passes insert, with the public ops (`mxfx.fake_quantize`, `torch.ops.mxfx.attention`),
instead of running prepare per measurement: one switched graph copy serves every (site,
candidate) of a run. Measured on the nanoGPT sensitivity benchmark (`benchmarks/bench_sensitivity.py`,
2 cores): 61 -> 35 ms per isolated measurement and 135-159 -> 77 ms per all-but-one measurement
against preparing a module per measurement. `tests/test_sensitivity.py::
test_isolated_rows_equal_evaluate_of_each_site_alone` keeps the two constructions equal bit for bit (SDPA, matmul,
einsum and baddbmm attention; it fails with wrong axes).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from mxfx.analysis.candidates import Candidate
from mxfx.errors import MXValueError
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig, Rule
from mxfx.graph.prepare import find_sites
from mxfx.graph.sites import EXPERT_FORMS, LINEAR, NO_RULE, site_of
from mxfx.numerics.api import fake_quantize
from mxfx.passes.match_attention_sites import PRODUCTS, contraction_axes
from mxfx.passes.match_expert_sites import expert_product

_SDPA = torch.ops.aten.scaled_dot_product_attention.default


# --- sites -------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)  # hashed by identity: a dict key for configs
class Target:
    """One measured site: a name and kind, and the graph nodes (one per call) annotated with it."""

    fqn: str
    kind: str
    form: str
    nodes: list[str]
    weight_numel: int
    operand_nodes: list[str] = dataclasses.field(default_factory=list)  # explicit attention: QK^T, PV of each call


def measured_targets(gm: fx.GraphModule, kinds: Sequence[str], sites: Iterable[str] | None) -> tuple[list[Target], list[dict]]:
    """The sites to measure, in graph order, and the ones seen but not measurable (with why)."""
    found: dict[tuple[str, str], Target] = {}
    unmeasured: list[dict] = []
    for node in gm.graph.nodes:
        site = site_of(node)
        if site is None or site.kind not in kinds:
            continue
        if site.status != NO_RULE:  # unsupported / check failed: prepare would not quantize it
            unmeasured.append({"site": site.fqn, "kind": site.kind, "reason": f"{site.status}: {site.reason}"})
            continue
        target = found.setdefault((site.kind, site.fqn), Target(site.fqn, site.kind, site.form, [], site.weight_numel))
        target.nodes.append(node.name)
        target.operand_nodes.extend(site.nodes)
    targets = list(found.values())
    if sites is not None:
        wanted = list(dict.fromkeys(sites))
        missing = [name for name in wanted if name not in {t.fqn for t in targets}]
        if missing:
            known = sorted({t.fqn for t in targets})
            raise MXValueError(f"no measurable site named {missing} among the {', '.join(kinds)} sites: {known}")
        targets = [t for t in targets if t.fqn in wanted]
        unmeasured = [u for u in unmeasured if u["site"] in wanted]
    if not targets:
        raise MXValueError(f"no {' or '.join(kinds)} sites to measure")
    return targets, unmeasured


def _sdpa_args(args: tuple, kwargs: dict) -> dict:
    names = [a.name for a in _SDPA._schema.arguments]
    bound = {a.name: a.default_value for a in _SDPA._schema.arguments if a.has_default_value()}
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


class Recorder(fx.Interpreter):
    """Runs the high-precision graph and records, per site, the activation element count and
    (keep=True) the operands its quantized output is recomputed from; grad=True keeps each site
    output attached to the autograd graph (parameters are read detached: no weight gradients)."""

    def __init__(self, gm: fx.GraphModule, targets: list[Target], keep: bool, grad: bool) -> None:
        super().__init__(gm)
        self.by_node = {name: t for t in targets for name in t.nodes}
        self.operands = {name: t for t in targets for name in t.operand_nodes}
        self.keep, self.grad = keep, grad
        self.records: dict[str, list] = {t.fqn: [] for t in targets}
        self.numel: dict[str, int] = {t.fqn: 0 for t in targets}
        self.outputs: list[torch.Tensor] = []  # grad=True: the site outputs, in record order
        # explicit attention (keep=True): node -> its chain QK^T .. PV, and the values from outside
        # the chain that the chain reads (recorded while they are alive: the Interpreter frees values)
        self.chain_of: dict[fx.Node, list[fx.Node]] = {}
        self.pv_target: dict[fx.Node, Target] = {}
        self.outside: dict[int, dict[fx.Node, Any]] = {}
        if keep:
            by_name = {n.name: n for n in gm.graph.nodes}
            for t in targets:
                for qk, pv in zip(t.operand_nodes[::2], t.operand_nodes[1::2]):
                    chain = attention_chain(by_name[qk], by_name[pv])
                    for n in chain:
                        self.chain_of[n] = chain
                    self.pv_target[by_name[pv]] = t

    def fetch_attr(self, target: str):
        value = super().fetch_attr(target)
        return value.detach() if isinstance(value, torch.Tensor) else value

    def run_node(self, node: fx.Node):
        chain = self.chain_of.get(node)
        if chain is not None:
            values = self.outside.setdefault(id(chain), {})
            values.update({n: _detached(self.env[n]) for n in node.all_input_nodes if n not in self.chain_of})
        out = super().run_node(node)
        if node in self.pv_target:
            target = self.pv_target[node]
            out = self._keep_output(out)
            self.records[target.fqn].append((("explicit", chain, self.outside.pop(id(chain))), out))
        if node.name in self.operands:  # an explicit attention's QK^T or PV matmul
            args, _ = self.fetch_args_kwargs_from_env(node)
            tensors = args[1] if node.target is torch.ops.aten.einsum.default else args[:2]
            self.numel[self.operands[node.name].fqn] += sum(t.numel() for t in tensors)
        target = self.by_node.get(node.name)
        if target is None:
            return out
        args, kwargs = self.fetch_args_kwargs_from_env(node)
        if target.form in EXPERT_FORMS:  # a stacked expert weight applied per expert (grouped / bmm)
            axes = expert_axes(node)
            self.numel[target.fqn] += args[axes[0]].numel()
            record = ("experts", node.target, tuple(_detached(a) for a in args), dict(kwargs), axes)
        elif target.kind == LINEAR:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            self.numel[target.fqn] += x.numel()
            record = (LINEAR, x.detach(), w.detach(), None if bias is None else bias.detach())
        elif target.form == "sdpa":
            a = _sdpa_args(args, kwargs)
            q, k, v = a["query"], a["key"], a["value"]
            repeat = q.shape[-3] // k.shape[-3] if a["enable_gqa"] and k.dim() >= 3 else 1
            self.numel[target.fqn] += q.numel() + (k.numel() + v.numel()) * repeat + out.numel() // v.shape[-1] * k.shape[-2]
            mask = a["attn_mask"]
            record = ("sdpa", q.detach(), k.detach(), v.detach(), None if mask is None else mask.detach(),
                      bool(a["is_causal"]), a["scale"], bool(a["enable_gqa"]), float(a["dropout_p"]))
        else:
            record = None  # explicit attention: counted through its matmuls, recorded at its PV matmul
        if self.keep and record is not None:
            out = self._keep_output(out)
            self.records[target.fqn].append((record, out))
        return out

    def _keep_output(self, out):
        if self.grad and isinstance(out, torch.Tensor):
            if not out.requires_grad:  # no earlier site feeds it: a leaf is exact here
                out = out.detach().requires_grad_()
            self.outputs.append(out)
        return out


def _detached(value):
    return value.detach() if isinstance(value, torch.Tensor) else value


_MATMULS = (torch.ops.aten.matmul.default, torch.ops.aten.bmm.default)


def attention_chain(qk: fx.Node, pv: fx.Node) -> list[fx.Node]:
    """The nodes on the paths from an explicit attention's QK^T matmul to its PV matmul (both
    included), in graph order: what the local and gradient modes re-evaluate with quantized operands."""
    below, frontier = {qk}, [qk]
    while frontier:
        frontier = [u for n in frontier for u in n.users if u not in below and not below.add(u)]
    above, frontier = {pv}, [pv]
    while frontier:
        frontier = [i for n in frontier for i in n.all_input_nodes if i not in above and not above.add(i)]
    return [n for n in qk.graph.nodes if n in below and n in above]


def explicit_support(target: Target, gm: fx.GraphModule) -> str | None:
    """Why an explicit attention cannot be recomputed from its recorded chain, or None."""
    by_name = {n.name: n for n in gm.graph.nodes}
    for qk, pv in zip(target.operand_nodes[::2], target.operand_nodes[1::2]):
        if by_name[qk].target not in _MATMULS or by_name[pv].target not in _MATMULS:
            return "an einsum attention matmul (recomputed by model runs only: mode='isolated' or 'all-but-one')"
        if any(n.op != "call_function" for n in attention_chain(by_name[qk], by_name[pv])):
            return "a module call inside the attention chain"
    return None


def explicit_outputs(record: tuple, activation_format: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-evaluate an explicit attention chain without and with MX operands: Q and K blocked along
    the QK^T reduction axis (Q's last, K^T's second-to-last), P along its last axis and V along its
    second-to-last (the PV reduction axis), as `QuantizeAttentionPass` does (OCP MX v1.0 §6.2)."""
    _, chain, outside = record
    qk, pv = chain[0], chain[-1]
    results = []
    for fmt in (None, activation_format):
        env: dict[fx.Node, Any] = {}
        for node in chain:
            args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n] if n in env else outside[n])
            if fmt is not None and node in (qk, pv):
                args = (fake_quantize(args[0], fmt, block_size=block_size, axis=-1),
                        fake_quantize(args[1], fmt, block_size=block_size, axis=-2), *args[2:])
            env[node] = node.target(*args, **kwargs)
        results.append(env[pv])
    return results[0], results[1]


def quantized_linear(x, w, b, candidate: Candidate, block_size: int) -> torch.Tensor:
    """A linear site's output with the candidate's MX weight and activation, as prepare computes it."""
    weight_format, activation_format = candidate
    xq = x if activation_format is None else fake_quantize(x, activation_format, block_size=block_size)
    wq = w if weight_format is None else fake_quantize(w, weight_format, block_size=block_size)
    return F.linear(xq, wq, b)


def expert_axes(node: fx.Node) -> tuple[int, int, int, int]:
    """(activation position, its in_features axis, weight position, its in_features axis) of an
    expert product (`passes/match_expert_sites.py`)."""
    product = expert_product(node)
    return product.x_index, product.x_axis, product.w_index, product.w_axis


def quantized_experts(op, args, kwargs, axes, candidate: Candidate, block_size: int) -> torch.Tensor:
    """An expert site's output with the candidate's MX weight and activation, as prepare computes
    it: the activation per token and each expert matrix, both along in_features (OCP MX v1.0 §6.3)."""
    x_index, x_axis, w_index, w_axis = axes
    weight_format, activation_format = candidate
    args = list(args)
    if activation_format is not None:
        args[x_index] = fake_quantize(args[x_index], activation_format, block_size=block_size, axis=x_axis)
    if weight_format is not None:
        args[w_index] = fake_quantize(args[w_index], weight_format, block_size=block_size, axis=w_axis)
    return op(*args, **kwargs)


def mx_sdpa(q, k, v, mask, is_causal, scale, gqa, dropout_p, activation_format: str | None, block_size: int):
    """An SDPA site's output through `mxfx.attention` (no format: its high-precision reference)."""
    if dropout_p != 0.0:  # mxfx.attention has no dropout, and prepare leaves such a site alone
        raise MXValueError(f"an SDPA site has dropout_p={dropout_p}; measure a model whose attention dropout is off")
    spec = "" if activation_format is None else MXSpec(activation_format, block_size).to_arg()
    return torch.ops.mxfx.attention(q, k, v, mask, is_causal, scale, gqa, spec, spec, spec, spec)


def site_outputs(record: tuple, candidate: Candidate, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high-precision output, output with the candidate's quantization) of one recorded site call."""
    if record[0] == "explicit":
        return explicit_outputs(record, candidate[1], block_size)
    if record[0] == "experts":
        _, op, args, kwargs, axes = record
        return op(*args, **kwargs), quantized_experts(op, args, kwargs, axes, candidate, block_size)
    if record[0] == LINEAR:
        _, x, w, b = record
        return F.linear(x, w, b), quantized_linear(x, w, b, candidate, block_size)
    sdpa = record[1:]
    return mx_sdpa(*sdpa, None, block_size), mx_sdpa(*sdpa, candidate[1], block_size)


class Switch(torch.nn.Module):
    """A site's node in the switched graph (`switched_graph`): the node's own op while `candidate` is
    None, else that op with the candidate's MX operands, as prepare's passes insert them (linear:
    fake-quantized input and weight; SDPA: `mxfx.attention`; an explicit attention's QK^T or PV
    product: each operand fake-quantized along its reduction axis, OCP MX v1.0 §6.2)."""

    def __init__(self, target: Target, node: fx.Node, block_size: int) -> None:
        super().__init__()
        self.target, self.op, self.block_size = target, node.target, block_size
        self.axes = contraction_axes(node) if node.target in PRODUCTS else None
        self.expert_axes = expert_axes(node) if target.form in EXPERT_FORMS else None
        self.candidate: Candidate | None = None

    def forward(self, *args, **kwargs):
        candidate = self.candidate
        if candidate is None:
            return self.op(*args, **kwargs)
        if self.expert_axes is not None:
            return quantized_experts(self.op, args, kwargs, self.expert_axes, candidate, self.block_size)
        if self.target.kind == LINEAR:
            return quantized_linear(args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias"), candidate,
                                     self.block_size)
        if self.op is _SDPA:
            a = _sdpa_args(args, kwargs)
            return mx_sdpa(a["query"], a["key"], a["value"], a["attn_mask"], bool(a["is_causal"]), a["scale"],
                            bool(a["enable_gqa"]), float(a["dropout_p"]), candidate[1], self.block_size)
        def quantized(operands):
            return [fake_quantize(t, candidate[1], block_size=self.block_size, axis=axis)
                    for t, axis in zip(operands, self.axes)]

        if self.op is torch.ops.aten.einsum.default:  # einsum(equation, [left, right])
            return self.op(args[0], quantized(args[1]), *args[2:], **kwargs)
        first = 1 if self.op is torch.ops.aten.baddbmm.default else 0  # baddbmm(input, batch1, batch2)
        return self.op(*args[:first], *quantized(args[first:first + 2]), *args[first + 2:], **kwargs)


def switched_graph(program, targets: list[Target], block_size: int) -> tuple[fx.GraphModule, list[Switch]]:
    """One copy of the exported graph in which every node of every target site is a `Switch`:
    setting switches' candidates quantizes those sites, with no new graph per measurement."""
    gm = program.module()
    find_sites(gm)  # canonicalized and annotated as the measured graph was: the same node names
    by_name = {n.name: n for n in gm.graph.nodes}
    switches = []
    for target in targets:
        names = target.nodes if target.kind == LINEAR or target.form == "sdpa" else target.operand_nodes
        for name in names:
            node = by_name.get(name)
            site = None if node is None else site_of(node)
            if node is None or (site is not None and site.fqn != target.fqn):
                raise MXValueError(f"internal: site {target.fqn!r} has no node {name!r} in the switched graph")
            switch = Switch(target, node, block_size)
            module_name = f"mxfx_switch_{len(switches)}"
            gm.add_submodule(module_name, switch)
            with gm.graph.inserting_before(node):
                call = gm.graph.call_module(module_name, node.args, node.kwargs)
            call.meta = dict(node.meta)
            node.replace_all_uses_with(call)
            gm.graph.erase_node(node)
            switches.append(switch)
    gm.recompile()
    return gm, switches


def config_for(chosen: dict[Target, Candidate], block_size: int) -> QuantConfig:
    """One rule per site (re.escape'd name); a linear and an attention site of one name share it."""
    fields: dict[str, dict] = {}
    for target, (weight, activation) in chosen.items():
        entry = fields.setdefault(target.fqn, {})
        if target.kind == LINEAR:
            entry["weight"] = None if weight is None else MXSpec(weight, block_size)
            entry["activation"] = None if activation is None else MXSpec(activation, block_size)
        elif activation is not None:
            spec = MXSpec(activation, block_size)
            entry["attention"] = AttentionSpec(query=spec, key=spec, value=spec, probs=spec)
    rules = [Rule(match=re.escape(fqn), **entry) for fqn, entry in fields.items() if entry]
    return QuantConfig(tuple(rules) or (Rule(match=".*", skip=True),), source="<mxfx.sensitivity>")


