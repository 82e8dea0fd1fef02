"""Rewrite every linear-like product with a parameter operand into `aten.linear(x, W2d, b)`.

A linear layer reaches the exported ATen graph in many forms: `aten.linear` (nn.Linear,
F.linear), `addmm(b, x, W)` (GPT-2's Conv1D, which stores W as (in, out)), `mm`, `matmul`
(`x @ W.T`, `x @ W`), `bmm` with an expanded weight, 2-operand `einsum`, and a kernel-1 `conv1d`
(one group, stride 1, no padding: `conv1d(x [B, C, L], W [out, C, 1], b)` is a linear over the
channels at every position, rewritten as `linear(x.transpose, W.squeeze(-1), b).transpose`). An
einsum whose weight has other than two indices, or several contracted ones, is a linear once the
split indices are flattened (`'ibh,hnd->ibnd'`: W viewed as (n*d, h); `'ibnd,hnd->ibh'`: x's
(n, d) flattened, W viewed as (h, n*d)); an index shared by x, W and the output is a head index
(`'bind,snd->bnis'`) and becomes one linear per head (`W.select(head_axis, i)`, site `<name>.i`),
stacked. MX blocks then run along the flattened contracted axis, as in the equivalent nn.Linear.
The weight operand counts when it is a constant expression of one parameter or buffer: a
get_attr followed by views, transposes, slices, broadcasts and casts (`_utils.weight_chain`).

Each form is matched, then checked (the product contracts the last axis of x with the weight's
reduction axis, the weight is 2-D or a broadcast of a 2-D one, the output shape and dtype are
unchanged), then rewritten so that the later passes see one form: `aten.linear` whose weight
argument is the (out_features, in_features) weight (a chain; InsertQDQ materialises it), with x
permuted and the output permuted back where an einsum asks for it.

A candidate that fails its check is left alone and annotated CHECK_FAILED; a product with a
parameter operand in a form not rewritten (the parameter on the left, a 3-D or 1-D parameter of
bmm/matmul, an einsum with no contracted index or several head indices, a conv1d with a kernel
wider than 1, groups, stride or padding, a weight computed by other ops) is annotated UNSUPPORTED.
Products of two activations are not linear sites.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from typing import Any

import torch
from mxfx.passes._utils import count_rewrites, create_call, fake_mode_of, finish, linear_site_name, weight_chain
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx.graph.sites import CHECK_FAILED, EXPERT_FORMS, LINEAR, NO_RULE, UNSUPPORTED, Site, annotate, site_of

log = logging.getLogger(__name__)
aten = torch.ops.aten
FORMS = {aten.linear.default: "linear", aten.addmm.default: "addmm", aten.mm.default: "mm",
         aten.matmul.default: "matmul", aten.bmm.default: "bmm", aten.einsum.default: "einsum",
         aten.conv1d.default: "conv1d", aten.conv1d.padding: "conv1d"}
_CONV1D = (aten.conv1d.default, aten.conv1d.padding)
_KWARGS = {"beta", "alpha", "bias", "stride", "padding", "dilation", "groups"}
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
    squeeze: bool = False  # W2d = weight.squeeze(-1): a kernel-1 Conv1d's (out, in, 1) weight


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
        return _split_einsum_plan(node, x, weight, x_spec, w_spec, output)
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


def _argument(node: fx.Node, name: str) -> Any:
    """An op argument by its schema name (its default when not given)."""
    for index, argument in enumerate(node.target._schema.arguments):
        if argument.name == name:
            if index < len(node.args):
                return node.args[index]
            return node.kwargs.get(name, argument.default_value if argument.has_default_value() else None)
    raise KeyError(name)


def _conv1d_plan(node: fx.Node, constant: dict) -> _Plan | None:
    """`conv1d(x [B, C, L], W [out, C, 1], b)` as `linear(x.transpose(-1, -2), W.squeeze(-1), b)`,
    transposed back: a kernel-1, one-group, stride-1, unpadded Conv1d is a linear over channels
    at every position (dilation spaces the taps of a kernel: with one tap it changes nothing)."""
    x, weight, bias = _argument(node, "input"), _argument(node, "weight"), _argument(node, "bias")
    if weight not in constant:
        return None  # a convolution of two activations: not a linear site
    w = _val(weight)
    stride, padding, groups = _argument(node, "stride"), _argument(node, "padding"), _argument(node, "groups")
    unpadded = padding in ("valid", "same") or all(p == 0 for p in padding)  # "same" pads nothing for kernel 1
    why = [what for what, bad in ((f"kernel size {w.shape[-1]}", w.dim() != 3 or w.shape[-1] != 1),
                                  (f"groups={groups}", groups != 1),
                                  (f"stride={list(stride)}", any(v != 1 for v in stride)),
                                  (f"padding={padding}", not unpadded)) if bad]
    if why or _val(x).dim() not in (2, 3):
        what = ", ".join(why) or f"a {_val(x).dim()}-D input"
        raise _Reject(UNSUPPORTED, f"conv1d with {what}: only a kernel-1, one-group, stride-1, unpadded Conv1d is "
                                   "quantized (as a linear over its channels)")
    if weight_chain(weight) is None:
        raise _Reject(UNSUPPORTED, f"the conv1d weight is computed by {weight.target}: only views, slices and casts "
                                   "of one parameter are followed")
    perm = [0, 2, 1] if _val(x).dim() == 3 else [1, 0]
    return _Plan(x, weight, transpose=False, bias=bias, x_perm=perm, out_perm=perm, squeeze=True)


@dataclasses.dataclass
class _EinsumPlan:
    """`einsum('x,w->out', x, W)` with a weight of other than 2 indices or several contracted ones,
    as linears over flattened indices (`'ibh,hnd->ibnd'`: W viewed as (n*d, h); `'ibnd,hnd->ibh'`:
    x's (n, d) flattened, W viewed as (h, n*d)); with a `head` index shared by x, W and the output
    (`'bind,snd->bnis'`), one such linear per head, stacked."""

    x: fx.Node
    weight: fx.Node
    x_spec: str
    w_spec: str
    out_spec: str
    head: str | None  # the index x, W and the output share (a per-head batched linear), or None


def _split_einsum_plan(node: fx.Node, x: fx.Node, weight: fx.Node, x_spec: str, w_spec: str, output: str) -> _EinsumPlan:
    equation = node.args[0]
    contracted = [c for c in w_spec if c in x_spec and c not in output]
    shared = [c for c in w_spec if c in x_spec and c in output]
    if not contracted:
        raise _Reject(UNSUPPORTED, f"einsum {equation!r}: the weight shares no contracted index with x (an outer product)")
    if any(c not in x_spec and c not in output for c in w_spec) or any(c not in w_spec and c not in output for c in x_spec):
        raise _Reject(UNSUPPORTED, f"einsum {equation!r}: an index summed within one operand")
    if sorted(output) != sorted((set(x_spec) | set(w_spec)) - set(contracted)):
        raise _Reject(UNSUPPORTED, f"einsum {equation!r}: the output has indices of neither operand")
    if len(shared) > 1:
        raise _Reject(UNSUPPORTED, f"einsum {equation!r}: {len(shared)} indices shared by x, the weight and the output "
                                   "(one head index is rewritten)")
    head = shared[0] if shared else None
    if head is not None and not isinstance(_val(weight).shape[w_spec.index(head)], int):
        raise _Reject(UNSUPPORTED, f"einsum {equation!r}: the head index {head!r} has no static size")
    return _EinsumPlan(x, weight, x_spec, w_spec, output, head)


def _emit_einsum(apply, plan: _EinsumPlan):
    """The ops of an _EinsumPlan, through `apply(op, args)` (graph nodes, or fake values for the check)."""
    if plan.head is None:
        return _emit_flat(apply, plan.x, plan.weight, plan.x_spec, plan.w_spec, plan.out_spec)
    h = plan.head
    outs = []
    for index in range(_val(plan.weight).shape[plan.w_spec.index(h)]):
        x = apply(aten.select.int, (plan.x, plan.x_spec.index(h), index))
        w = apply(aten.select.int, (plan.weight, plan.w_spec.index(h), index))
        strip = lambda spec: spec.replace(h, "")  # noqa: E731
        outs.append(_emit_flat(apply, x, w, strip(plan.x_spec), strip(plan.w_spec), strip(plan.out_spec)))
    return apply(aten.stack.default, (outs, plan.out_spec.index(h)))


def _emit_flat(apply, x, w, x_spec: str, w_spec: str, out_spec: str):
    """x [M..., K...] (permuted), K flattened; W permuted to (N..., K...) and viewed as (prod N, prod K);
    the linear's last axis unflattened into N and the result permuted to `out_spec`."""
    k = [c for c in w_spec if c in x_spec]
    n = [c for c in w_spec if c not in x_spec]
    m = [c for c in x_spec if c not in w_spec]
    w_shape = dict(zip(w_spec, (w if isinstance(w, torch.Tensor) else _val(w)).shape))  # a fake value in the check
    if m + k != list(x_spec):
        x = apply(aten.permute.default, (x, [x_spec.index(c) for c in m + k]))
    if len(k) > 1:
        x = apply(aten.flatten.using_ints, (x, len(m), -1))
    if n + k != list(w_spec):
        w = apply(aten.permute.default, (w, [w_spec.index(c) for c in n + k]))
    if len(n) != 1 or len(k) != 1:
        w = apply(aten.reshape.default, (w, [math.prod(w_shape[c] for c in n), math.prod(w_shape[c] for c in k)]))
    y = apply(aten.linear.default, (x, w))
    if not n:
        y = apply(aten.squeeze.dim, (y, -1))
    elif len(n) > 1:
        y = apply(aten.unflatten.int, (y, -1, [w_shape[c] for c in n]))
    if m + n != list(out_spec):
        y = apply(aten.permute.default, (y, [(m + n).index(c) for c in out_spec]))
    return y


def _plan(node: fx.Node, constant: dict) -> _Plan | None:
    """The rewrite of a candidate product, None when it is already canonical or not a linear
    site (no parameter operand), or a _Reject for a parameter product mxfx does not rewrite."""
    target = node.target
    if target in _CONV1D:
        return _conv1d_plan(node, constant)
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
        w = w.squeeze(-1) if plan.squeeze else w
        w = w.t() if plan.transpose else w
        out = torch.nn.functional.linear(x, w, _val(plan.bias))
        return out.permute(plan.out_perm) if plan.out_perm is not None else out


def _check_einsum(node: fx.Node, plan: _EinsumPlan, fake_mode) -> None:
    want = _val(node)
    try:
        with fake_mode if fake_mode is not None else contextlib.nullcontext():
            got = _emit_einsum(lambda op, args: op(*_fake_args(args)), plan)
    except Exception as error:  # any failure of the fake run means the rewrite does not fit
        raise _Reject(CHECK_FAILED, f"as linears: {type(error).__name__}: {str(error).splitlines()[0][:200]}") from None
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
        raise _Reject(CHECK_FAILED, f"as linears the output would be {tuple(got.shape)} {got.dtype}, the einsum gives "
                                    f"{tuple(want.shape)} {want.dtype}")


def _fake_args(args):
    return fx.node.map_aggregate(args, lambda a: _val(a) if isinstance(a, fx.Node) else a)


def _rewrite_einsum(gm: fx.GraphModule, node: fx.Node, plan: _EinsumPlan, fake_mode) -> list[fx.Node]:
    linears = []

    def apply(op, args):
        created = create_call(gm, op, args, node, fake_mode)
        if op is aten.linear.default:
            linears.append(created)
        return created

    with gm.graph.inserting_before(node):
        out = _emit_einsum(apply, plan)
    node.replace_all_uses_with(out)
    gm.graph.erase_node(node)
    return linears


def _check(node: fx.Node, plan: _Plan | _EinsumPlan, fake_mode) -> None:
    if isinstance(plan, _EinsumPlan):
        return _check_einsum(node, plan, fake_mode)
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
        if plan.squeeze:
            weight = create_call(gm, aten.squeeze.dim, (weight, -1), node, fake_mode)
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
    if node.target in _CONV1D:
        return node.args[1]
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
            if node.op != "call_function" or node.target not in FORMS or node.kwargs.keys() - _KWARGS:
                continue
            form = FORMS[node.target]
            try:
                plan = _plan(node, constant)
                if plan is not None:
                    _check(node, plan, fake_mode)
            except _Reject as reject:
                site = _site(node, form, reject.status, reject.reason, _weight_operand(node, constant), constant)
                old = site_of(node)
                if old is not None and old.form in EXPERT_FORMS:
                    continue  # a stacked expert weight: MatchExpertSitesPass's site
                if old is None or dataclasses.replace(old, rule=None, rule_label="") != site:
                    annotated += annotate(node, site)
                log.debug("linear candidate %s left alone: %s (%s)", node.name, reject.status, reject.reason)
                continue
            if plan is None:
                continue
            linears = _rewrite_einsum(gm, node, plan, fake_mode) if isinstance(plan, _EinsumPlan) else [
                _rewrite(gm, node, plan, fake_mode)]
            for linear in linears:
                annotate(linear, _site(linear, form, NO_RULE, "", linear.args[1], constant))
            rewrites += 1
            log.debug("canonicalized %s (%s) into aten.linear", node.name, form)
        if rewrites:
            finish(gm)
        count_rewrites(gm, type(self).__name__, rewrites)
        return PassResult(gm, rewrites + annotated > 0)
