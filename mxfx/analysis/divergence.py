"""Where do compiled and eager runs of a prepared module part ways?

    report = mxfx.analysis.divergence.compare(prepared, x)
    print(report.table())            # one row per mxfx op, in graph order
    report.first_site                # the first MX site whose *input* differs
    report.origins                   # the non-MX ops where a difference is born

Both runs are valid MX simulations: an op outside mxfx (a GEMM's accumulation order, a fused
softmax or layer norm, a vectorised `exp`) can round its last bit differently compiled, and the
next MX quantizer then moves a value across a rounding boundary. This tool finds the first such
place. It runs the prepared graph twice on the same inputs:

- eagerly, node by node (an `fx.Interpreter`), keeping every node's value;
- compiled once, as a copy of the graph whose outputs are *every* tensor the graph computes, so
  each intermediate is read back from the compiled code.

An *origin* is a node whose inputs are bitwise equal in both runs while its output is not: the op
that created the difference (the difference of a node whose inputs already differ is inherited).
Further down, where every input already differs, each op is also re-run eagerly on the values the
compiled code fed it: `local` lists every op that computes differently compiled on the same inputs.
Reading back every intermediate makes Inductor store them, which can change its fusion choices a
little; the final output is compared too, so a difference that only exists inside one fused
kernel still shows in the report (as a differing output with no origin upstream of it).
Memory: one copy of every activation per run; meant for small models and short inputs.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from mxfx import _compat
from mxfx._compat import eager_numerics  # noqa: F401  (public here: mxfx.analysis.divergence.eager_numerics)
from mxfx.errors import MXTypeError
from mxfx.graph.sites import site_of

pytree = _compat.pytree_module()  # torch.utils._pytree (private in torch 2.13/2.14)

_MX_OPS = ("quantize", "dequantize", "fake_quantize", "linear", "matmul", "attention")


def _is_mx_op(node: fx.Node) -> bool:
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
        and node.target.namespace == "mxfx"


@dataclasses.dataclass(frozen=True)
class Difference:
    """How two tensors differ: `equal` is bitwise (NaNs in the same places count as equal)."""

    equal: bool
    count: int = 0  # elements that differ
    numel: int = 0
    max_abs: float = 0.0  # largest |a - b| over finite pairs
    rel_l2: float = 0.0  # ||a - b|| / ||a|| over finite pairs

    @classmethod
    def of(cls, a: torch.Tensor, b: torch.Tensor) -> Difference:
        if a.shape != b.shape or a.dtype != b.dtype:
            return cls(False, a.numel(), a.numel(), math.inf, math.inf)
        if a.is_floating_point():
            same = (a == b) | (a.isnan() & b.isnan())
        else:
            same = a == b
        count = int((~same).sum())
        if count == 0:
            return cls(True, 0, a.numel())
        a64, b64 = a.double(), b.double()
        finite = a64.isfinite() & b64.isfinite()
        delta = (a64 - b64)[finite]
        max_abs = float(delta.abs().max()) if delta.numel() else math.inf
        norm = float(a64[finite].norm())
        rel = float(delta.norm()) / norm if norm > 0 else math.inf
        return cls(False, count, a.numel(), max_abs, rel)


@dataclasses.dataclass(frozen=True)
class OpRow:
    """One node of the graph, eager vs compiled."""

    node: str  # graph node name
    target: str  # the op ("mxfx.linear", "aten.layer_norm", ...)
    site: str  # the site's fqn for mxfx ops (and site-annotated nodes), else the module path
    inputs: Difference  # all tensor inputs together (equal iff each is)
    output: Difference  # the first tensor output
    after: str = ""  # for an mxfx op: the non-MX op that produced its first input
    local: Difference | None = None  # compiled output vs the eager op run on the *compiled* inputs (None: not re-run)


@dataclasses.dataclass(frozen=True)
class DivergenceReport:
    """Eager vs compiled, node by node (see the module docstring)."""

    mx_ops: tuple[OpRow, ...]  # every mxfx op, in graph order
    origins: tuple[OpRow, ...]  # nodes whose inputs agree and whose output does not, in graph order
    output: Difference  # the module's output(s), all leaves together
    local: tuple[OpRow, ...] = ()  # every node that computes differently compiled on the same inputs
    not_rerun: tuple[str, ...] = ()  # in-place ops and the values they write: read back after the write

    def local_ops(self) -> dict[str, int]:
        """How many nodes of each op compute differently compiled, given the same inputs."""
        counts: dict[str, int] = {}
        for row in self.local:
            counts[row.target] = counts.get(row.target, 0) + 1
        return counts

    @property
    def first_site(self) -> OpRow | None:
        """The first mxfx op whose input differs between eager and compiled (None: none does)."""
        return next((row for row in self.mx_ops if not row.inputs.equal), None)

    @property
    def first_origin(self) -> OpRow | None:
        """The first op (graph order) where eager and compiled part ways."""
        return self.origins[0] if self.origins else None

    def table(self) -> str:
        """A plain-text table: every mxfx op, then the origins."""
        from tabulate import tabulate

        def cells(row: OpRow) -> list:
            return [row.node, row.target, row.site, row.after, _fmt(row.inputs), _fmt(row.output)]

        headers = ["node", "op", "site", "after", "input (differ/numel, rel L2)", "output"]
        text = [tabulate([cells(r) for r in self.mx_ops], headers=headers, tablefmt="simple")]
        text.append("\norigins (inputs equal, output differs):")
        text.append(tabulate([cells(r) for r in self.origins], headers=headers, tablefmt="simple")
                    if self.origins else "  none")
        text.append(f"\nmodule output: {_fmt(self.output)}")
        text.append("ops that compute differently compiled on the same inputs: "
                    + (", ".join(f"{op} x{n}" for op, n in self.local_ops().items()) or "none"))
        if self.not_rerun:
            text.append("not re-run on the compiled inputs (in-place ops and the values they write, read back after the write): "
                        + ", ".join(self.not_rerun))
        return "\n".join(text)


def _fmt(d: Difference) -> str:
    return "equal" if d.equal else f"{d.count}/{d.numel}, {d.rel_l2:.2e}"


def _op_name(node: fx.Node) -> str:
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._opname}"
    return getattr(target, "__name__", str(target))


def _where(node: fx.Node) -> str:
    site = site_of(node)
    if site is not None:
        return site.fqn
    stack = list((node.meta.get("nn_module_stack") or {}).values())
    return stack[-1][0] if stack else ""


def _tensors(value: Any) -> list[torch.Tensor]:
    return [v for v in pytree.tree_leaves(value) if isinstance(v, torch.Tensor)]


def _joint(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> Difference:
    diffs = [Difference.of(a, b) for a, b in pairs]
    if all(d.equal for d in diffs):
        return Difference(True, 0, sum(d.numel for d in diffs))
    worst = max((d for d in diffs if not d.equal), key=lambda d: d.rel_l2)
    return Difference(False, sum(d.count for d in diffs), sum(d.numel for d in diffs), worst.max_abs, worst.rel_l2)


def default_compile(gm: fx.GraphModule) -> Callable:
    """Inductor, as `torch.compile(prepared)` would run it."""
    return torch.compile(gm, fullgraph=True)


def _flat_graph(prepared: fx.GraphModule) -> tuple[fx.GraphModule, list[fx.Node]]:
    """A copy of `prepared` with flat inputs (pytree leaves) that returns every tensor-valued
    call_function node, plus those nodes (in the copy), in graph order. Input guards are dropped:
    the inputs are the ones the caller gave."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    kept: list[fx.Node] = []
    for node in prepared.graph.nodes:
        if node.op == "output":
            continue
        if node.op == "call_module" and node.target == "_guards_fn":
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
        if node.op == "call_function" and isinstance(node.meta.get("val"), torch.Tensor):
            kept.append(env[node])
    outputs = [env[n] for n in pytree.tree_leaves(prepared.graph.output_node().args[0]) if isinstance(n, fx.Node)]
    graph.output((tuple(outputs), tuple(kept)))
    return fx.GraphModule(prepared, graph), kept


