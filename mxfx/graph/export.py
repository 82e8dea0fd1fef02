"""The public export step: `mxfx.export(model, example_inputs)` -> a torch.export ExportedProgram.

`mxfx.prepare` and the sensitivity tools start from it; export once and hand the program to
`prepare` (or `find_sites`) as many times as you like: no re-tracing, no deep copies.

Shapes: by default every input tensor dimension of example size >= 2 is exported as `Dim.AUTO`,
size-oblivious so that size 1 is accepted too (`auto_dynamic_shapes`; if the model cannot be
exported size-obliviously, sizes >= 2), so one prepare serves other batch sizes and sequence
lengths; dimensions the model's code fixes (a linear's in_features, a head_dim) become static on
their own. A model that cannot be exported that way is exported with static shapes instead, with
an `MXFXWarning` that says why (a call with other shapes then raises `InputGuardError`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
import weakref
from typing import Any

import torch

from mxfx import _compat
from mxfx.errors import ExportError, MXFXWarning, MXTypeError

log = logging.getLogger(__name__)
AUTO = "auto"  # the default `dynamic_shapes`: every input tensor dimension Dim.AUTO
# The dynamic_shapes each program was exported with (for re-exports, e.g. mxfx.save).
_USED_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

# torch.export keeps tracing state in process globals (mode stacks, the module hierarchy, the
# symbolic-shape dispatch), so two threads exporting at once corrupt each other, and so does a
# thread computing symbolic fake shapes (a pass creating nodes) while another exports: both
# steps hold this lock (`tracing_lock()`). Re-entrant: prepare holds it around export + passes.
_EXPORT_LOCK = threading.RLock()


def tracing_lock() -> threading.RLock:
    """The process-wide lock around torch.export and the FX passes that compute fake shapes."""
    return _EXPORT_LOCK


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Export in eval mode and restore the model's mode afterwards (modules from torch.export,
    e.g. a prepared module, have no train/eval switch and are left as they are)."""
    was_training = model.training
    try:
        model.eval()
    except NotImplementedError:
        yield
        return
    try:
        yield
    finally:
        model.train(was_training)


def auto_dynamic_shapes(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None):
    """A torch.export `dynamic_shapes` spec marking every dimension of size >= 2 of every input
    tensor `Dim.AUTO` (torch.export then keeps dynamic what the model lets vary, and specializes
    the rest without an error), keyed the way torch.export wants for `model`'s signature.

    Size-1 example dimensions stay static: they are usually broadcast dimensions (a (B, 1, L, S)
    mask), which a size-oblivious export cannot broadcast; torch.export would specialize them anyway.
    """
    collection = torch.export.ShapesCollection()
    for leaf in _compat.tree_leaves((example_inputs, example_kwargs or {})):
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            collection[leaf] = {i: torch.export.Dim.AUTO if size >= 2 else torch.export.Dim.STATIC for i, size in enumerate(leaf.shape)}
    return collection.dynamic_shapes(model, example_inputs, example_kwargs or {})


def used_dynamic_shapes(program: torch.export.ExportedProgram, default: Any = None) -> Any:
    """The `dynamic_shapes` spec `mxfx.export` exported `program` with (None: static shapes)."""
    return _USED_SHAPES.get(program, default)


def _dynamic_dims(program: torch.export.ExportedProgram) -> list[str]:
    """"input[dim]" for every user-input dimension the program left symbolic."""
    found = []
    for spec, node in zip(program.graph_signature.input_specs,
                          (n for n in program.graph.nodes if n.op == "placeholder")):
        value = node.meta.get("val")
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT and isinstance(value, torch.Tensor):
            found += [f"{node.name}[{i}]" for i, size in enumerate(value.shape) if not str(size).isdigit()]
    return found


def export(model: torch.nn.Module, example_inputs: tuple = (), *, example_kwargs: dict | None = None,
           strict: bool = False, dynamic_shapes: Any = AUTO) -> torch.export.ExportedProgram:
    """torch.export `model` in eval mode (its mode is restored); thread-safe.

    Args:
        model: the model (not modified).
        example_inputs: positional example inputs (a single tensor is wrapped in a tuple).
        example_kwargs: keyword example inputs.
        strict: torch.export's strict mode (default non-strict, which traces more models).
        dynamic_shapes: "auto" (default): every input dimension may vary where the model allows it
            (size 1 included), falling back to static shapes with an MXFXWarning when the model
            cannot be exported so; None: static shapes (the example inputs' exactly); anything
            else is handed to torch.export as its `dynamic_shapes`.

    Raises:
        MXTypeError: `model` is not an nn.Module.
        ExportError: torch.export failed; the message says why and what to try.
    """
    if not isinstance(model, torch.nn.Module):
        raise MXTypeError(f"mxfx takes an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    name = type(model).__name__
    with _EXPORT_LOCK, eval_mode(model):
        if isinstance(dynamic_shapes, str) and dynamic_shapes == AUTO:
            try:
                spec = auto_dynamic_shapes(model, example_inputs, example_kwargs)
                try:
                    # Size-oblivious: a dimension exported at size >= 2 still accepts size 1 (one window,
                    # one decoded token), rather than being guarded to >= 2 (torch's 0/1 specialization).
                    with _compat.size_oblivious_export():
                        program = torch.export.export(model, example_inputs, kwargs=example_kwargs,
                                                      dynamic_shapes=spec, strict=strict)
                except Exception as error:  # e.g. a broadcast the size-oblivious rules cannot decide
                    log.info("size-oblivious export of %s failed (%s); exporting with dynamic sizes >= 2", name,
                             type(error).__name__)
                    program = torch.export.export(model, example_inputs, kwargs=example_kwargs,
                                                  dynamic_shapes=spec, strict=strict)
            except Exception as error:  # any failure: the static export below either works or explains
                auto_error = error
            else:
                _USED_SHAPES[program] = spec
                log.info("exported %s; dynamic input dimensions: %s", name, ", ".join(_dynamic_dims(program)) or "none")
                return program
            dynamic_shapes = None
        else:
            auto_error = None
        try:
            program = torch.export.export(model, example_inputs, kwargs=example_kwargs, dynamic_shapes=dynamic_shapes,
                                          strict=strict)
        except Exception as error:  # torch.export raises many types; all mean "could not trace"
            first_line = (str(error).strip().splitlines() or [type(error).__name__])[0][:500]
            hints = ["strict=False" if strict else "strict=True"]
            hints.append("use_cache=False (Hugging Face models: model.config.use_cache = False)")
            hints.append("data-dependent Python control flow may need torch.cond or a fixed branch")
            raise ExportError(
                f"torch.export could not trace {name}: {type(error).__name__}: {first_line}\n"
                f"Try: {'; '.join(hints)}."
            ) from error
        if auto_error is not None:  # warned only now: when static export fails too, its error says it all
            first_line = (str(auto_error).strip().splitlines() or [type(auto_error).__name__])[0][:300]
            warnings.warn(
                f"mxfx: {name} could not be exported with dynamic shapes ({type(auto_error).__name__}: "
                f"{first_line}); exported with the example inputs' static shapes instead, so calls "
                "with other shapes raise InputGuardError (pass dynamic_shapes to choose the dynamic "
                "dimensions yourself)", MXFXWarning, stacklevel=3)
        _USED_SHAPES[program] = dynamic_shapes
        return program
