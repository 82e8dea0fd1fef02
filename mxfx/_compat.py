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


def size_oblivious_export():
    """A context in which torch.export reasons about dynamic sizes size-obliviously: a dimension
    traced at size >= 2 is exported for sizes 0 and 1 too (torch's 0/1 specialization would
    otherwise guard it to >= 2; a prepared model must accept one window or one decoded token)."""
    from torch.fx.experimental import _config

    return _config.patch(backed_size_oblivious=True)


def eager_numerics() -> dict:
    """torch.compile `options` under which Inductor keeps eager's floating-point numerics wherever
    torch 2.13 offers a switch: `torch.compile(prepared, options=mxfx.eager_numerics())`.

    - `emulate_precision_casts`: keep the bf16/fp16 round trips between fused ops that eager does
      (without it a fused bf16 chain stays in fp32 and rounds differently);
    - `cpp.enable_unsafe_math_opt_flag` off, `cpp.enable_floating_point_contract_flag` "off": no
      reassociation and no fused multiply-add contraction in the generated C++ (torch's defaults,
      pinned against environment variables that turn them on);
    - `fallback_random`: random ops through ATen's generator (mxfx's stochastic rounding is its own
      counter-based hash and needs nothing).
    What no switch covers (measured in the README): Inductor's reductions (sum, mean, softmax,
    layer norm) accumulate in another order than ATen's, and its vectorised exp, sin, cos, tanh, erf
    can differ from ATen's by an ulp; their last-bit differences reach the next MX quantizer.
    Returns a fresh dict (the global Inductor config is never touched).
    """
    return {
        "emulate_precision_casts": True,
        "cpp.enable_unsafe_math_opt_flag": False,
        "cpp.enable_floating_point_contract_flag": "off",
        "fallback_random": True,
    }
