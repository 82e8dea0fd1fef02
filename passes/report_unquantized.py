"""Record, after matching, every weight use and attention-like softmax that no pass made a site.

The matching passes recognise forms (`aten.linear`, SDPA, explicit attention chains, ...). This
pass is the completeness check behind them: it does not enumerate forms but walks the graph, so an
unknown form shows up as a report row (status UNSUPPORTED, the op and the reason) instead of as
nothing. It runs last among the matching passes, so `mxfx.find_sites` and `mxfx.prepare` report
the same rows.

The rules, precisely:

1. A *weight value* is a get_attr of a floating-point parameter or buffer with >= 2 dims; the
   result of an `aten` / `prims` op whose tensor inputs are all weight values or other constants
   (get_attrs, tensors made from no tensor input such as `arange(L)`, and what is computed from
   them alone: views, transposes, slices, casts, `W * g`, `A @ B` of two parameters; but never the
   output of a node that carries a Site, which is an activation); and a gather of whole matrices out of a >= 3-D weight value by
   indices computed from the inputs (`aten.index` / `index_select` along dim 0, the
   mixture-of-experts `W[expert_ids]` form), which is still a stack of weight matrices.
2. A *use* of a weight is a node that reads a weight value and is not itself one. A use that is
   - a product-like op (`PRODUCTS`: linear, mm, matmul, bmm, baddbmm, einsum, `_grouped_mm`, ...),
   - a convolution (`CONVOLUTIONS`), or
   - any op outside `aten` / `prims` / `mxfx` (a `torch.library` custom op such as an opaque
     `transformers.*` kernel, a higher-order op, a submodule call): mxfx cannot know what it
     computes,
   must carry a Site (any status: a matching pass decided about it). One that does not is
   annotated UNSUPPORTED with the op and the reason.
3. Any other use is not a site, by rule: elementwise ops (a norm's scale, a bias add, a
   mask), normalisations, concatenation with activations, and row lookups into a table
   (`aten.embedding`, or `index` of a 2-D parameter: they read rows, they compute no product).
   A weight that reaches a product only through such an op (`x @ (W * a)` with `a` an
   activation) is not followed: the product's operand is then an activation.
4. A softmax without a Site whose input descends from a product of two activations (walking back
   through any op and stopping at the first product, convolution or opaque op on each path; the
   product has no weight-value operand) is annotated as an UNSUPPORTED attention site: attention
   in a form the attention matcher does not recognise.

Weight-use rows have kind "linear", form = the op's name (`conv2d`, `bmm`,
`mylib.fused_mlp`), the fqn a linear would get (`passes._utils.linear_site_name`) and the
parameter in `weight_target`; the config's first matching rule is recorded (so that prepare warns
when it asked for the site).
"""

from __future__ import annotations

import logging
import operator

import torch
from mxfx.passes._utils import count_rewrites, linear_site_name, module_path, weight_chain
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx.graph.config import QuantConfig
from mxfx.graph.sites import ATTENTION, LINEAR, UNSUPPORTED, Site, annotate, decide, site_of

log = logging.getLogger(__name__)
aten = torch.ops.aten

# Product-like ops (matched by overload packet: every overload of each). `aten.linear` is here too:
# a linear no pass annotated (it cannot happen after MatchLinearSitesPass, but nothing is assumed).
PRODUCTS = {
    aten.linear, aten.addmm, aten.mm, aten.matmul, aten.bmm, aten.baddbmm, aten.addbmm, aten.einsum, aten.mv,
    aten.addmv, aten.dot, aten.vdot, aten.inner, aten.outer, aten.ger, aten.addr, aten.tensordot, aten.kron,
    aten.bilinear, aten._trilinear, aten.chain_matmul, aten.linalg_multi_dot, aten._grouped_mm, aten._scaled_mm,
    aten._int_mm, aten.linalg_vecdot,
}
CONVOLUTIONS = {
    aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution, aten.conv_transpose1d,
    aten.conv_transpose2d, aten.conv_transpose3d, aten.conv_tbc, aten.mkldnn_convolution,
}
_KNOWN_NAMESPACES = ("aten", "prims", "mxfx")
# Gathers that pick whole matrices out of a stacked (>= 3-D) weight by activation indices.
_MATRIX_GATHERS = {aten.index.Tensor, aten.index_select.default}
SOFTMAXES = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default, aten.log_softmax.int,
             aten._log_softmax.default}


def _val(node):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _packet(node: fx.Node):
    return getattr(node.target, "overloadpacket", None)


def _op_name(node: fx.Node) -> str:
    """`conv2d`, `bmm` for aten ops; `namespace.name` for others; the module path for call_module."""
    if node.op == "call_module":
        return f"submodule {node.target}"
    namespace = getattr(node.target, "namespace", None)
    name = getattr(node.target, "__name__", str(node.target))
    packet = _packet(node)
    if packet is not None:
        name = packet.__name__.rpartition(".")[-1] if namespace == "aten" else f"{namespace}.{packet.__name__.rpartition('.')[-1]}"
    return name


def is_opaque(node: fx.Node) -> bool:
    """Whether mxfx cannot know what `node` computes: a call_module, or a call_function whose target
    is not an `aten` / `prims` / `mxfx` op (custom ops, higher-order ops, Python callables other than
    `operator.getitem`)."""
    if node.op == "call_module":
        return True
    if node.op != "call_function" or node.target is operator.getitem:
        return False
    return getattr(node.target, "namespace", None) not in _KNOWN_NAMESPACES


def _is_float_tensor(value) -> bool:
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """Inputs carrying tensors (sizes, SymInts from graph inputs, are not data)."""
    return [i for i in node.all_input_nodes if not isinstance(_val(i), (torch.SymInt, int, float, bool))]


