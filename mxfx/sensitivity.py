"""Per-site sensitivity: which linear and attention sites can take which MX formats.

    report = mxfx.sensitivity(model, batches, candidates=[("fp4_e2m1", "fp8_e4m3"), ("fp8_e4m3", "fp8_e4m3")],
                              mode="gradient")
    print(report.table())                        # most sensitive (site, candidate) first

A *candidate* is a (weight format, activation format) pair; None keeps that operand in high
precision; `formats=["fp8_e4m3", ...]` is shorthand for `[(f, f), ...]`. A linear site quantizes
its weight and its input with the pair. An attention site has no weight: the candidate's
*activation* format quantizes Q, K, V and P together (the weight format is unused there), and a
candidate without an activation format leaves it exactly unchanged (its row says so: zero error,
nothing measured).

Modes (each row's `loss` is the mode's additive estimate of the damage to the model output, the
quantity a mixed-precision search minimizes):
- `local`: one high-precision pass records every site's inputs; each (site, candidate) output is
  recomputed with quantized operands and compared with the high-precision one. No model re-runs.
  Metrics describe the site's own output (`kl` is None: a site output is not a distribution);
  `loss` = that site-output MSE (not weighted by how much the model output cares).
- `isolated`: one model run per (site, candidate) with only that site quantized; metrics compare
  the model's primary output; `loss` = model-output MSE.
- `all-but-one`: every measured site quantized with the candidate except one; metrics compare the
  model's primary output of that mix; `loss` = the site's marginal damage, MSE(all quantized) -
  MSE(all but this site) (can be slightly negative); sorting puts the exclusion that helps most first.
- `gradient`: one forward + backward per batch (per projection, see below) records every site's
  inputs and the gradient G = dL/dY of a scalar L with respect to the site's output Y; each
  (site, candidate) is scored from its own output error, no model re-runs (a second-order Taylor
  expansion with the Fisher information for the Hessian, as NVIDIA ModelOpt's auto_quantize):
  `loss` = sum over batches of sum(G^2 * (Yq - Y)^2). L is `loss_fn(output, batch)` when given;
  by default, 4 fixed-seed random projections s_r = <p_r, output> of the primary output, p_r with
  N(0, 1/numel) entries, each differentiated on its own and the scores averaged: for G = J^T p,
  E[G_i^2] = (J^T J)_ii / numel, so the score is the diagonal approximation of the first-order
  model-output MSE |J (Yq - Y)|^2 / numel that the quantization error of the site causes: it needs
  no labels and works for any model. Other metric columns describe the site's own output, as in
  `local`; `kl` is None.

Noise floor (`noise=N`, isolated and all-but-one modes): a row's number is a model-output
measurement, and a last-bit difference in a non-MX op (compiled vs eager, another batch size)
can move it (`mxfx.noise`). For each candidate, the model with *every* measured site quantized
with it (all-but-one's reference, the configuration with the most quantizers any row measures)
is re-measured under N 1-ulp jitters of every MX quantizer's input (plus a batch split) and the
spread of each metric is recorded; the `loss` floor is the spread of its MSE. A row is *within
the floor* when |loss| <= that floor: its damage (isolated: the model-output MSE against the
unquantized model; all-but-one: MSE(all) - MSE(all but this site)) cannot be told from no change.
Then every metric of the row is marked `~` in `table()`/`to_markdown()` (the CSV has a
`within_floor` column, the plot greys the cell). Why this definition: the unquantized model has
no MX quantizer, so its own spread under jitter is 0 and says nothing; the all-quantized model's
spread bounds the noise of any configuration with fewer quantizers. The test is made on the
loss, which is linear in the error energy, because that is what the spread transfers for: SQNR
and rel_error are the log and square root of the error energy, and their spreads at the
all-quantized operating point do not carry over to a near-zero error. `local` and `gradient`
re-run no model: their floor is None with the reason, never 0.

Metric definitions: `mxfx.metrics`. Runs can be resumed (`resume=path`): the file records
everything that defines the run and a changed run is refused. Work is sharded over
`torch.distributed` ranks when run under torchrun (`mxfx.distributed`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tabulate import tabulate
from torch import fx
from torch.utils import _pytree as pytree

from mxfx import distributed
from mxfx.api import fake_quantize
from mxfx.config import AttentionSpec, MXSpec, QuantConfig, Rule, load_config
from mxfx.errors import MXTypeError, MXValueError
from mxfx.export import export
from mxfx.formats import get_format
from mxfx.metrics import HIGHER_IS_BETTER, METRICS, MetricAccumulator
from mxfx.noise import WITHIN_FLOOR, check_arguments, noise_floor, significant
from mxfx.passes.match_attention_sites import PRODUCTS, contraction_axes
from mxfx.prepare import prepare
from mxfx.sites import ATTENTION, KINDS, LINEAR, NO_RULE, find_sites, site_of

log = logging.getLogger(__name__)
MODES = ("local", "isolated", "all-but-one", "gradient")
SORT_KEYS = ("loss", *METRICS)
DEFAULT_FORMATS = ("fp8_e4m3", "fp6_e2m3", "fp4_e2m1", "int8")
PROJECTIONS, PROJECTION_SEED = 4, 0  # gradient mode's default scalar (module docstring)
COLUMNS = ("site", "kind", "weight_format", "activation_format", "format", "mode", "weight_numel",
           "activation_numel", "loss", "sqnr", "mse", "cosine", "kl", "rel_error")
_FILE_VERSION = 2
_SDPA = torch.ops.aten.scaled_dot_product_attention.default

Candidate = tuple[str | None, str | None]


# --- candidates --------------------------------------------------------------------------------


def _format_or_none(name: str | None) -> str | None:
    return None if name is None else get_format(name).name


def _candidates(formats: Iterable[str] | None, candidates: Iterable[Sequence] | None, activations: bool) -> list[Candidate]:
    if formats is not None and candidates is not None:
        raise MXValueError("pass formats= or candidates=, not both")
    if candidates is None:
        formats = list(DEFAULT_FORMATS if formats is None else ([formats] if isinstance(formats, str) else formats))
        candidates = [(f, f if activations else None) for f in formats]
    out: list[Candidate] = []
    for candidate in candidates:
        if isinstance(candidate, str) or len(candidate) != 2:
            raise MXValueError(f"a candidate is a (weight format, activation format) pair, got {candidate!r}")
        pair = (_format_or_none(candidate[0]), _format_or_none(candidate[1]))
        if pair == (None, None):
            raise MXValueError("the candidate (None, None) quantizes nothing")
        if pair in out:
            raise MXValueError(f"candidate {candidate_label(pair)} is listed twice")
        out.append(pair)
    if not out:
        raise MXValueError("no candidates to measure")
    return out


def candidate_label(candidate: Candidate) -> str:
    """"fp8_e4m3" for (fp8_e4m3, fp8_e4m3); "fp4_e2m1:fp8_e4m3" otherwise ("none" = high precision),
    the syntax of the CLI's --candidates."""
    weight, activation = candidate
    return weight if weight == activation else f"{weight or 'none'}:{activation or 'none'}"


