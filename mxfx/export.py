"""The public export step: `mxfx.export(model, example_inputs)` -> a torch.export ExportedProgram.

`mxfx.prepare` and the sensitivity tools start from it; export once and hand the program to
`prepare` (or `find_sites`) as many times as you like: no re-tracing, no deep copies.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch

from mxfx.errors import ExportError, MXTypeError

# torch.export keeps tracing state in process globals (mode stacks, the module hierarchy), so two
# threads exporting at once corrupt each other; the export step is serialized, the passes are not.
_EXPORT_LOCK = threading.Lock()


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


def export(model: torch.nn.Module, example_inputs: tuple = (), *, example_kwargs: dict | None = None,
           strict: bool = False, dynamic_shapes: Any = None) -> torch.export.ExportedProgram:
    """torch.export `model` in eval mode (its mode is restored); thread-safe.

    Args:
        model: the model (not modified).
        example_inputs: positional example inputs (a single tensor is wrapped in a tuple).
        example_kwargs: keyword example inputs.
        strict: torch.export's strict mode (default non-strict, which traces more models).
        dynamic_shapes: torch.export's dynamic_shapes.

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
        try:
            return torch.export.export(model, example_inputs, kwargs=example_kwargs, dynamic_shapes=dynamic_shapes,
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
