"""Find attention sites: `scaled_dot_product_attention` calls, and explicit
Q @ K^T -> (scale, bias, mask, cast) -> softmax -> (dropout, cast) -> P @ V chains (nanoGPT's manual
path, Hugging Face "eager" attention, BLOOM's ALiBi `baddbmm`, T5/MPNet/Swin relative position
biases, einsum implementations). A site is named by the module the call happens in (e.g.
`model.layers.0.self_attn`).

Matching is strict, because a wrong match silently changes numerics (STYLE.md, "match a form, then
check it"). From each softmax the pass follows only the *scores path*: through casts, clamps,
elementwise max/min against a bound (`torch.max(scores, finfo.min)`, `maximum`, `minimum`),
view/reshape that keep the last axis, scaling, `masked_fill`/`where` (their value operand),
additive terms (the one operand that carries a matmul product and has the result's shape; never
the mask or bias; a full-shape term computed from another product of activations through ops the
path cannot follow, like XLNet's Q @ R^T relative scores, is refused), and `cat` along the last
axis with sink logits (gpt-oss: `cat([scores, sinks.expand(...)], -1)`, then `x - max(x)`): the
extra columns must carry no product, and the probabilities must reach P @ V sliced back to exactly
the key columns (`P[..., :-1]`), so the sink column never enters a K, V or P block. It then checks
the shapes and axes:

    QK^T  [..., L, D] x [..., D, S] -> [..., L, S]  (matmul, bmm, baddbmm's batch1 @ batch2, einsum)
    softmax over the last axis, which is the QK^T product's key axis S
    PV    [..., L, S] x [..., S, Dv]: the probabilities are the left operand and S is contracted

A softmax that looks like attention (it consumes a matmul product, or its output feeds a matmul)
but fails a check is left alone and recorded as a Site with status CHECK_FAILED or UNSUPPORTED and
a reason: nothing is quantized on a guess.
"""

from __future__ import annotations

import logging

import torch
from mxfx.passes._utils import count_rewrites, module_stack
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx import _compat
from mxfx.graph.config import QuantConfig
from mxfx.graph.sites import ATTENTION, CHECK_FAILED, UNSUPPORTED, Site, annotate, decide
from mxfx.numerics import ops as _ops  # noqa: F401  (registers the torch.ops.mxfx ops named here)

log = logging.getLogger(__name__)
aten = torch.ops.aten

SDPA = aten.scaled_dot_product_attention.default
SOFTMAXES = (aten.softmax.int, aten._softmax.default, aten._safe_softmax.default)
# Products that can compute Q @ K^T or P @ V. For baddbmm the product is batch1 @ batch2 (args 1, 2);
# its `input` term is an additive bias, `alpha`/`beta` scales.
PRODUCTS = {aten.matmul.default: "matmul", aten.bmm.default: "bmm", aten.baddbmm.default: "baddbmm",
            aten.einsum.default: "einsum"}

# Scores-path ops whose first argument carries the scores elementwise (casts, clamps, soft-capping,
# masked_fill: its mask and fill value are never followed).
_ELEMENTWISE = {
    aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device, aten.type_as.default,
    aten.clone.default, aten.contiguous.default, aten.alias.default, aten.detach.default,
    aten.clamp.default, aten.clamp.Tensor, aten.clamp_min.default, aten.clamp_max.default, aten.clamp_min.Tensor,
    aten.clamp_max.Tensor, aten.clamp_.default, aten.clamp_min_.default, aten.clamp_max_.default, aten.tanh.default,
    aten.neg.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.masked_fill_.Scalar,
    aten.masked_fill_.Tensor, aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar,
}
# Binary ops: the scores are one operand, the other a scale, a bias or a mask.
_COMMUTATIVE = {aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor, aten.mul.Tensor, aten.mul_.Tensor}
_DIVISION = {aten.div.Tensor, aten.div_.Tensor}  # only the numerator may carry the scores
# Elementwise max/min against a bound (`torch.max(scores, finfo.min)`): like a mask, the bound must
# not carry a product.
_BOUNDS = {aten.maximum.default, aten.minimum.default, aten.max.other, aten.min.other, aten.fmax.default,
           aten.fmin.default}
