"""Native CPU kernels for quantize, fake-quantize and dequantize (`native_kernels.c`).

The reference math (`mxfx.numerics.reference`) is plain ATen ops: eager it runs some twenty
full-size passes over a tensor, and compiled by Inductor its bit manipulation goes through scalar
loops (a bf16 4096x4096 MXFP8 quantize: ~5x a plain fp8 cast). These kernels compute the same
bits in one pass per block with loops a C compiler vectorizes. They are plain C (no torch headers),
built on first use with the C compiler Inductor uses too (`$CC`, else `cc`) in about a second, cached
per source, flags and CPU in `$MXFX_CACHE_DIR` (default `~/.cache/mxfx`), loaded with ctypes
(which releases the GIL during a call), and run on `torch.get_num_threads()` OpenMP threads.

Who calls them: the eager kernels of `mxfx::quantize`, `mxfx::fake_quantize` and
`mxfx::dequantize` and the shared kernels that `torch.compile` calls on CPU
(`mxfx.numerics.kernels`). Fused kernels (`mxfx.fused_kernels()`), freezing, other devices and
what the C does not cover (the `mse` scale mode, stochastic rounding) use the reference math.
The tests compare the two over every code point of every format.

`MXFX_NATIVE_KERNELS=0` turns them off. A failed build (no compiler, a compiler error) warns once
with an `MXFXWarning` and every call takes the reference math (the same bits, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

from mxfx.errors import MXFXWarning
from mxfx.numerics import reference
from mxfx.numerics.formats import ElementFormat, get_format
from mxfx.numerics.reference import decode_elements, packed_length

ENV = "MXFX_NATIVE_KERNELS"
_SOURCE = Path(__file__).with_name("native_kernels.c")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-ffp-contract=off", "-fno-math-errno"]
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_SCALE_MODES = {"floor": 0, "ceil": 1, "even": 2, "rceil": 3}
_ROUNDINGS = {"even": 0, "away": 1, "toward_zero": 2}
_MAX_BLOCK = 4096

_LOCK = threading.Lock()
_LIBRARY: ctypes.CDLL | None = None
_STATE = "unbuilt"  # unbuilt, built, failed
_TABLES: dict[str, Tensor] = {}


class _Format(ctypes.Structure):
    _fields_ = [("bits", ctypes.c_int32), ("mbits", ctypes.c_int32), ("bias", ctypes.c_int32),
                ("emin", ctypes.c_int32), ("emax", ctypes.c_int32), ("is_int", ctypes.c_int32),
                ("max_code", ctypes.c_int32), ("max_normal", ctypes.c_float)]


def _enabled_by_env() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "off", "no")


def _cache_dirs() -> list[Path]:
    """Where a build may go: `$MXFX_CACHE_DIR`, else `~/.cache/mxfx`; then a per-user temporary
    directory, for a home that cannot be written (a read-only or missing home in CI or a container)."""
    first = os.environ.get("MXFX_CACHE_DIR")
    home = Path(first) if first else Path.home() / ".cache" / "mxfx"
    return [home, Path(tempfile.gettempdir()) / f"mxfx-{os.getuid() if hasattr(os, 'getuid') else 'user'}"]


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc") or shutil.which("clang")


def _cpu_key() -> str:
    """What `-march=native` depends on: the CPU's model and feature flags where Linux says."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor() or platform.machine()


def _build(compiler: str) -> Path:
    digest = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), " ".join(_FLAGS).encode(), compiler.encode(), _cpu_key().encode()):
        digest.update(part)
    name = f"mxfx_native_{digest.hexdigest()[:20]}.so"
    for directory in _cache_dirs():
        target = directory / name
        if target.exists():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            handle, temporary = tempfile.mkstemp(suffix=".so", dir=directory)
            break
        except OSError as error:  # not writable: the next place
            unwritable = error
    else:
        raise unwritable
    os.close(handle)
    try:
        result = subprocess.run([compiler, *_FLAGS, "-o", temporary, str(_SOURCE)], capture_output=True, text=True,
                                timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} exited with {result.returncode}: {result.stderr.strip()[-800:]}")
        os.replace(temporary, target)  # atomic: a concurrent build writes the same bytes
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


