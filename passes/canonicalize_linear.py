"""Rewrite every linear-like product with a parameter operand into `aten.linear(x, W2d, b)`.

A linear layer reaches the exported ATen graph in many forms: `aten.linear` (nn.Linear,
F.linear), `addmm(b, x, W)` (GPT-2's Conv1D, which stores W as (in, out)), `mm`, `matmul`
(`x @ W.T`, `x @ W`), `bmm` with an expanded weight, and 2-operand `einsum` with one contracted
index. The weight operand counts when it is a constant expression of one parameter or buffer: a
get_attr followed by views, transposes, slices, broadcasts and casts (`_utils.weight_chain`).

Each form is matched, then checked (the product contracts the last axis of x with the weight's
reduction axis, the weight is 2-D or a broadcast of a 2-D one, the output shape and dtype are
unchanged), then rewritten so that the later passes see one form: `aten.linear` whose weight
argument is the (out_features, in_features) weight (a chain; InsertQDQ materialises it), with x
permuted and the output permuted back where an einsum asks for it.

A candidate that fails its check is left alone and annotated CHECK_FAILED; a product with a
parameter operand in a form not rewritten (the parameter on the left, a 3-D or 1-D parameter, an
einsum with two contracted indices, a weight computed by other ops) is annotated UNSUPPORTED.
Products of two activations are not linear sites.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import torch
from mxfx.passes._utils import count_rewrites, create_call, fake_mode_of, finish, linear_site_name, weight_chain
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx.graph.sites import CHECK_FAILED, LINEAR, NO_RULE, UNSUPPORTED, Site, annotate, site_of

log = logging.getLogger(__name__)
aten = torch.ops.aten
FORMS = {aten.linear.default: "linear", aten.addmm.default: "addmm", aten.mm.default: "mm",
         aten.matmul.default: "matmul", aten.bmm.default: "bmm", aten.einsum.default: "einsum"}
_TRANSPOSES_2D = (aten.t.default, aten.numpy_T.default, aten.mT.default)
# Broadcasts that add leading batch axes to a 2-D weight (bmm / matmul with an expanded weight).
_BROADCASTS = (aten.expand.default, aten.unsqueeze.default)


class _Reject(Exception):
    """A candidate mxfx will not rewrite: `status` (UNSUPPORTED or CHECK_FAILED) and why."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclasses.dataclass
class _Plan:
    """How to spell a product as `permute(linear(permute(x), W2d, bias))`."""

    x: fx.Node
    weight: fx.Node  # the weight operand, (K, N) if transpose else (N, K)
    transpose: bool  # W2d = weight.t()
    bias: Any = None
    x_perm: list[int] | None = None
    out_perm: list[int] | None = None


