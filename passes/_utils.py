"""Small helpers shared by the mxfx passes: site names, new nodes with correct meta, counters."""

from __future__ import annotations

import contextlib
import functools
import pydoc
from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from mxfx import _compat

MXFX_META = "mxfx"  # gm.meta[MXFX_META]: {"rewrites": {pass: n}, "sites": [...], ...}


def mxfx_meta(gm: fx.GraphModule) -> dict:
    return gm.meta.setdefault(MXFX_META, {"rewrites": {}, "sites": []})


def count_rewrites(gm: fx.GraphModule, pass_name: str, n: int) -> None:
    """Add `n` to the pass's rewrite counter (read by tests and the summary)."""
    rewrites = mxfx_meta(gm)["rewrites"]
    rewrites[pass_name] = rewrites.get(pass_name, 0) + n


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(path, type name) of the modules enclosing `node`, outermost first."""
    return list((node.meta.get("nn_module_stack") or {}).values())


def linear_site_name(node: fx.Node, weight: fx.Node) -> str:
    """The fully qualified name a config rule matches for a linear `node` with weight `weight`.

    The enclosing nn.Linear's path when there is one (so a tied lm_head is still `lm_head`);
    otherwise the weight parameter's path without a trailing `.weight` (an F.linear call on
    `self.w1` inside `mlp` is the site `mlp.w1`).
    """
    stack = module_stack(node)
    target = str(weight.target)
    if stack:
        path, type_name = stack[-1]
        if path and (target == f"{path}.weight" or _is_linear_class(type_name)):
            return path
    return target.removesuffix(".weight")


@functools.cache
def _is_linear_class(type_name) -> bool:
    """Whether nn_module_stack's type (a class or its qualified name) is an nn.Linear subclass."""
    cls = pydoc.locate(type_name) if isinstance(type_name, str) else type_name
    if isinstance(cls, type):
        return issubclass(cls, torch.nn.Linear)
    return str(type_name).rsplit(".", 1)[-1] == "Linear"


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
