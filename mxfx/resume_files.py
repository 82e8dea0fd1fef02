"""What resume files of long runs share: digests of tensors and values that fingerprint a run, and
atomic replacement of a file.

A resume file records what defines the run that wrote it; a later run compares those digests with
its own and refuses a file of another run (`mxfx.errors.ResumeError`). Files are written to a
temporary name and moved into place with `os.replace`, so an interrupt never leaves half a file.
Used by sensitivity and search (`mxfx.analysis.resume`) and by GPTQ (`mxfx.recovery.gptq_resume`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The bytes of a tensor's elements, in row-major order (a CPU copy)."""
    t = t.detach().cpu().contiguous()
    # the bytes at data_ptr (a contiguous CPU tensor, its storage offset included); not .numpy(): numpy is no dependency
    return bytes((ctypes.c_char * t.nbytes).from_address(t.data_ptr())) if t.numel() else b""


def digest(*parts: Any) -> str:
    """A short hex digest (64 bits of SHA-256) of `parts`: bytes as they are, a tensor as its shape,
    dtype and element bytes, anything else as its repr."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(repr((tuple(t.shape), str(t.dtype))).encode())
            if t.numel():  # hashed in place: no copy of a large weight
                h.update((ctypes.c_char * t.nbytes).from_address(t.data_ptr()))
        else:
            h.update(part if isinstance(part, bytes) else repr(part).encode())
    return h.hexdigest()[:16]


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through `write(temporary path)`, then move the result into place (atomic)."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
