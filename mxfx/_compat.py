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


def guard_inductor_loop_split() -> None:
    """Keep Inductor's CPU loop split from dropping the tail of a loop (a miscompile in torch 2.13).

    `CppScheduling.try_loop_split` removes an index division `i // d` by splitting the loop over
    `i` (length n) into (n // d, d) without checking that d divides n: the last n % d iterations
    are never run. MX hits it whenever a block axis is not a multiple of the block size (the
    per-block scale is read at `i // block_size` while the output has n elements), and the
    partial block's outputs stay uninitialised memory. The guard runs the optimisation and
    undoes it when the split loops no longer cover every iteration; it is idempotent.
    Upstream still has the unchecked `index_size[split_idx] // split_number` (searched).
    """
    import sympy

    try:
        from torch._inductor.codegen.cpp import CppScheduling

        original = CppScheduling.try_loop_split
    except (ImportError, AttributeError):  # a torch without this optimisation has no such bug
        return
    if getattr(original, "_mxfx_guarded", False):
        return

    def iterations(node) -> sympy.Expr:
        return sympy.expand(sympy.Mul(*node.group[1][0], *node.group[1][1]))

    def try_loop_split(self, nodes):
        before = [(node, node.snapshot_loop_state(), iterations(node)) for node in nodes]
        split = original(self, nodes)
        if all(iterations(node) == count for node, _, count in before):
            return split
        for node, state, _ in reversed(before):
            node.restore_loop_state(state)
        return nodes

    try_loop_split._mxfx_guarded = True
    try_loop_split.__wrapped__ = original  # the tests check the unguarded one still miscompiles
    CppScheduling.try_loop_split = try_loop_split


def tag_compile_caches(digest: str) -> None:
    """Add `digest` (a hash of mxfx's op sources) to the key of torch.compile's caches.

    Inductor's FX-graph cache and AOTAutograd's cache key a graph by its nodes: an mxfx op is just
    its name there, so a cached kernel built from an older mxfx decomposition would be reused after
    the math changed. torch offers one public knob that enters every cache key,
    `torch.compiler.config.cache_key_tag`; a tag the user set is kept and extended. Idempotent.
    """
    tag = torch.compiler.config.cache_key_tag
    mark = f"mxfx-{digest}"
    if mark not in tag.split("+"):
        torch.compiler.config.cache_key_tag = f"{tag}+{mark}" if tag else mark


def register_realize_lowering(op: torch._ops.OpOverload) -> None:
    """Lower the identity op `op` in Inductor by realizing its input into a buffer.

    Inductor inlines an unrealized producer (GELU, LayerNorm, residual adds) into every loop of
    its consumer; an MX quantizer reads each block twice (the block amax, then the elements), so
    the producer was computed twice per element. Realizing it first costs one write and one read
    instead. Idempotent; imports Inductor's lowering table only when called.
    """
    from torch._inductor import lowering

    if op in lowering.lowerings:
        return

    @lowering.register_lowering(op, type_promotion_kind=None)
    def _realize(x):
        x.realize()
        return x