def _library() -> ctypes.CDLL | None:
    """The loaded kernels, built on first use; None where they are off or the build failed."""
    global _LIBRARY, _STATE
    if not _enabled_by_env():  # read on every call, so that a test or a session can switch
        return None
    if _STATE != "unbuilt":
        return _LIBRARY
    with _LOCK:
        if _STATE == "unbuilt":
            try:
                compiler = _compiler()
                if compiler is None:
                    raise RuntimeError("no C compiler found (set CC)")
                library = ctypes.CDLL(str(_build(compiler)))
                for name in ("mxfx_quantize", "mxfx_fake_quantize", "mxfx_dequantize"):
                    getattr(library, name).restype = ctypes.c_int
                _LIBRARY, _STATE = library, "built"
            except Exception as error:  # never an error: the reference math gives the same bits
                _STATE = "failed"
                warnings.warn(f"mxfx: building the native CPU kernels failed ({type(error).__name__}: {error}); "
                              f"quantizers run the reference math instead (the same results, slower). Set {ENV}=0 "
                              "to use the reference math from the start.", MXFXWarning, stacklevel=3)
    return _LIBRARY


def status() -> str:
    """'off' (MXFX_NATIVE_KERNELS=0), else 'built', 'failed' or 'unbuilt' (no call needed them yet)."""
    return "off" if not _enabled_by_env() else _STATE


def _format(fmt: ElementFormat) -> _Format:
    return _Format(fmt.bits, fmt.mbits, fmt.bias, fmt.emin, fmt.emax, int(fmt.is_int),
                   reference.max_code_magnitude(fmt), fmt.max_normal)


def covers(x: Tensor, block_size: int, scale_mode: str, rounding: str) -> bool:
    """Whether the kernels compute this quantizer on `x` (a real CPU tensor, not fake or traced)."""
    return (type(x) is Tensor and x.device.type == "cpu" and x.dtype in _DTYPES and scale_mode in _SCALE_MODES
            and rounding in _ROUNDINGS and 0 < block_size <= _MAX_BLOCK and not torch.compiler.is_compiling()
            and _library() is not None)


