""".pt2 files: a prepared module saved as a standard `torch.export` archive, with mxfx's report.

The mxfx ops are stored by name (`torch.ops.mxfx.*`), so loading needs `import mxfx` (which
registers them); the site report travels as an extra file of the archive. So do the modules that
define the classes of the model's inputs and outputs (e.g. `transformers.modeling_outputs` for a
Hugging Face model's `BaseModelOutputWithPooling`): torch.export stores such a class by name and
can rebuild it only once the module that registers it with torch's pytree is imported, which
`load` does first. A fresh process needs nothing but `import mxfx` (and the model's library
installed).
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import fx

from mxfx import _compat
from mxfx.errors import ArchiveError, MXTypeError
from mxfx.graph.prepare import PrepareReport

log = logging.getLogger(__name__)

_REPORT_FILE = "mxfx_report.json"
_MODULES_FILE = "mxfx_pytree_modules.json"  # the modules `load` imports before torch.export.load
# torch's message for a class it cannot rebuild: "Deserializing a.b.C in pytree is not registered"
_UNREGISTERED = re.compile(r"Deserializing (\S+) in pytree is not registered")


def pytree_modules(program: torch.export.ExportedProgram) -> list[str]:
    """The modules whose classes occur in the program's input and output structure (besides the
    builtins, `collections` and torch), sorted: what a fresh process imports to load it.

    Example:
        >>> program = torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),))
        >>> pytree_modules(program)
        []
    """
    spec = program.call_spec
    types = _compat.pytree_node_types(spec.in_spec) | _compat.pytree_node_types(spec.out_spec)
    modules = {t.__module__ for t in types if isinstance(getattr(t, "__module__", None), str)}
    return sorted(m for m in modules if m.split(".")[0] not in ("builtins", "collections", "torch", "typing"))


def save(prepared: fx.GraphModule, path: str | Path, example_inputs: tuple | None = None,
         example_kwargs: dict | None = None) -> Path:
    """Save a prepared module as a standard torch.export `.pt2` file (the mxfx ops by name).

    The module is re-exported with the example inputs prepare saw (or those given here).
    """
    saved = getattr(prepared, "mxfx_export_args", None)
    if example_inputs is None and saved is None:
        raise MXTypeError("save needs example_inputs for a module that did not come from mxfx.graph.prepare")
    args, kwargs, dynamic_shapes, strict = saved if saved is not None else ((), {}, None, False)
    if example_inputs is not None:
        args, kwargs, dynamic_shapes = example_inputs, example_kwargs or {}, None
    program = torch.export.export(prepared, tuple(args), kwargs=kwargs, dynamic_shapes=dynamic_shapes, strict=strict)
    report = getattr(prepared, "mxfx_report", None)
    extra = {_REPORT_FILE: json.dumps(report.to_dict() if report else {}),
             _MODULES_FILE: json.dumps(pytree_modules(program))}
    torch.export.save(program, str(path), extra_files=extra)
    return Path(path)


def _import_modules(path: Path, modules: list[str]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ArchiveError(f"{path} holds a model whose inputs or outputs are classes of {name}, which cannot be "
                               f"imported here ({error}); install the package that provides it") from error


def _recorded_modules(archive: zipfile.ZipFile) -> list[str]:
    """The modules `save` recorded (none in a file written before mxfx recorded them)."""
    for name in archive.namelist():
        if name.rsplit("/", 1)[-1] == _MODULES_FILE:
            try:
                modules = json.loads(archive.read(name) or b"[]")
            except ValueError:  # unreadable: load falls back to the modules torch names
                return []
            return [m for m in modules if isinstance(m, str)] if isinstance(modules, list) else []
    return []


def _module_of(type_name: str) -> str | None:
    """The longest importable module prefix of a dotted class name (a.b.C -> a.b), or None."""
    parts = type_name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        try:
            importlib.import_module(".".join(parts[:end]))
            return ".".join(parts[:end])
        except ImportError:
            continue
    return None


class _ExceptionsLogged(logging.Handler):
    """Collects the text of the exceptions logged while it is attached (it prints nothing)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.messages.append(str(record.exc_info[1]))


def load(path: str | Path) -> fx.GraphModule:
    """Load a `.pt2` file written by `mxfx.save`, in any process that has imported mxfx (which
    registers the ops): the modules that register the classes of the model's inputs and outputs
    with torch's pytree (recorded by `save`) are imported first. A file without that record (an
    older mxfx, plain torch.export) has the modules named in torch's refusal imported and is read
    again.

    Args:
        path: a file `mxfx.save` (or `torch.export.save`) wrote.

    Returns:
        The prepared module (`ExportedProgram.module()`), with its `mxfx_report` where saved.

    Raises:
        ArchiveError: the file is missing, not a torch.export archive, truncated, or needs a
            module that cannot be imported here.

    Example:
        >>> import mxfx
        >>> module = mxfx.load("model.pt2")  # doctest: +SKIP
    """
    path = Path(path)
    if not path.is_file():
        raise ArchiveError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise ArchiveError(f"{path} is not a torch.export .pt2 archive (not a zip file; truncated or another format?)")
    with zipfile.ZipFile(path) as archive:
        try:
            damaged = archive.testzip()  # CRC of every member: torch's reader does not check them
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            damaged = f"({error})"
        modules = [] if damaged is not None else _recorded_modules(archive)
    if damaged is not None:
        raise ArchiveError(f"{path} is damaged: member {damaged} fails its CRC check; write it again with mxfx.save")
    _import_modules(path, modules)
    extra: dict[str, Any] = {_REPORT_FILE: ""}
    tried: set[str] = set()
    while True:
        logged = _ExceptionsLogged()  # torch.export.load logs the deserializer's error, raises another
        logging.getLogger("torch.export").addHandler(logged)
        try:
            program = torch.export.load(str(path), extra_files=extra)
            break
        except Exception as error:  # torch raises many types for a damaged archive
            chain, cause = [], error
            while cause is not None and len(chain) < 8:
                chain.append(str(cause))
                cause = cause.__cause__ or cause.__context__
            unregistered = _UNREGISTERED.search("\n".join(chain + logged.messages))
            module = _module_of(unregistered.group(1)) if unregistered else None
            if module is not None and module not in tried:  # a file without the record: import, read again
                log.info("mxfx.load: importing %s for %s", module, unregistered.group(1))
                tried.add(module)
                continue
            raise ArchiveError(f"{path} could not be loaded as a torch.export archive: {type(error).__name__}: "
                               f"{str(error).splitlines()[0][:300] if str(error) else ''}") from error
        finally:
            logging.getLogger("torch.export").removeHandler(logged)
    module = program.module()
    if extra[_REPORT_FILE]:
        data = json.loads(extra[_REPORT_FILE])
        if data:
            module.mxfx_report = PrepareReport.from_dict(data)
    return module