def weight_values(gm: fx.GraphModule) -> dict[fx.Node, fx.Node]:
    """node -> the parameter/buffer get_attr it is a weight value of (rule 1 of the module docstring)."""
    weights: dict[fx.Node, fx.Node] = {}
    constant: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            constant.add(node)
            val = _val(node)
            if _is_float_tensor(val) and val.dim() >= 2:
                weights[node] = node
            continue
        if node.op != "call_function" or is_opaque(node) or site_of(node) is not None:
            continue  # what a site computes is an activation, even from constant inputs (XLNet's positional keys)
        inputs = _tensor_inputs(node)
        roots = [weights[i] for i in inputs if i in weights]
        if all(i in constant for i in inputs):  # no tensor input at all (`arange(L)`, `full`): a constant too
            constant.add(node)
            if roots:
                weights[node] = roots[0]
        elif node.target in _MATRIX_GATHERS and inputs and inputs[0] in weights and _gathers_matrices(node):
            weights[node] = weights[inputs[0]]
    return weights


def _gathers_matrices(node: fx.Node) -> bool:
    source = _val(node.args[0])
    if source is None or source.dim() < 3:
        return False
    if node.target is aten.index_select.default:
        return node.args[1] in (0, -source.dim())
    indices = node.args[1]
    return len(indices) >= 1 and indices[0] is not None and all(i is None for i in indices[1:])


def _is_use_site(node: fx.Node) -> bool:
    return _packet(node) in PRODUCTS or _packet(node) in CONVOLUTIONS or is_opaque(node)


def _weight_reason(node: fx.Node, attrs: list[fx.Node]) -> str:
    names = ", ".join(f"{a.target!r} {list(_val(a).shape)}" for a in attrs)
    what = f"{_op_name(node)} reads parameter {names}"
    if _packet(node) in CONVOLUTIONS:
        return f"{what}: a convolution mxfx does not quantize (only a kernel-1, one-group, stride-1, unpadded Conv1d is a linear)"
    if is_opaque(node):
        return f"{what}: an op outside aten whose computation mxfx cannot see (not quantized)"
    return f"{what}: not a product form mxfx rewrites into a linear"


def _first_products(start: fx.Node, weights: dict) -> list[fx.Node]:
    """Products, convolutions and opaque ops met first walking back from `start` through any op."""
    found, seen, stack = [], set(), [start]
    while stack:
        node = stack.pop()
        if not isinstance(node, fx.Node) or node in seen or node in weights:
            continue
        seen.add(node)
        if node.op not in ("call_function", "call_module"):
            continue
        if _is_use_site(node) or node.op == "call_module":
            found.append(node)
        else:
            stack.extend(node.all_input_nodes)
    return found


class ReportUnquantizedPass(PassBase):
    """Annotate every weight use and attention-like softmax that carries no Site as UNSUPPORTED.

    Requires: the other matching passes have run (their Sites mark what they decided about).
    Ensures: the graph is unchanged; every node the module docstring's rules 2 and 4 select carries
    a Site; `modified` is True only when an annotation was added or changed (running twice is a
    no-op).
    """

    def __init__(self, config: QuantConfig) -> None:
        self.config = config

    def call(self, gm: fx.GraphModule) -> PassResult:
        weights = weight_values(gm)
        changed = 0
        for node in gm.graph.nodes:
            if node.op not in ("call_function", "call_module") or node in weights:
                continue
            if site_of(node) is not None:
                continue  # a pass decided about this node (any status), or this pass ran before
            site = None
            attrs = list(dict.fromkeys(weights[i] for i in _tensor_inputs(node) if i in weights))
            if attrs and _is_use_site(node):
                site = self._weight_site(node, attrs, weights)
            elif node.op == "call_function" and node.target in SOFTMAXES:
                site = self._softmax_site(node, weights)
            if site is not None:
                changed += annotate(node, site)
                log.debug("not quantized: %s (%s): %s", site.fqn, site.form, site.reason)
        count_rewrites(gm, type(self).__name__, changed)
        return PassResult(gm, changed > 0)

    def _weight_site(self, node: fx.Node, attrs: list[fx.Node], weights: dict) -> Site:
        operand = next(i for i in _tensor_inputs(node) if i in weights)
        found = weight_chain(operand)
        if len(attrs) == 1 and found is not None and found[0] is attrs[0]:
            fqn = linear_site_name(node, *found)
        elif len(attrs) == 1:
            fqn = linear_site_name(node, attrs[0])
        else:
            fqn = module_path(node) or node.name
        fields = decide(self.config, fqn, LINEAR)
        fields = {"rule": fields["rule"], "rule_label": fields["rule_label"]}
        return Site(fqn=fqn, kind=LINEAR, form=_op_name(node), node=node.name, status=UNSUPPORTED,
                    reason=_weight_reason(node, attrs),
                    weight_target=", ".join(str(a.target) for a in attrs), **fields)

    def _softmax_site(self, node: fx.Node, weights: dict) -> Site | None:
        for product in _first_products(node.args[0], weights):
            if _packet(product) in PRODUCTS and not any(i in weights for i in _tensor_inputs(product)):
                fqn = module_path(node)
                fields = decide(self.config, fqn, ATTENTION)
                return Site(fqn=fqn, kind=ATTENTION, form="softmax", node=node.name, status=UNSUPPORTED,
                            reason=f"{_op_name(node)} over {_op_name(product)} {product.name!r}, a product "
                                   "of two activations, in a form the attention matcher does not recognise",
                            rule=fields["rule"], rule_label=fields["rule_label"])
        return None