def compare(prepared: fx.GraphModule, *args, compile: Callable[[fx.GraphModule], Callable] = default_compile,
            **kwargs) -> DivergenceReport:
    """Run `prepared` eagerly and compiled on the same inputs; report where the values part.

    Args:
        prepared: a module from `mxfx.prepare` (any fx.GraphModule from torch.export works).
        *args, **kwargs: the inputs, as the module takes them.
        compile: turns a GraphModule into the compiled callable (default: Inductor with
            fullgraph=True; e.g. `lambda gm: torch.compile(gm, options=eager_numerics())`).
            It receives a copy of the graph with flat inputs and every intermediate as an output.

    Returns:
        A DivergenceReport.

    Raises:
        MXTypeError: `prepared` is not an fx.GraphModule.
    """
    if not isinstance(prepared, fx.GraphModule):
        raise MXTypeError(f"compare takes a prepared fx.GraphModule, got {type(prepared).__name__}")
    leaves = _flat_inputs(prepared, args, kwargs)
    flat, kept = _flat_graph(prepared)
    described = {node.name: (_op_name(node), _where(node), _after(node), _is_mx_op(node)) for node in kept}
    with torch.no_grad():
        eager_env: dict[str, Any] = {}

        class Recorder(fx.Interpreter):
            def run_node(self, node):
                value = super().run_node(node)
                eager_env[node.name] = value
                return value

        eager_out, _ = Recorder(flat).run(*leaves)
        to_compile = fx.Graph()
        to_compile.output(to_compile.graph_copy(flat.graph, {}))
        # The compile function gets its own copy of the graph: it may rewrite it.
        compiled_out, compiled_kept = compile(fx.GraphModule(flat, to_compile))(*leaves)
    compiled_env = {node.name: value for node, value in zip(kept, compiled_kept)}
    # Nodes not read back (placeholders, get_attr) hold the same tensors in both runs.
    for name, value in eager_env.items():
        if name not in described:
            compiled_env.setdefault(name, value)

    def inputs_of(node: fx.Node) -> list[str]:
        # A node not read back (a tuple-valued op under its getitems) stands for its own inputs.
        found: list[str] = []
        for n in node.all_input_nodes:
            found += [n.name] if n.name in described or n.op in ("placeholder", "get_attr") else inputs_of(n)
        return list(dict.fromkeys(found))

    # Local differences: each op re-run eagerly on the values the compiled code fed it.
    source = dict(compiled_env)
    local: dict[str, Difference] = {}
    written = _written(flat)
    with torch.no_grad():
        for node in flat.graph.nodes:
            if node.op != "call_function":
                continue
            call_args, call_kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: source[n.name])
            if _is_mutable(node) or node.name in written:
                # An in-place op (T5's `buckets += ...`) and the value it writes: both runs read that
                # value back after the write, so neither can be re-run on what it was fed.
                source[node.name] = compiled_env.get(node.name, eager_env[node.name])
                continue  # its OpRow.local stays None: not measured
            value = node.target(*call_args, **call_kwargs)
            if node.name in described:
                local[node.name] = Difference.of(_tensors(value)[0], _tensors(compiled_env[node.name])[0])
            else:
                source[node.name] = value
    rows: dict[str, OpRow] = {}
    inputs = {node.name: inputs_of(node) for node in kept}
    for name, (target, where, after, _) in described.items():
        pairs = [(a, b) for n in inputs[name] for a, b in zip(_tensors(eager_env[n]), _tensors(compiled_env[n]))]
        out = Difference.of(_tensors(eager_env[name])[0], _tensors(compiled_env[name])[0])
        rows[name] = OpRow(name, target, where, _joint(pairs), out, after, local.get(name))
    mx_rows = tuple(rows[name] for name, info in described.items() if info[3])
    origins = tuple(row for row in rows.values() if row.inputs.equal and not row.output.equal)
    output = _joint([(a, b) for a, b in zip(_tensors(eager_out), _tensors(compiled_out))])
    return DivergenceReport(mx_rows, origins, output, tuple(r for r in rows.values() if r.local is not None and not r.local.equal),
                            tuple(r.node for r in rows.values() if r.local is None))


