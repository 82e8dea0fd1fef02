"""Small helpers shared by the mxfx passes: site names, new nodes with correct meta, counters."""

from __future__ import annotations

import contextlib
import functools
import operator
import pydoc
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from mxfx import _compat

aten = torch.ops.aten

MXFX_META = "mxfx"  # gm.meta[MXFX_META]: {"rewrites": {pass: n}, "sites": [...], ...}
LOWERED_META = "mxfx_lowered"  # node.meta key: LowerLinearPass made this mxfx.linear
PRECOMPUTED_META = "mxfx_precomputed_weight"  # get_attr node meta: MXData computed by GPTQWeightsPass
QDQ_DONE_META = "mxfx_qdq"  # node.meta key: InsertQDQPass has processed this linear (its specs: the Site)


def mxfx_meta(gm: fx.GraphModule) -> dict:
    return gm.meta.setdefault(MXFX_META, {"rewrites": {}, "sites": []})


def count_rewrites(gm: fx.GraphModule, pass_name: str, n: int) -> None:
    """Add `n` to the pass's rewrite counter (read by tests and the summary)."""
    rewrites = mxfx_meta(gm)["rewrites"]
    rewrites[pass_name] = rewrites.get(pass_name, 0) + n


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(path, type name) of the modules enclosing `node`, outermost first."""
    return list((node.meta.get("nn_module_stack") or {}).values())


def module_path(node: fx.Node) -> str:
    """The path of the innermost module enclosing `node` ("" at the root or without a stack):
    the site name of a node with no Site (e.g. in a module loaded from a .pt2 file)."""
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


# Ops a weight may pass through between its get_attr and the product and still be a constant
# expression of that one parameter: views, transposes, slices, broadcasts, casts, copies.
_WEIGHT_CHAIN_OPS = {
    aten.t.default, aten.transpose.int, aten.permute.default, aten.numpy_T.default, aten.mT.default,
    aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints, aten.unflatten.int,
    aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.expand.default, aten.unsqueeze.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, aten.contiguous.default, aten.clone.default,
    aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default, aten._to_copy.default, aten.to.dtype,
    aten.to.dtype_layout,
}
# Ops with several outputs, read through operator.getitem (MultiheadAttention's packed in_proj_weight).
_SPLIT_OPS = {aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unsafe_chunk.default,
              aten.unsafe_split.Tensor, aten.unbind.int}
# Ops that keep the source's rows where they are (for naming a row slice of a packed weight).
_ROW_NEUTRAL_OPS = {aten.contiguous.default, aten.clone.default, aten.alias.default, aten.detach.default,
                    aten.lift_fresh_copy.default, aten._to_copy.default, aten.to.dtype, aten.to.dtype_layout}


def _has_node(value: Any) -> bool:
    found = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def weight_chain(node: Any) -> tuple[fx.Node, list[fx.Node]] | None:
    """If `node` is a constant expression of one get_attr through `_WEIGHT_CHAIN_OPS` (and
    split + getitem), return (the get_attr, the chain's nodes from it to `node`); else None."""
    chain: list[fx.Node] = []
    while isinstance(node, fx.Node):
        if node.op == "get_attr":
            return node, chain[::-1]
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], fx.Node):
            return None
        if node.target is operator.getitem:
            split = node.args[0]
            if split.op != "call_function" or split.target not in _SPLIT_OPS or _has_node((split.args[1:], split.kwargs)):
                return None
            chain += [node, split]
            node = split.args[0]
            continue
        if node.target not in _WEIGHT_CHAIN_OPS or _has_node((node.args[1:], node.kwargs)):
            return None
        chain.append(node)
        node = node.args[0]
    return None


def evaluate_chain(source: torch.Tensor, attr: fx.Node, chain: list[fx.Node]) -> torch.Tensor:
    """Run a weight chain (from `weight_chain`) on the real tensor `source` read from `attr`."""
    env: dict[fx.Node, Any] = {attr: source}
    for node in chain:
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: env[n])
        env[node] = node.target(*args, **kwargs)
    return env[chain[-1]] if chain else source


def chain_key(chain: list[fx.Node]) -> tuple:
    """A hashable description of a chain: equal keys compute the same tensor from the same source."""
    return tuple((str(n.target), repr(n.args[1:]), repr(sorted(n.kwargs.items()))) for n in chain)


def _row_range(attr: fx.Node, chain: list[fx.Node]) -> tuple[int, int] | None:
    """The [start, stop) rows of the source a chain slices along dim 0 before any reshaping, or
    None when it does not slice rows (or rows cannot be followed)."""
    rows = attr.meta["val"].shape[0]
    start, stop, sliced = 0, rows, False
    i = 0
    while i < len(chain):
        node = chain[i]
        if node.target in _ROW_NEUTRAL_OPS:
            i += 1
            continue
        if node.target is aten.slice.Tensor and _arg(node, 1, "dim", 0) == 0 and _arg(node, 4, "step", 1) == 1:
            lo, hi = _arg(node, 2, "start", None) or 0, _arg(node, 3, "end", None)
            lo = lo + (stop - start) if lo < 0 else lo
            hi = stop - start if hi is None else (hi + (stop - start) if hi < 0 else min(hi, stop - start))
            start, stop, sliced = start + lo, start + hi, True
        elif not sliced and _is_first_axis_pick(node, chain[i + 1] if i + 1 < len(chain) else None):
            return None  # a matrix picked out of a stacked parameter: named by `_picked_index`
        elif node.target in _SPLIT_OPS and i + 1 < len(chain) and chain[i + 1].target is operator.getitem:
            sizes = [t.shape[0] for t in node.meta["val"]]
            dim = _arg(node, 2, "dim", 0) if node.target is not aten.unbind.int else _arg(node, 1, "dim", 0)
            if node.target is aten.unbind.int or dim != 0:
                return None
            index = chain[i + 1].args[1]
            start, stop, sliced = start + sum(sizes[:index]), start + sum(sizes[: index + 1]), True
            i += 1
        else:
            break
        i += 1
    return (start, stop) if sliced and (start, stop) != (0, rows) else None