def _constant_params(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """node -> a get_attr of >= 2 dims it is computed from, for every node computed from
    get_attrs and constants only (no graph input): the candidates for a weight operand."""
    out: dict[fx.Node, fx.Node] = {}
    constant: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and val.dim() >= 2:
                out[node] = node
        elif node.op == "call_function":
            # sizes (SymInts read from graph inputs, as in `W.expand(x.shape[0], K, N)`) do not
            # make a value depend on the inputs' data
            inputs = [i for i in node.all_input_nodes if not isinstance(_val(i), (torch.SymInt, int))]
            if all(i in constant for i in inputs):
                constant.add(node)
                root = next((out[i] for i in inputs if i in out), None)
                if root is not None:
                    out[node] = root
    return out


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _strip_transpose(node: fx.Node) -> fx.Node | None:
    """The input of a 2-D transpose node, else None (so that t(t(W)) is spelled W)."""
    if node.op != "call_function" or _val(node) is None or _val(node).dim() != 2:
        return None
    if node.target in _TRANSPOSES_2D:
        return node.args[0]
    if node.target is aten.transpose.int and sorted(a % 2 for a in node.args[1:3]) == [0, 1]:
        return node.args[0]
    if node.target is aten.permute.default and list(node.args[1]) == [1, 0]:
        return node.args[0]
    return None


def _strip_broadcast(weight: fx.Node) -> fx.Node:
    """The 2-D node a >2-D weight operand broadcasts (`W.expand(B, K, N)`, `W.unsqueeze(0)`)."""
    node = weight
    while _val(node).dim() > 2:
        if node.op != "call_function" or node.target not in _BROADCASTS:
            raise _Reject(UNSUPPORTED, f"the weight operand is {_val(weight).dim()}-D and not a broadcast of a 2-D weight")
        if node.target is aten.unsqueeze.default and node.args[1] != 0:
            raise _Reject(UNSUPPORTED, "the weight operand is unsqueezed along a non-leading axis")
        if node.target is aten.expand.default:
            src = _val(node.args[0])
            sizes = list(node.args[1])
            lead = len(sizes) - src.dim()
            if any(s not in (-1, d) for s, d in zip(sizes[lead:], src.shape)):
                raise _Reject(UNSUPPORTED, "the weight operand's expand changes its matrix axes")
        node = node.args[0]
    return node


def _einsum_plan(node: fx.Node, operands: list, constant: dict) -> _Plan:
    """x and W of `einsum(eq, [x, W])` (either order) as a linear, or a _Reject."""
    equation = node.args[0].replace(" ", "")
    inputs, arrow, output = equation.partition("->")
    specs = inputs.split(",")
    if len(specs) != 2 or not arrow or len(operands) != 2:
        raise _Reject(UNSUPPORTED, f"einsum {node.args[0]!r}: only 'x,W->out' with an explicit output is rewritten")
    w_index = 1 if operands[1] in constant else 0
    x, weight = operands[1 - w_index], operands[w_index]
    x_spec, w_spec = specs[1 - w_index], specs[w_index]
    if "..." in w_spec:
        raise _Reject(UNSUPPORTED, f"einsum {node.args[0]!r}: '...' on the weight operand")
    spare = iter(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in equation)
    if "..." in x_spec:
        batch = "".join(next(spare) for _ in range(_val(x).dim() - len(x_spec.replace("...", ""))))
        x_spec, output = x_spec.replace("...", batch), output.replace("...", batch)
    if "..." in output or len(set(x_spec)) != len(x_spec) or len(set(w_spec)) != len(w_spec) or len(set(output)) != len(output):
        raise _Reject(UNSUPPORTED, f"einsum {node.args[0]!r}: repeated indices or '...' only in the output")
    contracted = [c for c in w_spec if c in x_spec and c not in output]
    if len(w_spec) != 2 or len(contracted) != 1:
        raise _Reject(UNSUPPORTED, f"einsum {node.args[0]!r}: the weight has {len(w_spec)} indices, "
                                   f"{len(contracted)} contracted (a linear has 2 and 1)")
    k = contracted[0]
    n = w_spec.replace(k, "")
    if n in x_spec or n not in output or any(c not in output for c in x_spec if c != k):
        raise _Reject(UNSUPPORTED, f"einsum {node.args[0]!r}: not a product [..., K] x [K, N] -> [..., N]")
    if sorted(output) != sorted(x_spec.replace(k, "") + n):
        raise _Reject(UNSUPPORTED, f"einsum {node.args[0]!r}: the output has indices of neither operand")
    x_order = [c for c in x_spec if c != k] + [k]
    lin = x_order[:-1] + [n]
    x_perm = [x_spec.index(c) for c in x_order]
    out_perm = [lin.index(c) for c in output]
    return _Plan(x, weight, transpose=w_spec == k + n,
                 x_perm=None if x_perm == sorted(x_perm) else x_perm,
                 out_perm=None if out_perm == sorted(out_perm) else out_perm)


def _plan(node: fx.Node, constant: dict) -> _Plan | None:
    """The rewrite of a candidate product, None when it is already canonical or not a linear
    site (no parameter operand), or a _Reject for a parameter product mxfx does not rewrite."""
    target = node.target
    if target is aten.einsum.default:
        operands = list(node.args[1])
        if not any(o in constant for o in operands):
            return None
        if all(o in constant for o in operands):
            return None  # a constant sub-expression, not a layer applied to activations
        return _einsum_plan(node, operands, constant)
    if target is aten.addmm.default:
        bias, x, weight = node.args[:3]
    elif target is aten.linear.default:
        x, weight = node.args[:2]
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    else:
        (x, weight), bias = node.args[:2], None
    x_const, w_const = x in constant, weight in constant
    if not w_const:
        if x_const:
            raise _Reject(UNSUPPORTED, f"the parameter is the left operand of {FORMS[target]} (W @ x): "
                                       "only x @ W products are rewritten")
        return None  # two activations (attention, gating): not a linear site
    if _val(weight).dim() == 1:
        raise _Reject(UNSUPPORTED, f"{FORMS[target]} with a 1-D weight operand (a matrix-vector product)")
    if _val(weight).dim() > 2:
        weight = _strip_broadcast(weight)
    if weight_chain(weight) is None:
        source = getattr(constant.get(weight), "target", "a parameter")
        raise _Reject(UNSUPPORTED, f"the weight is computed by {weight.target} from {source!r}: "
                                   "only views, slices and casts of one parameter are followed")
    if target is aten.linear.default:
        return None  # already canonical; MatchLinearSitesPass reads its weight chain
    if target is aten.addmm.default:
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        if (beta, alpha) != (1, 1):
            raise _Reject(CHECK_FAILED, f"addmm with beta={beta}, alpha={alpha}")
        n = _val(weight).shape[-1]
        if _val(bias) is None or tuple(_val(bias).shape) != (n,):
            shape = tuple(_val(bias).shape) if _val(bias) is not None else bias
            raise _Reject(CHECK_FAILED, f"addmm bias of shape {shape} is not a ({n},) vector (out_features)")
    return _Plan(x, weight, transpose=True, bias=bias)


def _fake_result(plan: _Plan, fake_mode) -> torch.Tensor:
    """Run the planned ops on fake values: the check that the rewrite keeps shape and dtype."""
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        x = _val(plan.x)
        if plan.x_perm is not None:
            x = x.permute(plan.x_perm)
        w = _val(plan.weight)
        w = w.t() if plan.transpose else w
        out = torch.nn.functional.linear(x, w, _val(plan.bias))
        return out.permute(plan.out_perm) if plan.out_perm is not None else out


def _check(node: fx.Node, plan: _Plan, fake_mode) -> None:
    want = _val(node)
    w = _val(plan.weight)
    k = w.shape[0] if plan.transpose else w.shape[1]
    x = _val(plan.x)
    x_k = x.shape[plan.x_perm[-1]] if plan.x_perm is not None else x.shape[-1]
    if x_k != k:  # cannot happen for a traced product; kept as the statement of the form
        raise _Reject(CHECK_FAILED, f"x's reduction axis ({x_k}) is not the weight's ({k})")
    try:
        got = _fake_result(plan, fake_mode)
    except Exception as error:  # any failure of the fake run means the rewrite does not fit
        raise _Reject(CHECK_FAILED, f"as a linear: {type(error).__name__}: {str(error).splitlines()[0][:200]}") from None
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        raise _Reject(CHECK_FAILED, f"as a linear the output would be {tuple(got.shape)} {got.dtype}, the product gives "
                                    f"{tuple(want.shape)} {want.dtype} (the weight's broadcast adds batch axes x lacks?)")


def _rewrite(gm: fx.GraphModule, node: fx.Node, plan: _Plan, fake_mode) -> fx.Node:
    with gm.graph.inserting_before(node):
        x = plan.x
        if plan.x_perm is not None:
            x = create_call(gm, aten.permute.default, (x, plan.x_perm), node, fake_mode)
        weight = plan.weight
        if plan.transpose:
            inner = _strip_transpose(weight)
            weight = inner if inner is not None else create_call(gm, aten.t.default, (weight,), node, fake_mode)
        args = (x, weight) if plan.bias is None else (x, weight, plan.bias)
        linear = create_call(gm, aten.linear.default, args, node, fake_mode)
        out = linear
        if plan.out_perm is not None:
            out = create_call(gm, aten.permute.default, (linear, plan.out_perm), node, fake_mode)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return linear


def _site(node: fx.Node, form: str, status: str, reason: str, weight: Any, constant: dict) -> Site:
    found = weight_chain(weight) if isinstance(weight, fx.Node) else None
    attr, chain = found if found is not None else (constant.get(weight), [])
    shape = tuple(_val(weight).shape) if status == NO_RULE else ()
    fqn = linear_site_name(node, attr, chain) if attr is not None else node.name
    return Site(fqn=fqn, kind=LINEAR, form=form, node=node.name, status=status, reason=reason,
                weight_target=str(attr.target) if attr is not None else "", weight_shape=shape)


def _weight_operand(node: fx.Node, constant: dict) -> Any:
    if node.target is aten.einsum.default:
        return next((o for o in node.args[1] if o in constant), None)
    if node.target is aten.addmm.default:
        return node.args[2] if node.args[2] in constant else node.args[1]
    return node.args[1] if node.args[1] in constant else node.args[0]


class CanonicalizeLinearPass(PassBase):
    """Turn each linear-like product with a parameter operand into `aten.linear(x, W2d, b)`.

    Requires: an ATen graph from torch.export whose nodes carry meta["val"] and nn_module_stack.
    Ensures: rewritten nodes keep their output shape and dtype, every new node has meta["val"]
    and the product's metadata, and the new linear carries a Site (status NO_RULE, `form` = the
    original form); candidates left alone carry a Site with status UNSUPPORTED or CHECK_FAILED
    and the reason. Running twice is a no-op (`modified` False).
    """

    def call(self, gm: fx.GraphModule) -> PassResult:
        fake_mode = fake_mode_of(gm)
        constant = _constant_params(gm)
        rewrites = annotated = 0
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in FORMS or node.kwargs.keys() - {"beta", "alpha", "bias"}:
                continue
            form = FORMS[node.target]
            try:
                plan = _plan(node, constant)
                if plan is not None:
                    _check(node, plan, fake_mode)
            except _Reject as reject:
                site = _site(node, form, reject.status, reject.reason, _weight_operand(node, constant), constant)
                old = site_of(node)
                if old is None or dataclasses.replace(old, rule=None, rule_label="") != site:
                    annotated += annotate(node, site)
                log.debug("linear candidate %s left alone: %s (%s)", node.name, reject.status, reject.reason)
                continue
            if plan is None:
                continue
            linear = _rewrite(gm, node, plan, fake_mode)
            annotate(linear, _site(linear, form, NO_RULE, "", linear.args[1], constant))
            rewrites += 1
            log.debug("canonicalized %s (%s) into aten.linear", node.name, form)
        if rewrites:
            finish(gm)
        count_rewrites(gm, type(self).__name__, rewrites)
        return PassResult(gm, rewrites + annotated > 0)
