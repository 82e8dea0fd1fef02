"""Model inputs and outputs for the analysis layer: batches as tuples, the primary output tensor
that metrics compare, and an Interpreter's flat output restored to the model's structure.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from mxfx import _compat
from mxfx.errors import MXTypeError, MXValueError

pytree = _compat.pytree_module()  # torch.utils._pytree (private in torch 2.13/2.14)


# --- inputs and outputs ------------------------------------------------------------------------


def primary_output(output: Any) -> torch.Tensor:
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


def structured_output(gm: fx.GraphModule, flat: Any) -> Any:
    """An Interpreter's flat output in the model's output structure."""
    spec = getattr(gm, "_out_spec", None)
    if spec is None or spec.is_leaf() or pytree.tree_structure(flat) == spec:
        return flat  # already structured (e.g. a Hugging Face ModelOutput)
    return pytree.tree_unflatten(list(flat), spec)