def _is_first_axis_pick(node: fx.Node, after: fx.Node | None) -> bool:
    if node.target is aten.select.int:
        return _arg(node, 1, "dim", 0) == 0
    return node.target is aten.unbind.int and _arg(node, 1, "dim", 0) == 0 and after is not None


def _picked_index(attr: fx.Node, chain: list[fx.Node]) -> int | None:
    """i when a chain starts (after casts/copies) by picking matrix i of a stacked parameter
    (`W[i]` on a (n, out, in) parameter: select or unbind along dim 0), else None."""
    for i, node in enumerate(chain):
        if node.target in _ROW_NEUTRAL_OPS:
            continue
        if node.target is aten.select.int and attr.meta["val"].dim() >= 3:
            # matrix i along any axis of a stacked parameter: a per-head weight W[:, i, :] of an einsum
            dim = _arg(node, 1, "dim", 0)
            return _arg(node, 2, "index", 0) % attr.meta["val"].shape[dim]
        if not _is_first_axis_pick(node, chain[i + 1] if i + 1 < len(chain) else None):
            return None
        index = _arg(node, 2, "index", 0) if node.target is aten.select.int else chain[i + 1].args[1]
        return index % attr.meta["val"].shape[0]
    return None


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def linear_site_name(node: fx.Node, weight: fx.Node, chain: list[fx.Node] = ()) -> str:
    """The fully qualified name a config rule matches for a linear-like `node` whose weight is
    read from the get_attr `weight` through `chain` (see `weight_chain`). Written once, here.

    - The enclosing module's path when it owns the weight (`path.weight`) or is a linear-like
      class (`nn.Linear` and subclasses, Hugging Face `Conv1D`): a tied lm_head is `lm_head`,
      GPT-2's `Conv1D` is `transformer.h.0.attn.c_attn`.
    - Otherwise the weight's path without `.weight` / `_weight`: an F.linear call on `self.w1`
      inside `mlp` is `mlp.w1`; MultiheadAttention's `in_proj_weight` is `attn.in_proj`.
    - A slice of rows of the weight gets a suffix: `.q`, `.k`, `.v` (or `.kv`, `.qk`) for thirds
      of a packed `in_proj_weight` (q, k, v stacked, as nn.MultiheadAttention stores them), and
      `.rows_<start>_<stop>` for any other row slice.
    - Matrix i of a stacked (n, out, in) parameter (`self.experts[i]`, select or unbind along
      dim 0) gets the suffix `.i`.
    """
    stack = module_stack(node)
    target = str(weight.target)
    name = target.removesuffix(".weight").removesuffix("_weight")
    if stack:
        path, type_name = stack[-1]
        if path and (target == f"{path}.weight" or _is_linear_class(type_name)):
            name = path
    picked = _picked_index(weight, list(chain))
    if picked is not None:
        name += f".{picked}"
    rows = _row_range(weight, list(chain)) if picked is None else None
    if rows is not None:
        total = weight.meta["val"].shape[0]
        start, stop = rows
        third = total // 3
        if target.endswith("in_proj_weight") and total % 3 == 0 and start % third == 0 and stop % third == 0:
            name += "." + "qkv"[start // third : stop // third]
        else:
            name += f".rows_{start}_{stop}"
    return name


@functools.cache
def _is_linear_class(type_name) -> bool:
    """Whether nn_module_stack's type (a class or its qualified name) is linear-like: an
    nn.Linear subclass, or a class called `Conv1D` (transformers.pytorch_utils.Conv1D)."""
    cls = pydoc.locate(type_name) if isinstance(type_name, str) else type_name
    if isinstance(cls, type):
        return issubclass(cls, torch.nn.Linear) or cls.__name__ == "Conv1D"
    return str(type_name).rsplit(".", 1)[-1] in ("Linear", "Conv1D")


def _fake(value: Any, mode) -> Any:
    if isinstance(value, fx.Node):
        return value.meta["val"]
    if isinstance(value, (list, tuple)):
        return type(value)(_fake(v, mode) for v in value)
    return value


def fake_mode_of(gm: fx.GraphModule):
    values = [n.meta["val"] for n in gm.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return _compat.detect_fake_mode(values)


def create_call(gm: fx.GraphModule, target: Callable, args: tuple, like: fx.Node, fake_mode) -> fx.Node:
    """Insert `target(*args)` (at the current insertion point) with meta["val"] computed on fake
    tensors, and nn_module_stack / stack_trace copied from `like`."""
    node = gm.graph.call_function(target, args)
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        node.meta["val"] = target(*_fake(args, fake_mode))
    for key in ("nn_module_stack", "stack_trace", "source_fn_stack"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    return node


def create_get_attr(gm: fx.GraphModule, name: str, fake_mode) -> fx.Node:
    """A get_attr node for gm's existing attribute `name`, with meta["val"]."""
    node = gm.graph.get_attr(name)
    tensor = getattr(gm, name)
    node.meta["val"] = fake_mode.from_tensor(tensor, static_shapes=True) if fake_mode is not None else tensor
    return node


def finish(gm: fx.GraphModule) -> None:
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