def parse_candidates(text: str) -> list[Candidate]:
    """'fp4_e2m1:fp8_e4m3,fp8_e4m3' -> [("fp4_e2m1", "fp8_e4m3"), ("fp8_e4m3", "fp8_e4m3")]."""
    out = []
    for item in text.split(","):
        weight, sep, activation = item.strip().partition(":")
        pair = (weight, activation if sep else weight)
        out.append(tuple(None if p.lower() in ("none", "") else p for p in pair))
    return out


# --- inputs and outputs ------------------------------------------------------------------------


def _primary_output(output: Any) -> torch.Tensor:
    """The first floating-point tensor in a model output (logits, last_hidden_state, ...)."""
    for leaf in pytree.tree_leaves(output if not hasattr(output, "to_tuple") else output.to_tuple()):
        if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
            return leaf
    raise MXValueError("the model output holds no floating-point tensor to compare")


def as_batches(inputs, caller: str = "sensitivity") -> list[tuple]:
    """One batch (a tensor or a tuple of positional inputs) or an iterable of them, as a list of
    tuples; `caller` names the function in the errors (sensitivity, search, evaluate)."""
    if isinstance(inputs, dict):
        raise MXTypeError(f"{caller} takes positional inputs: a tensor, a tuple of them, or a list of such batches")
    if isinstance(inputs, torch.Tensor):
        return [(inputs,)]
    if isinstance(inputs, tuple):
        return [inputs]
    batches = [b if isinstance(b, tuple) else (b,) for b in inputs]
    if not batches:
        raise MXValueError(f"{caller} needs at least one input batch")
    return batches


def _structured(gm: fx.GraphModule, flat: Any) -> Any:
    """An Interpreter's flat output in the model's output structure."""
    spec = getattr(gm, "_out_spec", None)
    if spec is None or spec.is_leaf() or pytree.tree_structure(flat) == spec:
        return flat  # already structured (e.g. a Hugging Face ModelOutput)
    return pytree.tree_unflatten(list(flat), spec)


# --- sites -------------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)  # hashed by identity: a dict key for configs
class _Target:
    """One measured site: a name and kind, and the graph nodes (one per call) annotated with it."""

    fqn: str
    kind: str
    form: str
    nodes: list[str]
    weight_numel: int
    operand_nodes: list[str] = dataclasses.field(default_factory=list)  # explicit attention: QK^T, PV of each call


def _targets(gm: fx.GraphModule, kinds: Sequence[str], sites: Iterable[str] | None) -> tuple[list[_Target], list[dict]]:
    """The sites to measure, in graph order, and the ones seen but not measurable (with why)."""
    found: dict[tuple[str, str], _Target] = {}
    unmeasured: list[dict] = []
    for node in gm.graph.nodes:
        site = site_of(node)
        if site is None or site.kind not in kinds:
            continue
        if site.status != NO_RULE:  # unsupported / check failed: prepare would not quantize it
            unmeasured.append({"site": site.fqn, "kind": site.kind, "reason": f"{site.status}: {site.reason}"})
            continue
        target = found.setdefault((site.kind, site.fqn), _Target(site.fqn, site.kind, site.form, [], site.weight_numel))
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


class _Recorder(fx.Interpreter):
    """Runs the high-precision graph and records, per site, the activation element count and
    (keep=True) the operands its quantized output is recomputed from; grad=True keeps each site
    output attached to the autograd graph (parameters are read detached: no weight gradients)."""

    def __init__(self, gm: fx.GraphModule, targets: list[_Target], keep: bool, grad: bool) -> None:
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
        self.pv_target: dict[fx.Node, _Target] = {}
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
        if target.kind == LINEAR:
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


def _explicit_support(target: _Target, gm: fx.GraphModule) -> str | None:
    """Why an explicit attention cannot be recomputed from its recorded chain, or None."""
    by_name = {n.name: n for n in gm.graph.nodes}
    for qk, pv in zip(target.operand_nodes[::2], target.operand_nodes[1::2]):
        if by_name[qk].target not in _MATMULS or by_name[pv].target not in _MATMULS:
            return "an einsum attention matmul (recomputed by model runs only: mode='isolated' or 'all-but-one')"
        if any(n.op != "call_function" for n in attention_chain(by_name[qk], by_name[pv])):
            return "a module call inside the attention chain"
    return None