def _is_mutable(node: fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _written(gm: fx.GraphModule) -> set[str]:
    """Names of the nodes whose value an in-place op of the graph writes (its schema's aliasing args)."""
    names: set[str] = set()
    for node in gm.graph.nodes:
        if not _is_mutable(node):
            continue
        schema = node.target._schema
        bound = {**dict(zip((a.name for a in schema.arguments), node.args)), **node.kwargs}
        for argument in schema.arguments:
            value = bound.get(argument.name)
            if argument.alias_info is not None and argument.alias_info.is_write and isinstance(value, fx.Node):
                names.add(value.name)
    return names


def _flat_inputs(prepared: fx.GraphModule, args: tuple, kwargs: dict) -> list:
    """The inputs as the graph's placeholders take them: keyword inputs in the order of the
    module's input spec (torch.export records them sorted its own way)."""
    spec = getattr(prepared, "_in_spec", None)
    if kwargs and spec is not None and spec.num_children == 2:
        order = spec.child(1).context
        if isinstance(order, list) and sorted(order) == sorted(kwargs):
            kwargs = {key: kwargs[key] for key in order}
    return list(pytree.tree_leaves((args, kwargs)))


def _after(node: fx.Node) -> str:
    """For an mxfx op: the op that produced its first input (through getitem)."""
    if not (_is_mx_op(node) and node.args and isinstance(node.args[0], fx.Node)):
        return ""
    producer = node.args[0]
    while producer.op == "call_function" and producer.target is operator.getitem:
        producer = producer.args[0]
    return _op_name(producer) if producer.op == "call_function" else producer.op
