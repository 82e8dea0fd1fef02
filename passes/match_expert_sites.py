"""Find mixture-of-experts sites: a stacked expert parameter applied per expert to the tokens routed to it.

A mixture-of-experts block stores each projection of its E experts as one 3-D parameter
(transformers 5.x: `experts.gate_up_proj`, `experts.down_proj`), `[E, out, in]` or, transposed,
`[E, in, out]`. Such a parameter is *one* linear site, named by its path
(`model.layers.0.mlp.experts.gate_up_proj`), quantized as a dense linear would be if each expert
were an `nn.Linear`: the weight per expert along that expert's in_features, the activations per
token along in_features (OCP MX v1.0 §6.3: one block, one scale, along the reduction axis).

Forms (in the plain torch.export graph), each matched, then checked:

- `grouped_mm`: a grouped product of the rows of x, sorted by expert, with the weight viewed as
  `[E, in, out]`: `transformers.grouped_mm_fallback(x[S, in], W[E, in, out], offsets[E])` (an
  opaque custom op, fp32 exports) or `aten._grouped_mm(x, W, offs)` (bf16 exports). Checked: x is
  2-D, the weight operand 3-D with E = len(offsets) and in = x's last axis, the output `[S, out]`.
- `expert_bmm`: the expert matrix of each row gathered, `W[expert_ids]` (`aten.index` along dim
  0), then `bmm(x[S, 1, in], W_sel[S, in, out])` or, weight on the left,
  `bmm(W_sel[S, out, in], x[S, in, 1])`; or the stacked parameter itself batched against x, batch
  entry e being expert e (Llama 4: `bmm(x.view(E, -1, in), W[E, in, out])`). Checked: the gather
  indexes dim 0 only, one id (or, ungathered, one expert) per bmm batch row, the batch axis is the
  parameter's experts axis, and the contracted axes of x and the weight have the same size.

The weight operand is followed back to its parameter through transposes of the two matrix axes,
casts and copies (and, for `expert_bmm`, the gather), keeping track of where in_features lies,
so either stored layout is blocked along the product's reduction axis, never blindly along the
parameter's last axis. A candidate whose weight comes from a 3-D parameter but fails a check is
annotated CHECK_FAILED with the reason (left in high precision); biases (`*_proj_bias`, `[E, out]`)
are added after the product and stay in high precision, as a dense linear's bias does.

Per-expert `nn.Linear` lists are ordinary linears (`experts.0.w1`, ...), found by
MatchLinearSitesPass.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from mxfx.passes._utils import count_rewrites
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx.graph.config import QuantConfig
from mxfx.graph.sites import CHECK_FAILED, EXPERT_BMM, GROUPED_MM, LINEAR, Site, annotate, decide, site_of

log = logging.getLogger(__name__)
aten = torch.ops.aten

# Between a stacked parameter and the product: casts and copies (any axis order kept) ...
_KEEP_AXES = {aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout, aten.contiguous.default,
              aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default}
# ... and swaps of two axes.
_SWAPS = {aten.transpose.int, aten.permute.default}


def grouped_ops() -> tuple:
    """The grouped-product ops `(x[S, in], W[E, in, out], offsets[E]) -> [S, out]` known here:
    `aten._grouped_mm` and, when transformers has registered it, its opaque fallback op."""
    ops = [aten._grouped_mm.default]
    try:  # registered by transformers.integrations.moe; mxfx never imports transformers
        ops.append(torch.ops.transformers.grouped_mm_fallback.default)
    except (AttributeError, RuntimeError):
        pass
    return tuple(ops)


@dataclasses.dataclass(frozen=True)
class ExpertProduct:
    """How an expert product reads its operands: what quantization and recovery need to know."""

    form: str  # GROUPED_MM or EXPERT_BMM
    x_index: int  # position of the activation operand in node.args
    x_axis: int  # its in_features axis (non-negative): blocks per token along it
    w_index: int  # position of the weight operand in node.args
    w_axis: int  # the weight operand's in_features axis (non-negative)
    attr: fx.Node  # the get_attr of the stacked parameter
    chain: tuple[fx.Node, ...]  # the nodes from the get_attr to the weight operand
    param_axis: int  # in_features axis of the stored parameter: 2 for [E, out, in], 1 for [E, in, out]
    # grouped: the offsets (cumulative rows per expert); gathered bmm: the expert id of each row;
    # None: bmm against the stacked parameter itself (batch entry e is expert e)
    routing: fx.Node | None

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, out_features, in_features) of the stacked parameter."""
        e, a, b = (int(s) for s in self.attr.meta["val"].shape)
        return (e, a, b) if self.param_axis == 2 else (e, b, a)