# where(cond, a, b): the value operands (never the condition)
_WHERE = {aten.where.self: (1, 2), aten.where.ScalarSelf: (2,), aten.where.ScalarOther: (1,)}
# Reshapes, allowed when they keep the last (key) axis.
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# Between the softmax and P @ V: dropout (identity in eval), casts, copies, reshapes.
_PROB_OPS = {aten.dropout.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.to.device,
             aten.type_as.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
             aten.detach.default} | _RESHAPES
# Ops that only move a parameter around (for "this operand is a parameter" checks).
_LAYOUT = {aten.t.default, aten.transpose.int, aten.permute.default, aten.expand.default, aten.unsqueeze.default,
           aten.squeeze.dim, aten.contiguous.default, aten.clone.default, aten.detach.default, aten._to_copy.default,
           aten.to.dtype, aten.alias.default} | _RESHAPES
_FAKE_QUANTIZE = torch.ops.mxfx.fake_quantize.default
# Products with a parameter (linear sites): never walked through when looking for scores.
_LINEAR_PRODUCTS = {aten.linear.default, aten.addmm.default, aten.mm.default}
_CAT = aten.cat.default  # cat([scores, sinks], -1): sink logits as extra columns of the softmax
_SLICE = aten.slice.Tensor  # P[..., :-1]: the key columns of the probabilities
_MAX_DEPTH = 24  # ops on a scores path (HF: mul, add, cast; T5: two adds; generous)