def _explicit_outputs(record: tuple, activation_format: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
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


def _quantized_linear(x, w, b, candidate: Candidate, block_size: int) -> torch.Tensor:
    """A linear site's output with the candidate's MX weight and activation, as prepare computes it."""
    weight_format, activation_format = candidate
    xq = x if activation_format is None else fake_quantize(x, activation_format, block_size=block_size)
    wq = w if weight_format is None else fake_quantize(w, weight_format, block_size=block_size)
    return F.linear(xq, wq, b)


def _mx_sdpa(q, k, v, mask, is_causal, scale, gqa, dropout_p, activation_format: str | None, block_size: int):
    """An SDPA site's output through `mxfx.attention` (no format: its high-precision reference)."""
    if dropout_p != 0.0:  # mxfx.attention has no dropout, and prepare leaves such a site alone
        raise MXValueError(f"an SDPA site has dropout_p={dropout_p}; measure a model whose attention dropout is off")
    spec = "" if activation_format is None else MXSpec(activation_format, block_size).to_arg()
    return torch.ops.mxfx.attention(q, k, v, mask, is_causal, scale, gqa, spec, spec, spec, spec)


def _site_outputs(record: tuple, candidate: Candidate, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high-precision output, output with the candidate's quantization) of one recorded site call."""
    if record[0] == "explicit":
        return _explicit_outputs(record, candidate[1], block_size)
    if record[0] == LINEAR:
        _, x, w, b = record
        return F.linear(x, w, b), _quantized_linear(x, w, b, candidate, block_size)
    sdpa = record[1:]
    return _mx_sdpa(*sdpa, None, block_size), _mx_sdpa(*sdpa, candidate[1], block_size)


class _Switch(torch.nn.Module):
    """A site's node in the switched graph (`_switched`): the node's own op while `candidate` is
    None, else that op with the candidate's MX operands, as prepare's passes insert them (linear:
    fake-quantized input and weight; SDPA: `mxfx.attention`; an explicit attention's QK^T or PV
    product: each operand fake-quantized along its reduction axis, OCP MX v1.0 §6.2)."""

    def __init__(self, target: _Target, node: fx.Node, block_size: int) -> None:
        super().__init__()
        self.target, self.op, self.block_size = target, node.target, block_size
        self.axes = contraction_axes(node) if node.target in PRODUCTS else None
        self.candidate: Candidate | None = None

    def forward(self, *args, **kwargs):
        candidate = self.candidate
        if candidate is None:
            return self.op(*args, **kwargs)
        if self.target.kind == LINEAR:
            return _quantized_linear(args[0], args[1], args[2] if len(args) > 2 else kwargs.get("bias"), candidate,
                                     self.block_size)
        if self.op is _SDPA:
            a = _sdpa_args(args, kwargs)
            return _mx_sdpa(a["query"], a["key"], a["value"], a["attn_mask"], bool(a["is_causal"]), a["scale"],
                            bool(a["enable_gqa"]), float(a["dropout_p"]), candidate[1], self.block_size)
        def quantized(operands):
            return [fake_quantize(t, candidate[1], block_size=self.block_size, axis=axis)
                    for t, axis in zip(operands, self.axes)]

        if self.op is torch.ops.aten.einsum.default:  # einsum(equation, [left, right])
            return self.op(args[0], quantized(args[1]), *args[2:], **kwargs)
        first = 1 if self.op is torch.ops.aten.baddbmm.default else 0  # baddbmm(input, batch1, batch2)
        return self.op(*args[:first], *quantized(args[first:first + 2]), *args[first + 2:], **kwargs)


def _switched(program, targets: list[_Target], block_size: int) -> tuple[fx.GraphModule, list[_Switch]]:
    """One copy of the exported graph in which every node of every target site is a `_Switch`:
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
            switch = _Switch(target, node, block_size)
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


def _config_for(chosen: dict[_Target, Candidate], block_size: int) -> QuantConfig:
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


# --- fingerprints for resume -------------------------------------------------------------------


def _digest(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
    return h.hexdigest()[:16]


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _batch_fingerprint(batches: list[tuple]) -> dict:
    shapes, parts = [], []
    for batch in batches:
        leaves = pytree.tree_leaves(batch)
        shapes.append([f"{tuple(x.shape)}:{str(x.dtype).removeprefix('torch.')}" if isinstance(x, torch.Tensor)
                       else type(x).__name__ for x in leaves])
        parts += [_tensor_bytes(x) if isinstance(x, torch.Tensor) else repr(x).encode() for x in leaves]
    return {"shapes": shapes, "hash": _digest(*parts)}


def _parameter_fingerprint(model: torch.nn.Module) -> dict:
    """name -> digest of (shape, dtype, sum, sum of |x|, a strided sample of <= 64 elements): cheap
    on large models, and any edit that matters for a report changes it."""
    out = {}
    for name, t in model.state_dict(keep_vars=False).items():
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64]
        stats = (flat.double().sum().item(), flat.double().abs().sum().item()) if flat.is_floating_point() else (flat.sum().item(),)
        out[name] = _digest(tuple(t.shape), str(t.dtype), stats, _tensor_bytes(sample))
    return out


def _callable_identity(fn: Callable | None) -> str:
    if fn is None:
        return f"default: {PROJECTIONS} random projections of the primary output, seed {PROJECTION_SEED}"
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"
    code = getattr(fn, "__code__", None)
    return name if code is None else f"{name} (code {_digest(code.co_code, code.co_consts)})"


def _run_fingerprint(model, batches, mode, candidates, block_size, targets, kinds, loss_fn, noise=0, noise_sources=()) -> dict:
    compared = {"local": "site output", "gradient": "site output, gradient-weighted"}.get(mode, "model primary output")
    return {
        "mode": mode,
        "candidates": [list(c) for c in candidates],
        "block_size": block_size,
        "scale_mode/rounding": "floor/even",
        "sites": [f"{t.kind}:{t.fqn}" for t in targets],
        "kinds": list(kinds),
        "metric_inputs": compared,
        "loss_fn": _callable_identity(loss_fn) if mode == "gradient" else None,
        "batches": _batch_fingerprint(batches),
        "parameters": _parameter_fingerprint(model),
        # None for noise=0, as in files written before the noise floor existed (they still resume)
        "noise": {"runs": noise, "sources": list(noise_sources)} if noise else None,
    }


def _check_same_run(saved: dict | None, current: dict, path: Path) -> None:
    if saved is None:
        raise MXValueError(f"{path} records no run fingerprint (written by an older mxfx?); delete it or pick another path")
    differing = [key for key in current if saved.get(key) != current[key]]
    if not differing:
        return
    details = []
    for key in differing:
        if key == "parameters":
            old, new = saved.get(key) or {}, current[key]
            names = [n for n in dict.fromkeys([*new, *old]) if old.get(n) != new.get(n)]
            details.append(f"parameters ({len(names)} differ, first {names[0]!r})")
        elif key == "batches":
            details.append("batches (" + ("shapes/dtypes" if saved[key].get("shapes") != current[key]["shapes"] else "contents") + ")")
        else:
            details.append(f"{key} ({saved.get(key)!r} != {current[key]!r})")
    raise MXValueError(f"cannot resume from {path}: it was written by another run; differing: {'; '.join(details)}. "
                       "Delete the file or pass another resume path.")


def _read_resume(path: Path, fingerprint: dict) -> dict[tuple, dict]:
    rows: dict[tuple, dict] = {}
    files = [path] if path.is_file() else []
    files += sorted(path.parent.glob(f"{path.name}.rank*"))  # partial files of an interrupted sharded run
    for file in files:
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as error:
            raise MXValueError(f"cannot resume from {file}: not a sensitivity report ({error})") from None
        _check_same_run(data.get("run"), fingerprint, file)
        for row in data["rows"]:
            rows[_row_key(row)] = row
    return rows


def _row_key(row: dict) -> tuple:
    return row["kind"], row["site"], row["weight_format"], row["activation_format"]


def _write_json(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)  # atomic: an interrupt never leaves half a file


# --- the report --------------------------------------------------------------------------------


@dataclasses.dataclass
class SensitivityReport:
    """One row per (site, candidate): see `COLUMNS`; metrics a mode cannot compute are None."""

    rows: list[dict]
    mode: str
    metric: str = "loss"  # the sort key: loss or one of mxfx.metrics.METRICS
    candidates: list[Candidate] = dataclasses.field(default_factory=list)
    unmeasured: list[dict] = dataclasses.field(default_factory=list)  # {site, kind, reason}
    run: dict = dataclasses.field(default_factory=dict)  # what defines the run (resume checks it)
    # sensitivity(noise=N): {} when not measured; else {"runs": N, "sources": [...], "floor": {candidate
    # label: {"loss": ..., metric: spread}} or None, "reason": why floor is None, "measurements": {label:
    # NoiseFloor.to_dict() of the all-sites-quantized model}}
    noise: dict = dataclasses.field(default_factory=dict)

    def floor(self, candidate: Sequence) -> dict | None:
        """metric -> noise floor for a candidate ((weight, activation) pair or label); None when not measured."""
        floors = self.noise.get("floor") if self.noise else None
        if floors is None:
            return None
        return floors.get(candidate if isinstance(candidate, str) else candidate_label(tuple(candidate)))

    def within_floor(self, row: dict) -> bool | None:
        """Whether a row's loss is within the noise floor of no change (|loss| <= the loss floor of
        its candidate, module docstring); None when no floor was measured or the loss was not computed."""
        floor = self.floor((row["weight_format"], row["activation_format"]))
        if floor is None or row.get("loss") is None:
            return None
        return not significant(row["loss"], 0.0, floor["loss"])

    def _rendered(self, row: dict, metric: str, within: bool | None):
        value = row.get(metric)
        if value is None:
            return None
        return format(value, ".4g") + (WITHIN_FLOOR if within else "")

    def _noise_lines(self) -> list[str]:
        if not self.noise:
            return ["noise floor not measured (noise=0): differences are not checked against it"]
        if self.noise.get("floor") is None:
            return [f"noise floor: not computed: {self.noise.get('reason')}"]
        first = next(iter(self.noise["measurements"].values()), {"runs": [], "skipped": []})
        labels = [label for label, _ in first["runs"]]
        runs = (f"{sum(x.startswith('jitter') for x in labels)} jitter(s)" + "".join(f" + {x}" for x in labels if not
                x.startswith("jitter")) + "".join(f" ({source} skipped: {why})" for source, why in first["skipped"]))
        lines = [f"noise floor ({runs}; spread of the model with every measured site quantized with the candidate); "
                 f"{WITHIN_FLOOR}: the row's |loss| is within its candidate's loss floor, not distinguishable from no change:"]
        for label, floor in self.noise["floor"].items():
            lines.append(f"  {label}: " + ", ".join(f"{m} {floor[m]:.3g}" for m in ("loss", *METRICS) if floor.get(m) is not None))
        return lines

    def _severity(self, row: dict, metric: str) -> float | None:
        """Higher = more sensitive, for any metric and mode; None when not computed."""
        value = row.get(metric)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if metric == "loss":
            return value
        worse_when_higher = not HIGHER_IS_BETTER[metric]
        if self.mode == "all-but-one":  # metrics of the model *without* this site: better = it mattered
            worse_when_higher = not worse_when_higher
        return value if worse_when_higher else -value

    def sorted_rows(self, metric: str | None = None) -> list[dict]:
        """Most sensitive first (all-but-one: the site whose exclusion helps most first); rows whose
        metric was not computed last; ties by site name, then candidate order."""
        metric = metric or self.metric
        order = {c: i for i, c in enumerate(self.candidates)}

        def key(row):
            severity = self._severity(row, metric)
            return (severity is None, -(severity or 0.0), row["site"],
                    order.get((row["weight_format"], row["activation_format"]), len(order)), row["kind"])

        return sorted(self.rows, key=key)

    def table(self, tablefmt: str = "simple") -> str:
        headers = ["site", "kind", "weight_format", "activation_format", "loss", *METRICS]
        marked = bool(self.noise) and self.noise.get("floor") is not None
        body = [[r.get(h) if h not in ("loss", *METRICS) or not marked else self._rendered(r, h, self.within_floor(r))
                 for h in headers] for r in self.sorted_rows()]
        text = tabulate(body, headers=[h.removesuffix("_format") for h in headers], tablefmt=tablefmt, floatfmt=".4g",
                        missingval="-", disable_numparse=marked)
        if self.noise:
            text += "\n" + "\n".join(self._noise_lines())
        for entry in self.unmeasured:
            text += f"\nnot measured: {entry['site']} ({entry['kind']}): {entry['reason']}"
        return text

    def to_markdown(self) -> str:
        return self.table("github")

    def to_csv(self) -> str:
        """The rows as CSV (numbers stay numbers); with a noise floor, a `within_floor` column says
        (True/False) whether the row is within the floor of no change (where the table shows `~`)."""
        marked = bool(self.noise) and self.noise.get("floor") is not None
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[*COLUMNS, *(["within_floor"] if marked else [])], extrasaction="ignore")
        writer.writeheader()
        for row in self.sorted_rows():
            if marked:
                row = {**row, "within_floor": self.within_floor(row)}
            writer.writerow(row)
        return out.getvalue()

    def to_json(self) -> str:
        return json.dumps({"version": _FILE_VERSION, "mode": self.mode, "metric": self.metric,
                           "candidates": [list(c) for c in self.candidates], "rows": self.rows,
                           "unmeasured": self.unmeasured, "run": self.run, "noise": self.noise}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> SensitivityReport:
        data = json.loads(text)
        if data.get("version") != _FILE_VERSION:
            raise MXValueError(f"not a version-{_FILE_VERSION} mxfx sensitivity report")
        return cls(data["rows"], data["mode"], data.get("metric", "loss"), [tuple(c) for c in data["candidates"]],
                   data.get("unmeasured", []), data.get("run", {}), data.get("noise") or {})

    def value(self, site: str, candidate: str | Sequence, metric: str | None = None, kind: str | None = None) -> float | None:
        """The metric of one row; `candidate` is a (weight, activation) pair or a format f for (f, f)."""
        pair = (candidate, candidate) if isinstance(candidate, str) else tuple(candidate)
        pair = (_format_or_none(pair[0]), _format_or_none(pair[1]))
        for row in self.rows:
            if row["site"] == site and (row["weight_format"], row["activation_format"]) == pair and kind in (None, row["kind"]):
                return row[metric or self.metric]
        raise KeyError(f"no row for site {site!r} and candidate {candidate_label(pair)}")

    def plot(self, path: str | Path) -> Path:
        """A heat map of sites x candidates (the report's metric) to PNG/SVG; needs matplotlib.

        Uses matplotlib's object-oriented `Figure` API: no pyplot state, the global backend is untouched.
        """
        try:
            from matplotlib.figure import Figure
            from matplotlib.patches import Rectangle
        except ImportError:
            raise MXValueError("plot needs matplotlib: pip install matplotlib") from None
        sites = list(dict.fromkeys((r["kind"], r["site"]) for r in self.rows))
        pairs = self.candidates or list(dict.fromkeys((r["weight_format"], r["activation_format"]) for r in self.rows))
        labels = [candidate_label(c) for c in pairs]
        grid = [[math.nan] * len(labels) for _ in sites]
        index = {s: i for i, s in enumerate(sites)}
        for row in self.rows:
            value = row.get(self.metric)
            column = labels.index(candidate_label((row["weight_format"], row["activation_format"])))
            grid[index[(row["kind"], row["site"])]][column] = math.nan if value is None else value
        fig = Figure(figsize=(2.0 + 1.2 * len(labels), 1.0 + 0.35 * len(sites) + (0.6 if self.noise else 0.0)))
        ax = fig.subplots()
        image = ax.imshow(grid, aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_yticks(range(len(sites)), [f"{name} ({kind[0]})" for kind, name in sites])
        within = {(index[(r["kind"], r["site"])], labels.index(candidate_label((r["weight_format"], r["activation_format"]))))
                  for r in self.rows if self.within_floor(r)}
        for i, j in within:  # within the noise floor of no change: greyed out
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor="0.75", edgecolor="0.6", zorder=2))
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                text = "-" if math.isnan(v) else f"{v:.3g}" + (WITHIN_FLOOR if (i, j) in within else "")
                ax.text(j, i, text, ha="center", va="center", color="0.2" if (i, j) in within else "white", fontsize=7,
                        zorder=3)
        fig.colorbar(image, ax=ax, label=self.metric)
        note = {True: f"\ngrey, {WITHIN_FLOOR}: within the noise floor of no change", False: "\nnoise floor not computed"}
        ax.set_title(f"mxfx sensitivity ({self.mode}, {self.metric})"
                     + ("" if not self.noise else note[self.noise.get("floor") is not None]), fontsize=9)
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path)
        return path


def _progress_logger(done: int, total: int, elapsed: float, label: str) -> None:
    eta = elapsed / done * (total - done) if done else float("nan")
    log.info("sensitivity %d/%d (%s), %.1f s elapsed, ~%.1f s left", done, total, label, elapsed, eta)


# --- measuring ---------------------------------------------------------------------------------


def sensitivity(
    model: torch.nn.Module,
    inputs,
    formats: Iterable[str] | None = None,
    *,
    candidates: Iterable[Sequence] | None = None,
    mode: str = "local",
    metric: str = "loss",
    sites: Iterable[str] | None = None,
    kinds: Sequence[str] = (LINEAR, ATTENTION),
    block_size: int = 32,
    loss_fn: Callable[[Any, tuple], torch.Tensor] | None = None,
    activations: bool = True,
    strict: bool = False,
    progress: Callable[[int, int, float, str], None] | None = _progress_logger,
    resume: str | Path | None = None,
    noise: int = 0,
    noise_sources: Sequence[str] = ("jitter", "split"),
) -> SensitivityReport:
    """Measure how much each linear and attention site loses under each candidate MX format pair.

    Args:
        model: the model (not modified; exported once, in eval mode).
        inputs: one batch (a tensor or a tuple of positional inputs) or an iterable of batches;
            metrics aggregate over all of them.
        formats: element formats f, shorthand for the candidates (f, f) (default: fp8_e4m3,
            fp6_e2m3, fp4_e2m1, int8).
        candidates: (weight format, activation format) pairs; None keeps an operand in high
            precision. Attention sites use the activation format for Q, K, V and P.
        mode: "local", "isolated", "all-but-one" or "gradient" (see the module docstring).
        metric: the sort key: "loss" (the mode's damage estimate) or sqnr, mse, cosine, kl, rel_error.
        sites: only these site names (default: every site of `kinds`).
        kinds: which site kinds to measure: "linear", "attention".
        block_size: MX block size of every quantized operand.
        loss_fn: gradient mode's scalar, `loss_fn(output, batch)` with the model's output structure
            (default: random projections of the primary output, see the module docstring).
        activations: with `formats`, False makes the candidates (f, None) (weight-only).
        strict: torch.export's strict mode.
        progress: called as progress(done, total, elapsed_s, label) after each measured
            (site, candidate) of this process; rows taken from a resume file are not counted.
        resume: a JSON path: if it exists it must come from the same run (mode, candidates, block
            size, sites, kinds, compared outputs, loss_fn, batches, parameters), else MXValueError
            names what differs; its rows are reused and the file is rewritten as rows complete.
        noise: 0 (default): no noise floor. N >= 1: for each candidate, measure the model with every
            measured site quantized under N 1-ulp jitters (+ `noise_sources`) and keep each
            metric's spread (`report.noise`; a row whose |loss| is within the loss floor is marked
            `~`, see the module docstring). local/gradient modes record floor None with the reason.
            Every rank of a sharded run measures the floors itself (they are small: N + 2 model
            runs per candidate).
        noise_sources: perturbations among "jitter", "split", "compiled" (`mxfx.noise`).

    Returns:
        SensitivityReport with one row per (site, candidate), sites in graph order.

    Raises:
        MXValueError: unknown mode/metric/kind, no sites, a bad candidate, a resume file of another run.
    """
    if mode not in MODES:
        raise MXValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    if metric not in SORT_KEYS:
        raise MXValueError(f"unknown metric {metric!r}; valid: {', '.join(SORT_KEYS)}")
    if isinstance(kinds, str) or not kinds or set(kinds) - set(KINDS):
        raise MXValueError(f"kinds must be a non-empty list of {', '.join(KINDS)}, got {kinds!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise MXValueError(f"block_size must be a positive integer, got {block_size!r}")
    if loss_fn is not None and mode != "gradient":
        raise MXValueError("loss_fn is used by mode='gradient' only")
    if not isinstance(model, torch.nn.Module):
        raise MXTypeError(f"sensitivity takes an nn.Module, got {type(model).__name__}")
    noise_sources = tuple(noise_sources)
    if noise:
        check_arguments(noise, noise_sources)
    cands = _candidates(formats, candidates, activations)
    batches = as_batches(inputs)
    program = export(model, batches[0], strict=strict)
    base = program.module()
    find_sites(base)  # annotate only
    targets, unmeasured = _targets(base, kinds, sites)
    if mode in ("local", "gradient"):
        why = {id(t): _explicit_support(t, base) for t in targets if t.kind == ATTENTION and t.form != "sdpa"}
        for t in targets:
            if why.get(id(t)) is not None:
                unmeasured.append({"site": t.fqn, "kind": t.kind, "reason": f"{mode} mode cannot recompute {why[id(t)]}"})
        targets = [t for t in targets if why.get(id(t)) is None]
        if not targets:
            raise MXValueError(f"no sites the {mode} mode can measure: {unmeasured}")
    fingerprint = _run_fingerprint(model, batches, mode, cands, block_size, targets, kinds, loss_fn, noise, noise_sources)
    floors = _noise_floors(program, base, targets, cands, batches, mode, block_size, noise, noise_sources) if noise else {}
    path = None if resume is None else Path(resume)
    items = [(t, c) for t in targets for c in cands]
    with distributed.process_group() as (rank, world):
        done = _read_resume(path, fingerprint) if path is not None else {}
        distributed.barrier(world)  # every rank reads the same files before any rank writes
        todo = [(i, t, c) for i, (t, c) in enumerate(items) if (t.kind, t.fqn, *c) not in done]
        mine = [(i, t, c) for n, (i, t, c) in enumerate(todo) if n % world == rank]
        measure = _measure_model if mode in ("isolated", "all-but-one") else _measure_local
        writer = _ResumeWriter(path, fingerprint, mode, metric, cands, unmeasured, rank, world, done, floors)
        results = measure(program, base, targets, mine, batches, mode, block_size, loss_fn, progress, writer) if mine else {}
        results = distributed.gather(results, world)
        rows = []
        for i, (t, c) in enumerate(items):
            row = done.get((t.kind, t.fqn, *c)) or results[i]
            rows.append(row)
        report = SensitivityReport(rows, mode, metric, cands, unmeasured, fingerprint, floors)
        writer.finish(report)
    return report


class _ResumeWriter:
    """Rewrites the resume file as rows complete: the report itself in one process, one partial
    file per rank (`<path>.rank<r>`) in a sharded run, merged by rank 0 at the end."""

    def __init__(self, path, fingerprint, mode, metric, candidates, unmeasured, rank, world, done, noise) -> None:
        self.path, self.rank, self.world = path, rank, world
        self.base = SensitivityReport(list(done.values()) if world == 1 else [], mode, metric, candidates, unmeasured,
                                      fingerprint, noise)

    def add(self, row: dict) -> None:
        if self.path is None:
            return
        self.base.rows.append(row)
        target = self.path if self.world == 1 else self.path.with_name(f"{self.path.name}.rank{self.rank}")
        _write_json(target, self.base.to_json())

    def finish(self, report: SensitivityReport) -> None:
        if self.path is None:
            return
        distributed.barrier(self.world)
        if self.rank == 0:
            _write_json(self.path, report.to_json())
            for partial in self.path.parent.glob(f"{self.path.name}.rank*"):
                partial.unlink()
        distributed.barrier(self.world)


def _row(target: _Target, candidate: Candidate, mode: str, activation_numel: int, metrics: dict, loss: float | None) -> dict:
    return {"site": target.fqn, "kind": target.kind, "weight_format": candidate[0], "activation_format": candidate[1],
            "format": candidate_label(candidate), "mode": mode,
            "weight_numel": target.weight_numel if target.kind == LINEAR else 0,
            "activation_numel": activation_numel, "loss": loss, **metrics}


def _unchanged(target: _Target, candidate: Candidate, mode: str, numel: int, kl: bool) -> dict:
    """The exact row of an attention site under a candidate with no activation format: nothing is
    quantized, so the output is unchanged (known without measuring)."""
    metrics = {"sqnr": math.inf, "mse": 0.0, "cosine": 1.0, "kl": 0.0 if kl else None, "rel_error": 0.0}
    return _row(target, candidate, mode, numel, metrics, 0.0)


def _measure_local(program, base, targets, mine, batches, mode, block_size, loss_fn, progress, writer) -> dict:
    """local and gradient modes: one recording pass per batch (gradient: with backward passes)."""
    grad = mode == "gradient"
    accs = {i: MetricAccumulator(kl=False) for i, _, _ in mine}
    scores = {i: 0.0 for i, _, _ in mine}
    numel: dict[str, int] = {t.fqn: 0 for t in targets}
    start = time.perf_counter()
    for batch in batches:
        recorder = _Recorder(base, targets, keep=True, grad=grad)
        flat = pytree.tree_leaves(batch)
        with torch.set_grad_enabled(grad):
            output = recorder.run(*flat)
        for fqn, n in recorder.numel.items():
            numel[fqn] += n
        # gradient mode: mean over the scalars of G^2 per site output (score = sum(mean G^2 * err^2))
        fisher: list[torch.Tensor | None] = [None] * len(recorder.outputs)
        if grad and recorder.outputs:
            scalars = _scalars(_structured(base, output), batch, loss_fn)
            for s in scalars:
                if not s.requires_grad:  # the output depends on no site: every score stays 0
                    continue
                grads = torch.autograd.grad(s, recorder.outputs, retain_graph=True, allow_unused=True)
                for k, g in enumerate(grads):
                    if g is not None:
                        term = g.detach().float().square() / len(scalars)
                        fisher[k] = term if fisher[k] is None else fisher[k] + term
                del grads
        index = {id(out): k for k, out in enumerate(recorder.outputs)}
        with torch.no_grad():
            for i, target, candidate in mine:
                if target.kind == ATTENTION and candidate[1] is None:
                    continue
                for record, out in recorder.records[target.fqn]:
                    reference, quantized = _site_outputs(record, candidate, block_size)
                    accs[i].add(reference, quantized)
                    g2 = fisher[index[id(out)]] if grad else None
                    if g2 is not None:  # None: the scalar does not depend on this output (score 0)
                        scores[i] += (g2.double() * (quantized.double() - reference.double()).square()).sum().item()
        del recorder, fisher, output
    results = {}
    for n, (i, target, candidate) in enumerate(mine, 1):
        if target.kind == ATTENTION and candidate[1] is None:
            row = _unchanged(target, candidate, mode, numel[target.fqn], kl=False)
        else:
            metrics = accs[i].result()
            row = _row(target, candidate, mode, numel[target.fqn], metrics, scores[i] if grad else metrics["mse"])
        results[i] = row
        writer.add(row)
        if progress is not None:
            progress(n, len(mine), time.perf_counter() - start, f"{target.fqn} {candidate_label(candidate)}")
    return results


def _scalars(output: Any, batch: tuple, loss_fn: Callable | None) -> list[torch.Tensor]:
    """Gradient mode's scalars: the user's loss, or random projections of the primary output."""
    if loss_fn is not None:
        loss = loss_fn(output, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
            raise MXValueError("loss_fn(output, batch) must return a one-element tensor that depends on the output")
        return [loss.reshape(())]
    primary = _primary_output(output)
    generator = torch.Generator().manual_seed(PROJECTION_SEED)
    scalars = []
    for _ in range(PROJECTIONS):
        # entries N(0, 1/numel): E[G_i^2] = (J^T J)_ii / numel (module docstring); drawn on the CPU
        # so the projections are the same on every device.
        p = torch.randn(primary.shape, generator=generator, dtype=torch.float64) / math.sqrt(primary.numel())
        scalars.append((p.to(primary.device, primary.dtype) * primary).sum())
    return scalars


def _measure_model(program, base, targets, mine, batches, mode, block_size, loss_fn, progress, writer) -> dict:
    """isolated and all-but-one modes: one switched copy of the exported graph (`_switched`, which
    shares the parameters) for the whole run; each work item sets its sites' switches and runs it."""
    references, numel = [], {t.fqn: 0 for t in targets}
    with torch.no_grad():
        for batch in batches:
            recorder = _Recorder(base, targets, keep=False, grad=False)
            references.append(_primary_output(_structured(base, recorder.run(*pytree.tree_leaves(batch)))).detach())
            for fqn, n in recorder.numel.items():
                numel[fqn] += n

    switched, switches = _switched(program, targets, block_size)

    def run(chosen: dict[_Target, Candidate]) -> dict:
        for switch in switches:
            candidate = chosen.get(switch.target)
            switch.candidate = None if candidate is None or candidate == (None, None) else candidate
        acc = MetricAccumulator(kl=True)
        try:
            with torch.no_grad():
                for batch, reference in zip(batches, references):
                    acc.add(reference, _primary_output(switched(*batch)))
        finally:
            for switch in switches:
                switch.candidate = None
        return acc.result()

    everything: dict[Candidate, dict] = {}  # all-but-one: metrics with every site quantized, per candidate
    results, start = {}, time.perf_counter()
    for n, (i, target, candidate) in enumerate(mine, 1):
        if mode == "all-but-one" and candidate not in everything:
            everything[candidate] = run(_all_but(targets, None, candidate))
        if target.kind == ATTENTION and candidate[1] is None:
            row = _unchanged(target, candidate, mode, numel[target.fqn], kl=True)
            if mode == "all-but-one":  # excluding a site the candidate leaves alone changes nothing
                row = _row(target, candidate, mode, numel[target.fqn], everything[candidate], 0.0)
        elif mode == "isolated":
            metrics = run({target: candidate})
            row = _row(target, candidate, mode, numel[target.fqn], metrics, metrics["mse"])
        else:
            metrics = run(_all_but(targets, target, candidate))
            row = _row(target, candidate, mode, numel[target.fqn], metrics, everything[candidate]["mse"] - metrics["mse"])
        results[i] = row
        writer.add(row)
        if progress is not None:
            progress(n, len(mine), time.perf_counter() - start, f"{target.fqn} {candidate_label(candidate)}")
    return results


def _noise_floors(program, base, targets, candidates, batches, mode, block_size, noise, sources) -> dict:
    """report.noise (see SensitivityReport): per candidate, the spread of every metric of the model
    with all measured sites quantized with it, under `mxfx.noise.noise_floor`."""
    out = {"runs": noise, "sources": list(sources), "floor": None, "reason": None, "measurements": {}}
    if mode not in ("isolated", "all-but-one"):
        out["reason"] = (f"{mode} mode compares each site's own output, recomputed from recorded inputs: no model "
                         "measurement to repeat under perturbations (use mode='isolated' or 'all-but-one')")
        log.info("sensitivity: noise floor not computed: %s", out["reason"])
        return out
    with torch.no_grad():
        references = [_primary_output(base(*batch)).detach() for batch in batches]

    def measure(outputs: list) -> dict:
        acc = MetricAccumulator(kl=True)
        for reference, output in zip(references, outputs):
            acc.add(reference, _primary_output(output))
        return acc.result()

    out["floor"] = {}
    for candidate in candidates:
        label = candidate_label(candidate)
        prepared = prepare(program, _config_for(_all_but(targets, None, candidate), block_size))
        floor = noise_floor(prepared, batches, measure, noise, sources)
        spreads = floor.spreads
        out["floor"][label] = {"loss": spreads["mse"], **spreads}
        out["measurements"][label] = floor.to_dict()
    return out


def _all_but(targets: list[_Target], excluded: _Target | None, candidate: Candidate) -> dict[_Target, Candidate]:
    return {t: candidate for t in targets if t is not excluded and not (t.kind == ATTENTION and candidate[1] is None)}


def evaluate(model: torch.nn.Module, inputs, config, *, noise: int = 0,
             noise_sources: tuple[str, ...] = ("jitter", "split")) -> dict:
    """Model-output metrics (`mxfx.metrics`, KL per token over the last axis) of `config` against
    the unquantized model, over the batches.

    Args:
        model: the model (not modified).
        inputs: one batch or an iterable of batches.
        config: a QuantConfig, a preset name or a TOML path.
        noise: 0 (default): measure once. N >= 1: also measure under N 1-ulp input jitters and
            each other source in `noise_sources`, and add a "spread" entry (metric -> largest
            minus smallest value over all runs) and a "noise" entry (the `mxfx.noise.NoiseFloor`
            as a dict): a difference between two configs below the larger spread is not signal
            (`mxfx.noise.significant`).
        noise_sources: perturbations among "jitter", "split", "compiled" (see `mxfx.noise`).
    """
    from mxfx.noise import noise_floor

    batches = as_batches(inputs)
    program = export(model, batches[0])
    base = program.module()
    prepared = prepare(program, load_config(config))
    with torch.no_grad():
        references = [_primary_output(base(*batch)) for batch in batches]

    def measure(outputs: list) -> dict:
        acc = MetricAccumulator(kl=True)
        for reference, output in zip(references, outputs):
            acc.add(reference, _primary_output(output))
        return acc.result()

    if not noise:
        with torch.no_grad():
            return measure([prepared(*batch) for batch in batches])
    floor = noise_floor(prepared, batches, measure, noise, noise_sources)
    return {**floor.metrics, "spread": floor.spreads, "noise": floor.to_dict()}