class _Reject(Exception):
    """A candidate that fails its check: why, and the parameter it reads when that is known."""

    def __init__(self, reason: str, attr: fx.Node | None = None) -> None:
        super().__init__(reason)
        self.attr = attr


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _bound(node: fx.Node) -> list:
    """node.args in schema order, with keyword arguments filled in (None where absent)."""
    names = [a.name for a in node.target._schema.arguments]
    args = list(node.args) + [None] * (len(names) - len(node.args))
    for name, value in node.kwargs.items():
        if name in names:
            args[names.index(name)] = value
    return args


def _follow_weight(operand: fx.Node, axis: int, gather_ok: bool) -> tuple[fx.Node, list[fx.Node], int, fx.Node | None]:
    """Walk a weight operand back to its get_attr, tracking where in_features (operand axis `axis`)
    and the batch axis (operand axis 0) come from.

    Returns (get_attr, chain from it to `operand`, the parameter's in_features axis, the gather
    node or None). Raises _Reject when the operand is anything else, or when the batch axis is not
    the parameter's experts axis (0)."""
    chain: list[fx.Node] = []
    gather = None
    node = operand
    axes = [0, axis]  # positions of (batch axis, in_features) in the current node
    while node.op != "get_attr":
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            raise _Reject(f"the weight operand is computed by {node.op} {node.target}")
        ndim = _val(node).dim()
        if node.target in _KEEP_AXES:
            pass
        elif node.target is aten.transpose.int:
            a, b = (d % ndim for d in node.args[1:3])
            axes = [b if p == a else a if p == b else p for p in axes]  # output axis a is input axis b
        elif node.target is aten.permute.default:
            axes = [[d % ndim for d in node.args[1]][p] for p in axes]
        elif node.target is aten.index.Tensor and gather_ok and gather is None:
            indices = list(node.args[1])
            if len(indices) != 1 or not isinstance(indices[0], fx.Node) or _val(indices[0]).dim() != 1:
                raise _Reject("the expert gather does not index dim 0 with one 1-D id tensor")
            if indices[0].meta["val"].dtype not in (torch.int64, torch.int32):
                raise _Reject("the expert gather's index is not an integer tensor")
            gather = node
        else:
            raise _Reject(f"the weight operand passes through {node.target}")
        chain.append(node)
        node = node.args[0]
    if any(isinstance(a, fx.Node) for n in chain if n is not gather for a in n.args[1:]):
        raise _Reject("the weight operand's view depends on the inputs")
    value = _val(node)
    if not isinstance(value, torch.Tensor) or value.dim() != 3 or not value.is_floating_point():
        raise _Reject("the weight operand is not a stacked 3-D floating-point parameter")
    if axes[1] == 0 or axes[0] != 0:
        raise _Reject("the product's batch axis is not the parameter's experts axis")
    return node, chain[::-1], axes[1], gather


def _is_weight(node: fx.Node, axis: int) -> bool:
    try:
        _follow_weight(node, axis, gather_ok=True)
    except _Reject:
        return False
    return True


