"""Shape classes: one prepared module serves the input sizes its model's code treats apart.

torch.export traces one path through the model's Python code. Where that code branches on an
input size being 1 (Hugging Face masks treat batch 1 apart, its SDPA wrapper sequence length 1),
the program records a guard (`input_ids.size()[0] != 1`) and other sizes of that dimension work,
but size 1 does not. `mxfx.prepare` therefore installs a dispatcher on the module it returns:

- inputs whose pattern of size-1 dimensions (their *shape class*) the prepared graph accepts run it;
- the first call of a new shape class whose only failed guard is a size-1 test re-exports the
  model with those inputs (the same dynamic-shape rules, `mxfx.export`), runs the site-matching
  and attention passes on the new graph and copies the already rewritten linears into it
  (`passes/transplant_linears.py`: the prepared module's codes, scales, rotated and GPTQ weights,
  the same tensor objects; nothing is quantized twice), logs a warning saying so, and caches the
  module for later calls of that class;
- any other failed guard (a linear's in_features, a static dimension) raises `InputGuardError`.

    prepared = mxfx.prepare(model, "mxfp8", (ids_2x16,))
    prepared(ids_1x7)                          # first batch-1 call: re-export, cached
    mxfx.graph.shape_classes.module_for(prepared, (ids_1x1,))   # that class's module, built if need be

The dispatcher keeps a weak reference to the model (not its full-precision weights); a module
whose model is gone, or one prepared from an ExportedProgram or loaded from a .pt2 file, raises
`InputGuardError` for a new shape class instead. A re-export runs under `mxfx.export`'s lock.
"""

from __future__ import annotations

import inspect
import logging
import re
import types
import weakref
from collections.abc import Callable

import torch
from torch import fx

from mxfx import _compat
from mxfx.errors import InputGuardError
from mxfx.graph.config import QuantConfig
from mxfx.graph.export import export, tracing_lock, used_dynamic_shapes

log = logging.getLogger(__name__)
ATTRIBUTE = "_mxfx_shape_classes"  # the prepared module's attribute holding its ShapeClasses
# A guard that only tests a dimension against 1, as torch.export prints it ("input_ids.size()[0] != 1").
_SIZE_ONE_GUARD = re.compile(r"^\S+\.size\(\)\[\d+\] (?:!= 1|== 1|> 1|>= 2|<= 1|< 2)$")
_UNKNOWN = object()
_PROGRAMS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {class key: ExportedProgram}


class ShapeClasses:
    """The shape classes of one prepared module: key -> module (None: the prepared graph itself)."""

    def __init__(self, model: torch.nn.Module, config: QuantConfig, strict: bool, static: bool,
                 setup: Callable[[fx.GraphModule, fx.GraphModule, QuantConfig], None]) -> None:
        self.model = weakref.ref(model)  # weak: the prepared module must not keep the fp weights alive
        self.config = config
        self.setup = setup  # setup(module, prepared, config): prepare's passes on a re-export (graph.prepare)
        self.strict = strict
        self.static = static  # the prepared graph was exported with static shapes: so are its classes
        self.modules: dict[tuple, fx.GraphModule | None] = {}


def key_of(args: tuple, kwargs: dict) -> tuple:
    """The shape class of a call: which dimensions of each input tensor have size 1."""
    leaves = _compat.tree_leaves((args, kwargs))
    # A branch, not `size == 1` itself: under torch.compile with symbolic sizes Dynamo turns the branch
    # into a guard and the key into plain Python bools, which hash and compare.
    return tuple(tuple(True if size == 1 else False for size in leaf.shape)  # noqa: SIM210
                 for leaf in leaves if isinstance(leaf, torch.Tensor))


