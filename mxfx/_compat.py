"""Every private torch API mxfx touches, in one place, so a torch upgrade touches one file."""

from __future__ import annotations

from collections.abc import Callable

import torch


def register_inductor_decomposition(op: torch._ops.OpOverload, fn: Callable) -> None:
    """Let Inductor trace `fn` in place of the opaque custom op `op`, so the op's math fuses.

    torch.export and eager keep the op (it is not in the core ATen decomposition table);
    only Inductor's own table learns it. Inductor caches its table on first use
    (`fast_random_decomps` is functools.cache'd), so the cache is cleared after registering.
    """
    from torch._inductor import decomposition

    decomposition.register_decomposition([op])(fn)
    decomposition.fast_random_decomps.cache_clear()


def run_and_get_code(fn: Callable, *args, **kwargs):
    """(result, [generated source]) of running a compiled function; for tests and benchmarks."""
    from torch._inductor.utils import run_and_get_code as _run_and_get_code

    return _run_and_get_code(fn, *args, **kwargs)


def detect_fake_mode(values):
    """The FakeTensorMode that produced a graph's meta["val"] tensors (None if there is none)."""
    from torch._guards import detect_fake_mode as _detect

    return _detect(values)