def expert_product(node: fx.Node) -> ExpertProduct | None:
    """The operands of an expert product (see the module docstring), or None if `node` is not one.

    Raises:
        _Reject (internal): a product with a stacked parameter operand that fails its check.
    """
    if node.op != "call_function":
        return None
    if node.target in grouped_ops():
        x, w, offsets = _bound(node)[:3]
        if not isinstance(w, fx.Node) or not isinstance(x, fx.Node) or not isinstance(offsets, fx.Node):
            return None
        try:
            attr, chain, param_axis, _ = _follow_weight(w, 1, gather_ok=False)
        except _Reject:
            return None  # not a parameter operand (or an unknown view): the completeness check reports it
        xv, wv, ov, out = _val(x), _val(w), _val(offsets), _val(node)
        if xv.dim() != 2 or wv.dim() != 3 or ov.dim() != 1:
            raise _Reject(f"a grouped product of {xv.dim()}-D x and {wv.dim()}-D weight with {ov.dim()}-D offsets "
                          "(the expert form is 2-D x, [E, in, out] weight, [E] offsets)", attr)
        if ov.shape[0] != wv.shape[0] or xv.shape[1] != wv.shape[1] or tuple(out.shape[1:]) != (wv.shape[2],):
            raise _Reject(f"shapes x {tuple(xv.shape)}, weight {tuple(wv.shape)}, offsets {tuple(ov.shape)} -> "
                          f"{tuple(out.shape)} are not [S, in] x [E, in, out] -> [S, out] with E offsets", attr)
        return ExpertProduct(GROUPED_MM, 0, 1, 1, 1, attr, tuple(chain), param_axis, offsets)
    if node.target is aten.bmm.default:
        left, right = node.args[:2]
        for w_index, w in ((1, right), (0, left)):
            if not isinstance(w, fx.Node):
                continue
            w_axis = 1 if w_index == 1 else 2  # bmm contracts left's axis 2 with right's axis 1
            try:
                attr, chain, param_axis, gather = _follow_weight(w, w_axis, gather_ok=True)
            except _Reject:
                continue
            x = node.args[1 - w_index]
            x_axis = 2 if w_index == 1 else 1
            if not isinstance(x, fx.Node):
                raise _Reject("the bmm's other operand is not a tensor", attr)
            if _is_weight(x, x_axis):
                raise _Reject("both bmm operands are read from stacked parameters (not a linear of activations)", attr)
            xv, wv = _val(x), _val(w)
            ids = gather.args[1][0] if gather is not None else None
            rows = _val(ids).shape[0] if ids is not None else _val(attr).shape[0]  # gathered ids, or E
            if xv.shape[x_axis] != wv.shape[w_axis] or rows != wv.shape[0]:
                raise _Reject(f"bmm of {tuple(xv.shape)} and {'gathered ' if ids is not None else ''}weight "
                              f"{tuple(wv.shape)}: not one expert matrix per batch row", attr)
            return ExpertProduct(EXPERT_BMM, 1 - w_index, x_axis, w_index, w_axis, attr, tuple(chain), param_axis, ids)
    return None


class MatchExpertSitesPass(PassBase):
    """Annotate each expert product (grouped_mm, expert_bmm) with a linear Site named by its stacked
    parameter, and the rule that decides it.

    Requires: an ATen graph from torch.export with meta["val"]. Ensures: the graph is unchanged;
    an expert product carries a Site (kind "linear", `form` "grouped_mm" or "expert_bmm",
    `weight_shape` (E, out_features, in_features)); a candidate failing its check carries a
    CHECK_FAILED Site with the reason; `modified` is True only when an annotation changed.
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        changed = 0
        for node in gm.graph.nodes:
            old = site_of(node)
            if old is not None and old.supported and old.form not in (GROUPED_MM, EXPERT_BMM):
                continue  # another pass's site (an unsupported record, e.g. bmm with a 3-D weight, may be ours)
            try:
                product = expert_product(node)
            except _Reject as reject:
                fqn = str(reject.attr.target) if reject.attr is not None else node.name
                form = GROUPED_MM if node.target in grouped_ops() else EXPERT_BMM
                fields = decide(self.config, fqn, LINEAR)
                site = Site(fqn=fqn, kind=LINEAR, form=form, node=node.name, status=CHECK_FAILED, reason=str(reject),
                            rule=fields["rule"], rule_label=fields["rule_label"], weight_target=fqn)
                log.debug("expert candidate %s left alone: %s", node.name, reject)
                changed += annotate(node, site)
                continue
            if product is None:
                continue
            fqn = str(product.attr.target)
            site = Site(fqn=fqn, kind=LINEAR, form=product.form, node=node.name, weight_target=fqn,
                        weight_shape=product.shape, **decide(self.config, fqn, LINEAR))
            changed += annotate(node, site)
            log.debug("expert site %s (%s, %s experts) -> %s", fqn, product.form, product.shape[0], site.status)
        count_rewrites(gm, type(self).__name__, changed)
        return PassResult(gm, changed > 0)
