""".pt2 files: a prepared module saved as a standard `torch.export` archive, with mxfx's report.

The mxfx ops are stored by name (`torch.ops.mxfx.*`), so loading needs `import mxfx` (which
registers them); the site report travels as an extra file of the archive.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import fx

from mxfx.errors import ArchiveError, MXTypeError
from mxfx.graph.prepare import PrepareReport

_REPORT_FILE = "mxfx_report.json"


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
    extra = {_REPORT_FILE: json.dumps(report.to_dict() if report else {})}
    torch.export.save(program, str(path), extra_files=extra)
    return Path(path)


def load(path: str | Path) -> fx.GraphModule:
    """Load a `.pt2` file written by `mxfx.save` (import mxfx first: it registers the ops).

    Raises:
        ArchiveError: the file is missing, not a torch.export archive, or truncated.
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
    if damaged is not None:
        raise ArchiveError(f"{path} is damaged: member {damaged} fails its CRC check; write it again with mxfx.save")
    extra: dict[str, Any] = {_REPORT_FILE: ""}
    try:
        program = torch.export.load(str(path), extra_files=extra)
    except Exception as error:  # torch raises many types for a damaged archive
        raise ArchiveError(f"{path} could not be loaded as a torch.export archive: {type(error).__name__}: "
                           f"{str(error).splitlines()[0][:300] if str(error) else ''}") from error
    module = program.module()
    if extra[_REPORT_FILE]:
        data = json.loads(extra[_REPORT_FILE])
        if data:
            module.mxfx_report = PrepareReport.from_dict(data)
    return module