class _Rejected(Exception):
    """A candidate attention that fails a check (status, reason)."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.reason = status, reason


def sdpa_argument(node: fx.Node, name: str):
    """An argument of an SDPA call by its schema name (its default when not given)."""
    for index, argument in enumerate(SDPA._schema.arguments):
        if argument.name == name:
            if index < len(node.args):
                return node.args[index]
            return node.kwargs.get(name, argument.default_value if argument.has_default_value() else None)
    raise KeyError(name)


def attention_site_name(node: fx.Node) -> str:
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def _is_call(node, targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _shape(node) -> tuple | None:
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _same(a, b) -> bool:
    """Sizes (ints or SymInts) known to be equal."""
    return a == b if isinstance(a, int) and isinstance(b, int) else _compat.statically_known_true(a == b)


def _same_shape(a: tuple | None, b: tuple | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))


def product_operands(node: fx.Node) -> tuple[fx.Node, fx.Node]:
    """The (left, right) operands of a product in PRODUCTS."""
    if node.target is aten.einsum.default:
        return tuple(node.args[1])
    if node.target is aten.baddbmm.default:
        return node.args[1], node.args[2]
    return node.args[0], node.args[1]


def _einsum_parts(equation: str) -> tuple[str, str, str] | None:
    """(left, right, output) index letters of a two-operand einsum whose '...' (if any) leads every
    term, with '...' removed; None for any other equation."""
    inputs, arrow, output = equation.replace(" ", "").partition("->")
    terms = inputs.split(",")
    if not arrow or len(terms) != 2:
        return None
    terms.append(output)
    ellipses = {t.startswith("...") for t in terms}
    stripped = [t.removeprefix("...") for t in terms]
    if len(ellipses) != 1 or any("." in t or not t.isalpha() or len(set(t)) != len(t) for t in stripped):
        return None
    return stripped[0], stripped[1], stripped[2]


def einsum_contraction(equation: str) -> tuple[int, int] | None:
    """Positions (counted from the end) of the single contracted index in both operands of a
    two-operand einsum; None for anything else."""
    parts = _einsum_parts(equation)
    if parts is None:
        return None
    a, b, out = parts
    contracted = [c for c in a if c in b and c not in out]
    if len(contracted) != 1 or any(c not in out for c in a + b if c not in contracted):
        return None
    c = contracted[0]
    return a.index(c) - len(a), b.index(c) - len(b)


def contraction_axes(node: fx.Node) -> tuple[int, int] | None:
    """The reduction axis of each operand of a product: the last axis of the left operand and the
    second-to-last of the right one (for einsum, the contracted index's position)."""
    if node.target is aten.einsum.default:
        return einsum_contraction(node.args[0])
    return -1, -2


def _check_product(node: fx.Node, role: str) -> tuple[int, int]:
    """Check that `node` is `[..., L, D] x [..., D, S] -> [..., L, S]` (for QK^T: D contracted, the
    output's last two axes L from the left operand, S from the right; for PV the same with S
    contracted); returns its contraction axes or raises _Rejected."""
    form = PRODUCTS[node.target]
    left, right = product_operands(node)
    shapes = _shape(left), _shape(right), _shape(node)
    if any(s is None for s in shapes):
        raise _Rejected(UNSUPPORTED, f"{role} {form} {node.name!r} has no recorded shapes")
    a, b, out = shapes
    if form == "einsum":
        parts, axes = _einsum_parts(node.args[0]), einsum_contraction(node.args[0])
        if parts is None or axes is None or len(parts[2]) < 2:
            raise _Rejected(UNSUPPORTED, f"{role} einsum {node.args[0]!r} is not a two-operand product with one "
                                         "contracted index and an explicit output ('->')")
        la, lb, lo = parts
        # QK^T: [..., L, D] x [..., S, D] -> [..., L, S], L only in the left term, S only in the
        # right one (the softmax axis is then the key axis). PV: the probabilities' last (key) axis
        # is the contracted one; the output layout does not matter.
        if role == "QK^T" and not (lo[-2] in la and lo[-2] not in lb and lo[-1] in lb and lo[-1] not in la):
            raise _Rejected(CHECK_FAILED, f"{role} einsum {node.args[0]!r} does not give [..., L, S] from its operands")
        if role == "PV" and axes[0] != -1:
            raise _Rejected(CHECK_FAILED, f"PV einsum {node.args[0]!r} does not contract the probabilities' key axis")
        return axes
    if len(a) < 2 or len(b) < 2 or (form in ("bmm", "baddbmm") and (len(a) != 3 or len(b) != 3)):
        raise _Rejected(UNSUPPORTED, f"{role} {form} {node.name!r} has operands of shapes {list(a)} and {list(b)}")
    if not (_same(a[-1], b[-2]) and len(out) >= 2 and _same(out[-2], a[-2]) and _same(out[-1], b[-1])):
        raise _Rejected(CHECK_FAILED, f"{role} {form} {node.name!r}: {list(a)} x {list(b)} -> {list(out)} is not "
                                      "[..., L, D] x [..., D, S] -> [..., L, S]")
    return -1, -2


def _is_parameter(node, depth: int = 8) -> bool:
    """Whether `node` is a parameter or buffer, possibly transposed/reshaped/cast."""
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return False
        if node.op == "get_attr":
            return True
        if not _is_call(node, _LAYOUT):
            return False
        node = node.args[0]
    return False


def _keeps_last_axis(node: fx.Node, source: fx.Node) -> bool:
    out, inp = _shape(node), _shape(source)
    return out is not None and inp is not None and len(out) >= 1 and len(inp) >= 1 and _same(out[-1], inp[-1])


def trace_scores(node, depth: int = 0, path: list | None = None) -> fx.Node | None:
    """The product whose result the scores at `node` carry, following only the scores path.

    Returns None when the path reaches no product through the allowed ops (not attention scores);
    raises _Rejected when it reaches one in a way the pass cannot vouch for (two different
    products combined, the scores broadcast or divided into, a reshape of the key axis). `path`,
    when given, receives the nodes followed, from `node` down to the product.
    """
    if depth > _MAX_DEPTH or not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if path is not None:
        path.append(node)
    target = node.target
    if target in PRODUCTS:
        return node
    if target in _ELEMENTWISE:
        return trace_scores(node.args[0], depth + 1, path)
    if target in _RESHAPES:
        product = trace_scores(node.args[0], depth + 1, path)
        if product is not None and not _keeps_last_axis(node, node.args[0]):
            raise _Rejected(CHECK_FAILED, f"reshape {node.name!r} on the scores path changes the key axis")
        return product
    if target is _CAT:
        return _trace_cat(node, depth, path)
    if target in _COMMUTATIVE or target in _DIVISION or target in _WHERE or target in _BOUNDS:
        positions = _WHERE.get(target, (0, 1))
        operands = [node.args[i] for i in positions if i < len(node.args) and isinstance(node.args[i], fx.Node)]
        # The scores keep the result's shape; a broadcast operand is a scale, a mask or a bias, and
        # is never followed (even when a matmul computes it).
        full = [o for o in operands if _same_shape(_shape(o), _shape(node))]
        found = [(o, product) for o in full if (product := trace_scores(o, depth + 1)) is not None]
        if not found:
            broadcast = [o for o in operands if o not in full]
            if any(_reaches_product(o, depth + 1) for o in broadcast):
                raise _Rejected(CHECK_FAILED, f"only a broadcast operand of {node.name!r} carries a matmul product "
                                              f"(the scores must keep the shape {list(_shape(node) or ())})")
            return None
        if len({product for _, product in found}) > 1:
            raise _Rejected(CHECK_FAILED, f"{node.name!r} combines the products of several matmuls "
                                          f"({', '.join(p.name for _, p in found)}): which one is Q @ K^T is ambiguous")
        operand, product = found[0]
        if target in _DIVISION and operand is not node.args[0]:
            raise _Rejected(CHECK_FAILED, f"the scores are the divisor of {node.name!r}")
        for other in full:  # a full-shape term the path cannot follow may hold other scores (XLNet's Q @ R^T)
            hidden = [p for p in _activation_products(other) if p is not product] if other is not operand else []
            if hidden:
                raise _Rejected(CHECK_FAILED, f"{node.name!r} combines the scores of {product.name!r} with a term computed "
                                              f"from another product of activations ({hidden[0].name!r}) through ops the "
                                              "scores path does not follow (e.g. a relative-position score)")
        if path is not None:
            trace_scores(operand, depth + 1, path)  # record the followed operand's path
        return product
    return None


def _cat_dim(node: fx.Node) -> int:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    ndim = len(_shape(node) or ())
    return dim + ndim if dim < 0 else dim


def _trace_cat(node: fx.Node, depth: int, path: list | None) -> fx.Node | None:
    """`cat([scores, sinks], -1)`: the scores are the one operand that carries a product; the other
    operands (sink logits) are extra columns of the softmax and must carry no product at all."""
    operands = list(node.args[0])
    found = [(o, product) for o in operands if (product := trace_scores(o, depth + 1)) is not None]
    if not found:
        if any(_reaches_product(o, depth + 1) for o in operands):
            raise _Rejected(CHECK_FAILED, f"cat {node.name!r} joins a matmul product in a way the scores path cannot "
                                          "follow")
        return None
    if _cat_dim(node) != len(_shape(node) or ()) - 1:
        raise _Rejected(CHECK_FAILED, f"cat {node.name!r} on the scores path joins along axis {_cat_dim(node)}, not "
                                      "the key (last) axis")
    if len(found) > 1:
        raise _Rejected(CHECK_FAILED, f"cat {node.name!r} joins the products of several matmuls "
                                      f"({', '.join(p.name for _, p in found)}): which one is Q @ K^T is ambiguous")
    operand, product = found[0]
    for other in operands:
        if other is not operand and _upstream_activation_product(other) is not None:
            raise _Rejected(CHECK_FAILED, f"cat {node.name!r} joins the scores with columns computed from a product of "
                                          "activations: only sink logits free of products may be joined")
    if path is not None:
        trace_scores(operand, depth + 1, path)
    return product


def _reaches_product(node, depth: int) -> bool:
    try:
        return trace_scores(node, depth) is not None
    except _Rejected:
        return True


def _activation_products(node, limit: int = 64) -> list[fx.Node]:
    """The products of two activations met first walking back from `node` through any ops
    (without passing through another product)."""
    found, stack, seen = [], [node], set()
    while stack and len(seen) < limit:
        current = stack.pop()
        if not isinstance(current, fx.Node) or current in seen or current.op != "call_function":
            continue
        seen.add(current)
        if current.target in PRODUCTS:
            if not any(_is_parameter(operand) for operand in product_operands(current)):
                found.append(current)
            continue
        if current.target in _LINEAR_PRODUCTS:
            continue
        stack.extend(current.all_input_nodes)
    return found


def _upstream_activation_product(node, limit: int = 64) -> fx.Node | None:
    """The first product of two activations met walking back from `node` through any ops (without
    passing through another product), or None."""
    found = _activation_products(node, limit)
    return found[0] if found else None


def _trace_probs(softmax: fx.Node) -> list[tuple[fx.Node, fx.Node]]:
    """(product, operand node) for each product the softmax output reaches through dropout,
    casts and last-axis-keeping reshapes."""
    found, frontier, seen = [], [softmax], set()
    while frontier:
        node = frontier.pop()
        for user in node.users:
            if user in seen:
                continue
            seen.add(user)
            if user.op != "call_function":
                continue
            if user.target in PRODUCTS:
                found.append((user, node))
            elif user.target in _PROB_OPS and user.args[0] is node and (
                    user.target not in _RESHAPES or _keeps_last_axis(user, node)):
                frontier.append(user)
            elif _is_last_axis_slice(user, node):
                frontier.append(user)  # P[..., :-1]: dropping sink columns (checked against the key window)
            elif user.target is _FAKE_QUANTIZE and user.args[0] is node and user.args[3] in (-1, len(_shape(node)) - 1):
                frontier.append(user)  # P quantized along the key axis by QuantizeAttentionPass (a second run)
    return found


def _key_window(path: list[fx.Node], qk: fx.Node) -> tuple:
    """[start, stop) of the softmax's last axis that holds the QK^T product's key columns: the
    columns the scores keep through each `cat` on the scores path (`path`, softmax input first)."""
    start = 0
    for node, below in zip(path, path[1:]):
        if node.target is _CAT:
            for operand in node.args[0]:
                if operand is below:
                    break
                start = start + (_shape(operand) or (0,))[-1]
    return start, start + (_shape(qk) or (None,))[-1]


def _probs_window(operand: fx.Node, softmax: fx.Node) -> tuple | None:
    """[start, stop) of the softmax's last axis that `operand` (reached from the softmax through
    `_trace_probs`'s ops) holds, composing the slices along the last axis on the way."""
    chain = []
    node = operand
    while node is not softmax:
        chain.append(node)
        node = node.args[0]
    start, stop = 0, (_shape(softmax) or (None,))[-1]
    for node in reversed(chain):
        if node.target is not _SLICE:
            continue
        width = stop - start
        lo, hi = _slice_bounds(node)
        lo = 0 if lo is None else (width + lo if lo < 0 else lo)
        hi = width if hi is None or (isinstance(hi, int) and hi >= 2**62) else (width + hi if hi < 0 else hi)
        start, stop = start + lo, start + hi
    return start, stop


def _slice_bounds(node: fx.Node) -> tuple:
    start = node.args[2] if len(node.args) > 2 else node.kwargs.get("start")
    end = node.args[3] if len(node.args) > 3 else node.kwargs.get("end")
    return start, end


def _is_last_axis_slice(node: fx.Node, source: fx.Node) -> bool:
    if node.target is not _SLICE or node.args[0] is not source:
        return False
    ndim = len(_shape(source) or ())
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    step = node.args[4] if len(node.args) > 4 else node.kwargs.get("step", 1)
    return step == 1 and dim in (-1, ndim - 1) and not any(isinstance(b, fx.Node) for b in _slice_bounds(node))


def _softmax_dim(node: fx.Node) -> int:
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    ndim = len(_shape(node.args[0]) or ())
    return dim + ndim if isinstance(dim, int) and dim < 0 else dim


def match_softmax(softmax: fx.Node) -> tuple[str, fx.Node | None, fx.Node | None]:
    """(form, QK^T product, PV product) of a softmax that is explicit attention; None products when it
    is not attention at all. Raises _Rejected for a candidate that fails a check."""
    path: list[fx.Node] = []
    qk = trace_scores(softmax.args[0], path=path)
    uses = _trace_probs(softmax)
    if qk is None and not uses:
        return "", None, None  # not attention: e.g. a classifier's or an MoE router's softmax
    if qk is None:
        product = _upstream_activation_product(softmax.args[0])
        if product is None:
            return "", None, None  # softmax of parameters or of a linear's output (mixing weights, a router)
        raise _Rejected(UNSUPPORTED, f"the softmax feeds a matmul and its scores come from {product.name!r}, but "
                                     "not through the ops a scores path may contain")
    ndim = len(_shape(softmax.args[0]) or ())
    if _softmax_dim(softmax) != ndim - 1:
        raise _Rejected(CHECK_FAILED, f"softmax over axis {softmax.args[1]} of {ndim}, not the key (last) axis")
    _check_product(qk, "QK^T")
    if qk.target is aten.baddbmm.default:
        try:
            bias_product = trace_scores(qk.args[0])
        except _Rejected:
            bias_product = qk
        if bias_product is not None:
            raise _Rejected(CHECK_FAILED, f"the additive term of baddbmm {qk.name!r} carries a matmul product")
    left, right = product_operands(qk)
    if _is_parameter(left) or _is_parameter(right):
        raise _Rejected(CHECK_FAILED, f"an operand of {qk.name!r} is a parameter: a linear-like product, not Q @ K^T")
    left_uses = [(p, operand) for p, operand in uses if product_operands(p)[0] is operand]
    if not uses:
        raise _Rejected(UNSUPPORTED, "the softmax output reaches no P @ V matmul")
    if len(uses) != 1 or not left_uses:
        names = ", ".join(p.name for p, _ in uses)
        raise _Rejected(CHECK_FAILED, f"the probabilities reach {len(uses)} product(s) ({names}); P @ V must be the "
                                      "one product, with the probabilities as its left operand")
    pv, probs = left_uses[0]
    _check_product(pv, "PV")
    keys, columns = _key_window(path, qk), _probs_window(probs, softmax)
    if not (_same(keys[0], columns[0]) and _same(keys[1], columns[1])):
        raise _Rejected(CHECK_FAILED, f"the probabilities reach {pv.name!r} as columns [{columns[0]}, {columns[1]}) of "
                                      f"the softmax, but the keys of {qk.name!r} are its columns [{keys[0]}, {keys[1]})")
    return PRODUCTS[qk.target], qk, pv


class MatchAttentionSitesPass(PassBase):
    """Annotate each SDPA node, and each softmax between two attention matmuls, with its site.

    Requires: an ATen graph with nn_module_stack and meta["val"]. Ensures: a `mxfx.graph.sites.Site` on
    each SDPA node and each softmax that is (or looks like, then with status CHECK_FAILED or
    UNSUPPORTED and a reason) explicit attention, with `form` the score product ("matmul", "bmm",
    "baddbmm", "einsum") and `nodes` = (QK^T, PV) product nodes; the graph is unchanged;
    `modified` is True only when an annotation was added or changed.
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = 0
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            fields = {}
            if node.target is SDPA:
                form, nodes = "sdpa", ()
                dropout = sdpa_argument(node, "dropout_p")
                if dropout:
                    fields = {"status": UNSUPPORTED, "reason": f"scaled_dot_product_attention with dropout_p={dropout} "
                              "(a training-mode graph): mxfx.attention has no dropout; export the model in eval mode"}
            elif node.target in SOFTMAXES:
                try:
                    form, qk, pv = match_softmax(node)
                except _Rejected as rejected:
                    form = _rejected_form(node)
                    nodes, fields = (), {"status": rejected.status, "reason": rejected.reason}
                else:
                    if qk is None:
                        continue
                    nodes = (qk.name, pv.name)
            else:
                continue
            fqn = attention_site_name(node)
            site = Site(fqn=fqn, kind=ATTENTION, form=form, node=node.name, nodes=nodes,
                        **(decide(self.config, fqn, ATTENTION) | fields))
            changed += annotate(node, site)
            if fields:
                log.debug("attention candidate %s at %s left alone (%s): %s", node.name, fqn, site.status, site.reason)
            else:
                log.debug("attention site %s (%s)", fqn, form)
        count_rewrites(gm, type(self).__name__, changed)
        return PassResult(gm, changed > 0)


def _rejected_form(softmax: fx.Node) -> str:
    try:
        qk = trace_scores(softmax.args[0])
    except _Rejected:
        qk = None
    return PRODUCTS[qk.target] if qk is not None else "softmax"
