"""Give the linear sites of a fresh export the quantized form they already have in a prepared graph.

A model whose code branches on an input size (Hugging Face masks treat batch 1 and sequence
length 1 apart) is exported again for that shape class (`mxfx.graph.shape_classes`). Its linears
are the same modules with the same weights, so instead of rotating, GPTQ-rounding and quantizing
the weights a second time, each rewritten linear of the prepared graph is copied here: the mxfx
ops applied to its input (`mxfx.hadamard`, `mxfx.fake_quantize`), then the product itself with its
constant operands (the prepared module's codes, scales, rotated or simulated weights and bias, the
same tensor objects: nothing is copied or quantized). Sites are paired by name, in graph order. Expert sites are `TransplantExpertsPass`'s.
"""

from __future__ import annotations

import collections
import logging

import torch
from mxfx.passes._utils import count_rewrites, create_call, fake_mode_of, finish
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx.errors import MXFXError
from mxfx.graph.sites import EXPERT_FORMS, LINEAR, site_of

log = logging.getLogger(__name__)
aten = torch.ops.aten
DONE_META = "mxfx_transplanted"  # node.meta key: this linear was copied from the source graph


class TransplantError(MXFXError, ValueError):
    """The fresh graph's linear sites do not pair with the prepared graph's (another structure)."""


def _is_mxfx_op(node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and getattr(node.target, "namespace", None) == "mxfx")


def _rewritten(node: fx.Node) -> bool:
    """Whether a prepared graph's linear site differs from the plain `aten.linear(x, W, b)`."""
    if node.target is not aten.linear.default:
        return True
    inputs = node.all_input_nodes
    return any(_is_mxfx_op(n) or (n.op == "get_attr" and str(n.target).startswith("mxfx_")) for n in inputs)


def _linear_sites(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    found = collections.defaultdict(list)
    for node in gm.graph.nodes:
        site = site_of(node)
        if site is not None and site.kind == LINEAR and node.op == "call_function" and site.form not in EXPERT_FORMS:
            found[site.fqn].append(node)
    return found


class TransplantLinearsPass(PassBase):
    """Copy each rewritten linear site of `source` (a prepared graph of the same model) into the graph.

    Requires: the matching passes have annotated the graph's linear sites; `source` was prepared
    from the same model. Ensures: every copied node has meta["val"] and the replaced linear's
    nn_module_stack; the source's site metadata travels with the product; running twice is a no-op.

    Raises:
        TransplantError: the two graphs' linear sites differ (names or counts), or a source site
            reads something other than its input and constants.
    """

    def __init__(self, source: fx.GraphModule) -> None:
        self.source = source  # read only: its attributes are shared, never modified

    def call(self, gm: fx.GraphModule) -> PassResult:
        fake_mode = fake_mode_of(gm)
        theirs, ours = _linear_sites(self.source), _linear_sites(gm)
        counts = ({k: len(v) for k, v in theirs.items()}, {k: len(v) for k, v in ours.items()})
        if counts[0] != counts[1]:
            missing = sorted(set(counts[0].items()) ^ set(counts[1].items()))[:3]
            raise TransplantError(f"the re-exported graph's linear sites differ from the prepared one's: {missing}")
        rewrites = 0
        for fqn, nodes in ours.items():
            for node, source in zip(nodes, theirs[fqn]):
                if DONE_META in node.meta or not _rewritten(source):
                    continue
                with gm.graph.inserting_before(node):
                    copied = self._copy(gm, source, node, fake_mode)
                copied.meta.update({k: v for k, v in source.meta.items() if k.startswith("mxfx_")})
                copied.meta[DONE_META] = True
                node.replace_all_uses_with(copied)
                gm.graph.erase_node(node)
                rewrites += 1
                log.debug("transplanted %s from the prepared graph", fqn)
        if rewrites:
            finish(gm)
            read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
            for name, _ in list(gm.named_parameters()):  # fp weights nothing reads any more
                if name not in read:
                    owner, _, attr = name.rpartition(".")
                    delattr(gm.get_submodule(owner) if owner else gm, attr)
        count_rewrites(gm, type(self).__name__, rewrites)
        return PassResult(gm, rewrites > 0)

    def _copy(self, gm: fx.GraphModule, source: fx.Node, target: fx.Node, fake_mode) -> fx.Node:
        """`source` rebuilt in `gm` on `target`'s input, its other operands copied as constants."""
        chain, x = [], source.args[0]
        while _is_mxfx_op(x) and source.target is not x.target:  # the mxfx ops applied to the input
            chain.append(x)
            x = x.args[0]
        value = target.args[0]
        for node in reversed(chain):
            value = create_call(gm, node.target, (value, *self._constants(gm, node.args[1:], fake_mode)), target,
                                fake_mode)
        if source.kwargs:
            raise TransplantError(f"{source.name} has keyword arguments, which the transplant does not copy")
        return create_call(gm, source.target, (value, *self._constants(gm, source.args[1:], fake_mode)), target,
                           fake_mode)

    def _constants(self, gm: fx.GraphModule, args, fake_mode) -> list:
        return [self._constant(gm, a, fake_mode) for a in args]

    def _constant(self, gm: fx.GraphModule, arg, fake_mode):
        if isinstance(arg, (list, tuple)):
            return type(arg)(self._constant(gm, a, fake_mode) for a in arg)
        if not isinstance(arg, fx.Node):
            return arg
        if arg.op == "get_attr":  # the source's tensor object, under the same path (nothing copied)
            tensor = _attribute(self.source, arg.target)
            owner, _, name = arg.target.rpartition(".")
            if owner and not _has_submodule(gm, owner):
                owner, name = "", arg.target.replace(".", "_")
            module = gm.get_submodule(owner) if owner else gm
            module._parameters.pop(name, None)
            module._buffers.pop(name, None)
            if isinstance(tensor, torch.nn.Parameter):
                module.register_parameter(name, tensor)
            else:
                module.register_buffer(name, tensor)
            node = gm.graph.get_attr(f"{owner}.{name}" if owner else name)
            node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode is not None else tensor
            return node
        if arg.op == "call_function" and not any(n.op == "placeholder" for n in arg.all_input_nodes):
            return create_call(gm, arg.target, tuple(self._constants(gm, arg.args, fake_mode)), arg, fake_mode)
        raise TransplantError(f"{arg.name} ({arg.op}) is not a constant of the prepared module")


def _attribute(gm: fx.GraphModule, target: str) -> torch.Tensor:
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


def _has_submodule(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
        return True
    except AttributeError:
        return False