def _rows(x: Tensor) -> tuple[Tensor, int, int]:
    x = x.contiguous()
    n = x.shape[-1] if x.dim() else 1
    return x, (x.numel() // n if n else 0), n


def _threads() -> int:
    return max(1, torch.get_num_threads())


def _check(status: int, what: str) -> None:
    if status != 0:
        raise MemoryError(f"mxfx native {what}: could not allocate its per-thread buffers")


def native_quantize(x: Tensor, elem_format: str, block_size: int, scale_mode: str, rounding: str,
                    flush_subnormals: bool) -> tuple[Tensor, Tensor]:
    """`reference.quantize_last_axis` (packed codes, E8M0 scales) in C, where `covers` holds."""
    fmt = get_format(elem_format)
    x, rows, n = _rows(x)
    n_blocks = (n + block_size - 1) // block_size
    codes = torch.empty((*x.shape[:-1], packed_length(n_blocks * block_size, fmt)), dtype=torch.uint8)
    scales = torch.empty((*x.shape[:-1], n_blocks), dtype=torch.uint8)
    if rows and n:
        _check(_library().mxfx_quantize(
            ctypes.c_void_p(x.data_ptr()), _DTYPES[x.dtype], ctypes.c_int64(rows), ctypes.c_int64(n),
            ctypes.c_int64(block_size), ctypes.byref(_format(fmt)), _SCALE_MODES[scale_mode], _ROUNDINGS[rounding],
            int(flush_subnormals), ctypes.c_void_p(codes.data_ptr()), ctypes.c_void_p(scales.data_ptr()), _threads()),
            "quantize")
    return codes, scales


def native_fake_quantize(x: Tensor, elem_format: str, block_size: int, scale_mode: str, rounding: str,
                         flush_subnormals: bool) -> Tensor:
    """`reference.fake_quantize_last_axis` in C, where `covers` holds."""
    fmt = get_format(elem_format)
    x, rows, n = _rows(x)
    out = torch.empty_like(x)
    if rows and n:
        _check(_library().mxfx_fake_quantize(
            ctypes.c_void_p(x.data_ptr()), _DTYPES[x.dtype], ctypes.c_int64(rows), ctypes.c_int64(n),
            ctypes.c_int64(block_size), ctypes.byref(_format(fmt)), _SCALE_MODES[scale_mode], _ROUNDINGS[rounding],
            int(flush_subnormals), ctypes.c_void_p(out.data_ptr()), _threads()), "fake_quantize")
    return out


def dequantize_covers(codes: Tensor, scales: Tensor, dtype: torch.dtype) -> bool:
    """Whether the kernels dequantize these (real CPU) codes and scales to `dtype`."""
    return (type(codes) is Tensor and type(scales) is Tensor and codes.device.type == "cpu"
            and scales.device.type == "cpu" and codes.dtype == torch.uint8 and scales.dtype == torch.uint8
            and dtype in _DTYPES and not torch.compiler.is_compiling() and _library() is not None)


def native_dequantize(codes: Tensor, scales: Tensor, elem_format: str, block_size: int, n: int,
                      dtype: torch.dtype) -> Tensor:
    """`reference.dequantize_last_axis` in C, where `dequantize_covers` holds. Element values come
    from the format's table of `reference.decode_elements` over every code (the same bits by construction)."""
    fmt = get_format(elem_format)
    table = _TABLES.get(fmt.name)
    if table is None:
        table = _TABLES[fmt.name] = decode_elements(torch.arange(1 << fmt.bits, dtype=torch.uint8), fmt).contiguous()
    codes, scales = codes.contiguous(), scales.contiguous()
    n_blocks = scales.shape[-1]
    rows = scales.numel() // n_blocks if n_blocks else 0
    out = torch.empty((*scales.shape[:-1], n), dtype=dtype)
    if rows and n:
        _check(_library().mxfx_dequantize(
            ctypes.c_void_p(codes.data_ptr()), ctypes.c_void_p(scales.data_ptr()), ctypes.c_int64(rows),
            ctypes.c_int64(n), ctypes.c_int64(block_size), fmt.bits, ctypes.c_int64(codes.shape[-1]),
            ctypes.c_int64(n_blocks), ctypes.c_void_p(table.data_ptr()), ctypes.c_void_p(out.data_ptr()),
            _DTYPES[dtype], _threads()), "dequantize")
    return out


# The quantizers as the eager code calls them: the C kernels where they cover the call (a real CPU
# tensor, no Inductor hint), else the reference math. The signatures are the reference's.


def quantize_last_axis(x, elem_format, block_size, scale_mode="floor", rounding="even", seed=0,
                       flush_subnormals=False, hint=None):
    """`reference.quantize_last_axis`, in C where it can be."""
    if hint is None and covers(x, block_size, scale_mode, rounding):
        return native_quantize(x, elem_format, block_size, scale_mode, rounding, flush_subnormals)
    return reference.quantize_last_axis(x, elem_format, block_size, scale_mode, rounding, seed, flush_subnormals, hint)


def fake_quantize_last_axis(x, elem_format, block_size, scale_mode="floor", rounding="even", seed=0,
                            flush_subnormals=False, hint=None):
    """`reference.fake_quantize_last_axis`, in C where it can be."""
    if hint is None and covers(x, block_size, scale_mode, rounding):
        return native_fake_quantize(x, elem_format, block_size, scale_mode, rounding, flush_subnormals)
    return reference.fake_quantize_last_axis(x, elem_format, block_size, scale_mode, rounding, seed,
                                             flush_subnormals, hint)


def dequantize_last_axis(codes, scales, elem_format, block_size, n, dtype, hint=None):
    """`reference.dequantize_last_axis`, in C where it can be."""
    if hint is None and dequantize_covers(codes, scales, dtype):
        return native_dequantize(codes, scales, elem_format, block_size, n, dtype)
    return reference.dequantize_last_axis(codes, scales, elem_format, block_size, n, dtype, hint)