def install(gm: fx.GraphModule, model: torch.nn.Module, config: QuantConfig, strict: bool, static: bool,
            example_inputs: tuple, example_kwargs: dict | None,
            setup: Callable[[fx.GraphModule, fx.GraphModule, QuantConfig], None]) -> None:
    """Give the prepared module `gm` (exported from `model`) its shape-class dispatcher; `setup`
    prepares a re-export of another shape class from `gm`'s weights (`mxfx.graph.prepare.setup_class_module`:
    passed in, so that this module, which prepare imports, imports nothing above it)."""
    classes = ShapeClasses(model, config, strict, static, setup)
    classes.modules[key_of(example_inputs, example_kwargs or {})] = None
    setattr(gm, ATTRIBUTE, classes)


    def forward(self, *args, **kwargs):
        return _dispatch(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(type(gm).forward)  # torch.export reads the argument names
    gm.forward = types.MethodType(forward, gm)


def _dispatch(self: fx.GraphModule, *args, **kwargs):
    home = type(self).forward  # the graph's generated code
    classes = self.__dict__.get(ATTRIBUTE)
    if classes is None or torch.compiler.is_exporting():  # mxfx.save re-exports the graph itself
        return home(self, *args, **kwargs)
    module = classes.modules.get(key_of(args, kwargs), _UNKNOWN)
    if module is None:
        return home(self, *args, **kwargs)
    if module is not _UNKNOWN:
        return module(*args, **kwargs)
    return _first_call(self, args, kwargs)


@_compat.compiler_disable  # a re-export is never traced by Dynamo; the next call finds the module cached
def _first_call(gm: fx.GraphModule, args: tuple, kwargs: dict):
    try:
        output = type(gm).forward(gm, *args, **kwargs)  # its guards run first: nothing runs when they fail
    except InputGuardError as error:
        module = _class_module(gm, error, args, kwargs)
        return module(*args, **kwargs)
    gm.__dict__[ATTRIBUTE].modules[key_of(args, kwargs)] = None
    return output


def module_for(gm: fx.GraphModule, args: tuple, kwargs: dict | None = None) -> fx.GraphModule:
    """The module that runs `gm`'s model on inputs shaped like `args`/`kwargs`: `gm` itself when its
    graph accepts them, else the module of their shape class, exported on first use (see module doc).

    Args:
        gm: a module returned by `mxfx.prepare`.
        args: positional inputs (only their shapes matter; they are run once through `gm` when
            their class is new).
        kwargs: keyword inputs.

    Returns:
        `gm` or the cached module of the inputs' shape class (same quantized weights).

    Raises:
        InputGuardError: the inputs fail a guard other than a size-1 test, or the model `gm` was
            prepared from is gone (or was never known: a .pt2 file, an ExportedProgram).
    """
    kwargs = kwargs or {}
    classes: ShapeClasses | None = gm.__dict__.get(ATTRIBUTE)
    key = key_of(args, kwargs)
    if classes is not None and classes.modules.get(key, _UNKNOWN) is not _UNKNOWN:
        return classes.modules[key] or gm
    try:
        with torch.no_grad():
            type(gm).forward(gm, *args, **kwargs)
    except InputGuardError as error:
        return _class_module(gm, error, args, kwargs)
    if classes is not None:
        classes.modules[key] = None
    return gm


def _class_module(gm: fx.GraphModule, error: InputGuardError, args: tuple, kwargs: dict) -> fx.GraphModule:
    """The module of the inputs' shape class after `gm`'s guards refused them (exported and cached),
    or `error` again when a size-1 re-export cannot help."""
    guard = getattr(error, "guard", "")
    classes: ShapeClasses | None = gm.__dict__.get(ATTRIBUTE)
    if not _SIZE_ONE_GUARD.match(guard):
        raise error
    if classes is None:
        raise InputGuardError(f"{error} (this module has no shape classes: it was not prepared from an "
                              "nn.Module in this process)") from None
    model = classes.model()
    if model is None:
        raise InputGuardError(f"{error} (its model branches on this size being 1, and the model it was prepared "
                              "from no longer exists: mxfx holds it weakly; keep a reference to the model to "
                              "let mxfx re-export it for this shape class)") from None
    module = _export_class(gm, classes, model, args, kwargs, guard)
    classes.modules[key_of(args, kwargs)] = module
    return module


def _export_class(gm: fx.GraphModule, classes: ShapeClasses, model: torch.nn.Module, args: tuple, kwargs: dict,
                  guard: str) -> fx.GraphModule:
    shapes = [tuple(t.shape) for t in _compat.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    shapes = ", ".join(map(str, shapes[:4])) + (f", ... ({len(shapes)} inputs)" if len(shapes) > 4 else "")
    cached = (key_of(args, kwargs), classes.strict, classes.static) in _PROGRAMS.get(model, {})
    log.warning("mxfx: %s branches on an input size being 1 (guard %s); %s for inputs shaped [%s], reusing the "
                "prepared module's quantized weights", type(model).__name__, guard,
                "preparing its earlier export" if cached else "exporting it again", shapes)
    with tracing_lock():
        program = exported(model, args, kwargs, strict=classes.strict, static=classes.static)
        module = program.module()
        classes.setup(module, gm, classes.config)
    module.mxfx_report = getattr(gm, "mxfx_report", None)
    module.mxfx_export_args = (args, kwargs, used_dynamic_shapes(program), classes.strict)
    return module


def exported(model: torch.nn.Module, args: tuple, kwargs: dict | None = None, *, strict: bool = False,
             static: bool = False) -> torch.export.ExportedProgram:
    """`mxfx.export(model, args, ...)` ("auto" dynamic shapes, or static), remembered per model and
    shape class: preparing one model with several configs exports each class once (a program is
    never modified by prepare; its `module()` is a fresh graph each time)."""
    cache = _PROGRAMS.setdefault(model, {})
    key = (key_of(args, kwargs or {}), strict, static)
    if key not in cache:
        cache[key] = export(model, args, example_kwargs=kwargs or None, strict=strict,
                            dynamic_shapes=None if static else "auto")
    return cache[key]


def class_pipeline(pipeline: list, transplants: list) -> list:
    """prepare's passes (`pipeline`) with the ones that compute linear or expert weights (rotation,
    GPTQ, Q/DQ insertion, lowering) replaced by `transplants`, which copy their result."""
    # by name: a pass that computes linear or expert weights (the transplants copy their result)
    weight_passes = {"RotateLinearPass", "GPTQWeightsPass", "InsertQDQPass", "LowerLinearPass", "RotateExpertsPass",
                     "GPTQExpertsPass", "InsertExpertQDQPass"}
    passes: list = []
    for pass_ in pipeline:
        if type(pass_).__name__ in weight_passes:
            passes.extend(t for t in transplants if t not in passes)
        else:
            passes.append(pass_)
    return passes
