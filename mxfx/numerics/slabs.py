"""Quantize a large tensor a slab at a time: the codes, scales and fake-quantized values of
`api.quantize` / `api.fake_quantize` on the whole tensor, bit for bit, with the reference math's
temporaries bounded by a slab instead of the tensor.

Why: eager quantization runs the reference math (`mxfx.numerics.reference`) tensor-wide, and it
holds several tensor-sized fp32/int temporaries at once (the scaled blocks, the rounded multiples,
their quanta, the unpacked codes): for one fp32 weight some ten times its bytes. prepare quantizes
every weight of a model in turn, so its peak memory was set by the largest weight (a 262144x640
tied embedding: ~6 GiB on top of the model), and glibc's allocator kept much of what was freed.

MX blocks lie along one axis, so the lines across every other axis quantize independently: the
tensor is cut across the leading axes (block axis moved last) into slabs of at most
`SLAB_ELEMENTS` elements (one line at least), each slab is quantized on its own, and its result
is copied into the preallocated output. Stochastic rounding is never cut: its random numbers hash
each element's flat index in the whole tensor.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from mxfx.numerics import api
from mxfx.numerics.formats import get_format
from mxfx.numerics.reference import packed_length

# 2^18 elements (1 MiB of fp32): one slab's temporaries stay near 10 MiB. Small slabs matter
# twice under glibc: bigger ones (2^20) left the heap fragmented between the kept codes, and
# prepare's RSS grew ~4x the codes it kept (SmolLM2's weights one after another, MXFP4: +376 MiB
# for 65 MiB of codes at 2^20, +75 MiB at 2^18, +72 MiB at 2^16); the time was the same within
# noise (~8 s), the per-call overhead small next to a slab's arithmetic.
SLAB_ELEMENTS = 1 << 18


def slab_indices(moved: Tensor, max_elements: int) -> Iterator[tuple]:
    """Index tuples into the leading axes of `moved` (block axis last) that cut it into slabs of at
    most `max_elements` elements each, or single lines along the last axis where one is larger."""
    if moved.dim() == 1 or moved.numel() <= max_elements:
        yield ()
        return
    line = moved[0].numel()
    if line <= max_elements:
        step = max_elements // line
        for start in range(0, moved.shape[0], step):
            yield (slice(start, start + step),)
        return
    for i in range(moved.shape[0]):
        for rest in slab_indices(moved[i], max_elements):
            yield (i, *rest)


def _cut(x: Tensor, rounding: str, max_elements: int | None) -> int | None:
    """The slab size to cut `x` into, or None to quantize it whole."""
    max_elements = SLAB_ELEMENTS if max_elements is None else max_elements
    return max_elements if rounding != "stochastic" and x.numel() > max_elements else None


def quantize(x: Tensor, elem_format: str, *, block_size: int = 32, axis: int = -1, scale_mode: str = "floor",
             rounding: str = "even", max_elements: int | None = None) -> api.MXData:
    """`api.quantize(x, ...)`, computed a slab at a time (same codes and scales); `max_elements`
    defaults to `SLAB_ELEMENTS`, read at call time."""
    max_elements = _cut(x, rounding, max_elements) if isinstance(x, Tensor) and x.dim() else None
    if max_elements is None:
        return api.quantize(x, elem_format, block_size=block_size, axis=axis, scale_mode=scale_mode, rounding=rounding)
    api.check_float_tensor(x)
    name = api.check_options(elem_format, block_size, scale_mode, rounding)
    axis = api._check_axis(axis, x.dim())
    moved = x.movedim(axis, -1)
    n_blocks = (moved.shape[-1] + block_size - 1) // block_size
    leading = tuple(moved.shape[:-1])
    codes = x.new_empty((*leading, packed_length(n_blocks * block_size, get_format(name))), dtype=torch.uint8)
    scales = x.new_empty((*leading, n_blocks), dtype=torch.uint8)
    for index in slab_indices(moved, max_elements):
        part = api.quantize(moved[index], name, block_size=block_size, axis=-1, scale_mode=scale_mode,
                            rounding=rounding)
        codes[index].copy_(part.codes)
        scales[index].copy_(part.scales)
        del part  # free the slab's result before the next slab's temporaries
    return api.MXData(codes, scales, name, block_size, axis, tuple(x.shape), x.dtype, scale_mode, rounding)


def fake_quantize(x: Tensor, elem_format: str, *, block_size: int = 32, axis: int = -1, scale_mode: str = "floor",
                  rounding: str = "even", max_elements: int | None = None) -> Tensor:
    """`api.fake_quantize(x, ...)`, computed a slab at a time (same values, a contiguous tensor)."""
    max_elements = _cut(x, rounding, max_elements) if isinstance(x, Tensor) and x.dim() else None
    if max_elements is None:
        return api.fake_quantize(x, elem_format, block_size=block_size, axis=axis, scale_mode=scale_mode,
                                 rounding=rounding)
    api.check_float_tensor(x)
    name = api.check_options(elem_format, block_size, scale_mode, rounding)
    axis = api._check_axis(axis, x.dim())
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    moved, moved_out = x.movedim(axis, -1), out.movedim(axis, -1)
    for index in slab_indices(moved, max_elements):
        moved_out[index].copy_(api.fake_quantize(moved[index], name, block_size=block_size, axis=-1,
                                                 scale_mode=scale_mode, rounding=rounding))
    return out
