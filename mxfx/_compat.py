"""Every private torch API mxfx touches, in one place, so a torch upgrade touches one file."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch

_log = logging.getLogger(__name__)


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


# Set to 0 (or "false", "off", "no") before `import mxfx` to leave Inductor's loop split alone.
LOOP_SPLIT_GUARD_ENV = "MXFX_INDUCTOR_LOOP_SPLIT_GUARD"
# torch releases the guard is installed on: 2.13 has the bug (tests/test_compat.py shows it). 2.14
# is in mxfx's declared range but unverified; upstream's try_loop_split still splits without a
# divisibility check, and the guard changes nothing where a split keeps every iteration, so it is
# installed there too. Releases outside the declared range get no guard (and a log message).
LOOP_SPLIT_GUARD_VERSIONS = ((2, 13), (2, 14))


def _guarded_release(version) -> bool:
    """Whether a `TorchVersion` is one of `LOOP_SPLIT_GUARD_VERSIONS` (any patch release)."""
    return any(version >= (major, minor) and version < (major, minor + 1) for major, minor in LOOP_SPLIT_GUARD_VERSIONS)


def loop_split_guard_decision(version: str | None = None, environ=None) -> tuple[bool, str]:
    """(install the loop-split guard?, why) for a torch `version` and an environment.

    Args:
        version: a torch version string (default: the running torch).
        environ: a mapping of environment variables (default: `os.environ`).
    """
    import os

    from torch.torch_version import TorchVersion

    environ = os.environ if environ is None else environ
    setting = environ.get(LOOP_SPLIT_GUARD_ENV, "1").strip().lower()
    if setting in ("0", "false", "off", "no"):
        return False, f"disabled by {LOOP_SPLIT_GUARD_ENV}={environ[LOOP_SPLIT_GUARD_ENV]}"
    parsed = TorchVersion(torch.__version__ if version is None else version)
    if not _guarded_release(parsed):
        known = ", ".join(f"{a}.{b}" for a, b in LOOP_SPLIT_GUARD_VERSIONS)
        return False, f"torch {parsed} is not one of the releases the guard is for ({known})"
    return True, f"torch {parsed}"


def guard_inductor_loop_split() -> bool:
    """Keep Inductor's CPU loop split from dropping the tail of a loop (a miscompile in torch 2.13).

    `CppScheduling.try_loop_split` removes an index division `i // d` by splitting the loop over
    `i` (length n) into (n // d, d) without checking that d divides n: the last n % d iterations
    are never run. MX hits it whenever a block axis is not a multiple of the block size (the
    per-block scale is read at `i // block_size` while the output has n elements), and the
    partial block's outputs stay uninitialised memory. The guard runs the optimisation and
    undoes it when the split loops no longer cover every iteration. Upstream still has the
    unchecked `index_size[split_idx] // split_number` (searched).

    The method is replaced for every CPU compile in the process, mxfx's or not, so the guard is
    fail-safe: it is installed only on the torch releases in `LOOP_SPLIT_GUARD_VERSIONS`, not at
    all when the environment sets `MXFX_INDUCTOR_LOOP_SPLIT_GUARD=0`, and if its own use of
    Inductor internals (`SchedulerNode.snapshot_loop_state`, `restore_loop_state`, `group`)
    fails, it logs a warning once and returns what the original method returned. Exceptions of
    the original method itself propagate unchanged. Idempotent.

    Returns:
        Whether the guard is installed after the call.
    """
    wanted, why = loop_split_guard_decision()
    if not wanted:
        _log.info("mxfx: Inductor loop-split guard not installed: %s", why)
        return False
    try:
        from torch._inductor.codegen.cpp import CppScheduling

        original = CppScheduling.try_loop_split
    except (ImportError, AttributeError):  # a torch without this optimisation has no such bug
        return False
    if getattr(original, "_mxfx_guarded", False):
        return True

    def try_loop_split(self, nodes):
        try:
            before = [(node, _snapshot_loop(node), _loop_iterations(node)) for node in nodes]
        except Exception as error:  # a torch whose internals moved: stand aside
            _guard_failed(error)
            return original(self, nodes)
        split = original(self, nodes)
        try:
            if all(_loop_iterations(node) == count for node, _, count in before):
                return split
            for node, state, _ in reversed(before):
                _restore_loop(node, state)
            return nodes
        except Exception as error:
            _guard_failed(error)
            return split

    try_loop_split._mxfx_guarded = True
    try_loop_split.__wrapped__ = original  # the tests check the unguarded one still miscompiles
    CppScheduling.try_loop_split = try_loop_split
    return True


# The guard's only contact with Inductor's scheduler nodes, one function each (the tests break them).
def _snapshot_loop(node):
    return node.snapshot_loop_state()


def _restore_loop(node, state) -> None:
    node.restore_loop_state(state)


def _loop_iterations(node):
    """The iteration count of a scheduler node's loop nest (pointwise sizes times reduction sizes)."""
    import sympy

    return sympy.expand(sympy.Mul(*node.group[1][0], *node.group[1][1]))


_GUARD_FAILURES: set[str] = set()


def _guard_failed(error: Exception) -> None:
    """Log once per kind of failure that the guard could not check a loop split (never raises)."""
    kind = f"{type(error).__name__}: {error}"
    if kind not in _GUARD_FAILURES:
        _GUARD_FAILURES.add(kind)
        _log.warning("mxfx: the Inductor loop-split guard cannot inspect this torch's loop state (%s); "
                     "CPU compiles run the unguarded split, which drops the tail of loops whose MX "
                     "block axis is not a multiple of the block size", kind)


def backport_dtype_propagation_init() -> bool:
    """Backport pytorch/pytorch#192820 to torch 2.13/2.14: Inductor constructs its singleton
    `DtypePropagationOpsHandler` once per op it generates code for, and each construction re-runs
    the handler's metaprogramming (a `setattr` per op rule and a `dir()`), ~35% of the code
    generation of an MX quantizer kernel (measured: 0.94 -> 0.62 s for one fake-quantize).
    As upstream, the re-run is skipped while `op_dtype_propagation_rules`, the one registry it reads
    that grows, is unchanged, so a late registration is still picked up. It changes no result
    (the same attributes are set to the same rules); every compile in the process gets it, so it
    is installed only on `LOOP_SPLIT_GUARD_VERSIONS` releases, and not at all where Inductor's
    internals differ. Idempotent. Returns whether it is installed.
    """
    from torch.torch_version import TorchVersion

    if not _guarded_release(TorchVersion(torch.__version__)):
        return False
    try:
        from torch._inductor import utils
        from torch._inductor.dtype_propagation import DtypePropagationOpsHandler

        rules = utils.op_dtype_propagation_rules
        original = DtypePropagationOpsHandler.__init__
    except (ImportError, AttributeError):
        return False
    if getattr(original, "_mxfx_backport", False):
        return True

    def __init__(self) -> None:
        built_from = tuple(rules.items())
        if getattr(self, "_mxfx_built_from", None) == built_from:
            return
        original(self)
        self._mxfx_built_from = built_from

    __init__._mxfx_backport = True
    DtypePropagationOpsHandler.__init__ = __init__
    return True


def tag_compile_caches(digest: str) -> None:
    """Add `digest` (a hash of mxfx's op sources) to the key of torch.compile's caches.

    AOTAutograd's cache keys the Dynamo graph, where an mxfx op is only its name: the
    decomposition Inductor traces in its place (`register_inductor_decomposition`) is a Python
    function pickled by reference, so after the math of an mxfx op changed a warm cache would
    hand back kernels built from the old math. (Inductor's FX-graph cache sees the graph after
    decomposition, plain ATen, and is safe on its own.) torch 2.13 has no key component scoped to
    graphs that contain a given op: source hashes are taken only for user Triton kernels (GPU),
    `CustomGraphPass.uuid()` only for passes handed to a compile, and
    `inductor.config.unsafe_marked_cacheable_functions` is itself global config. The one knob
    that enters every key is `torch.compiler.config.cache_key_tag` (FX-graph, AOTAutograd,
    autotune and Dynamo PGO caches). Its cost: once mxfx is imported, *every* compile in the
    process (mxfx's or not) is keyed with the tag, so entries written by a process without mxfx
    (or with other mxfx sources) are not reused. A tag the user set is kept and extended.
    Idempotent. Scoping it would take the digest inside the graph (e.g. an argument of the mxfx
    ops), which changes the op schemas.
    """
    tag = torch.compiler.config.cache_key_tag
    mark = f"mxfx-{digest}"
    if mark not in tag.split("+"):
        torch.compiler.config.cache_key_tag = f"{tag}+{mark}" if tag else mark


def cache_key_suffix(suffix: str):
    """A context that extends `torch.compiler.config.cache_key_tag` (see `tag_compile_caches`) with
    `suffix`, so that compiles under it never share cache entries with compiles outside it."""
    tag = torch.compiler.config.cache_key_tag
    return torch.compiler.config.patch(cache_key_tag=f"{tag}+{suffix}" if tag else suffix)


def inductor_runs_python_fallbacks() -> bool:
    """Whether the Inductor compile being traced now runs its graph from Python and without freezing:
    a Python custom op can then be left opaque (a fallback kernel called at run time). False for
    ahead-of-time compilation and the C++ wrapper (no Python at run time), and under freezing
    (which must see through the ops to fold the weights). Fail-safe: False if unsure."""
    try:
        from torch._inductor import config
        from torch._inductor.virtualized import V

        return not (config.freezing or config.cpp_wrapper or V.aot_compilation)
    except (ImportError, AttributeError) as error:
        _log.warning("mxfx: cannot read Inductor's compile mode in this torch (%s); mxfx ops are inlined", error)
        return False


def size_hint(size) -> int | None:
    """The value a symbolic size had in the example inputs, or None where torch cannot say
    (torch 2.13 names this `optimization_hint`; earlier releases `hint_int`)."""
    from torch.fx.experimental import symbolic_shapes

    for name in ("optimization_hint", "hint_int"):
        hint = getattr(symbolic_shapes, name, None)
        if hint is not None:
            try:
                return int(hint(size))
            except Exception:  # an unbacked size has no hint
                return None
    return None


def is_traced(t: torch.Tensor) -> bool:
    """Whether `t` is a tracing stand-in (a FakeTensor, as in the graphs Inductor lowers) rather
    than data, or code Dynamo is tracing now. Fail-safe: True if torch cannot say (callers then
    take their traced-safe way)."""
    if torch.compiler.is_compiling():  # first: Dynamo cannot trace into is_fake
        return True
    try:
        from torch._subclasses.fake_tensor import is_fake

        return bool(is_fake(t)) or isinstance(t, torch.fx.Proxy)
    except Exception:
        return True


def compile_rows_kernel(fn: Callable, tensors, dynamic_rows: bool, config_patches: dict) -> Callable:
    """`fn(*tensors)` traced to ATen by `make_fx` on fake tensors (dim 0 symbolic where
    `dynamic_rows`, every other size static) and compiled by Inductor's `compile_fx`, with no
    Dynamo frame: a callable of tensors shaped like `tensors` (any row count >= 2 where dynamic;
    contiguous), returning what fn returns. No guards are checked at call time, so the compile
    must have made none but "these row counts are equal" (the caller keeps them equal); any other
    raises RuntimeError. Called per call, Dynamo's frame and guards cost ~50 us more (a 64x32
    fake-quantize: 66 vs 13 us) and its bytecode trace ~0.2 s more per kernel."""
    import sympy
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    shape_env = ShapeEnv()
    fake_mode = FakeTensorMode(shape_env=shape_env)

    def fake(t):
        sizes = [DimDynamic.DYNAMIC if dynamic_rows and d == 0 else DimDynamic.STATIC for d in range(t.dim())]
        return fake_mode.from_tensor(t, symbolic_context=StatelessSymbolicContext(dynamic_sizes=sizes))

    fakes = [fake(t) for t in tensors]
    rows = {t.shape[0].node.expr for t in fakes} if dynamic_rows else set()  # before the trace equates them
    with fake_mode:  # Inductor's decompositions, as AOTAutograd traces for it (e.g. a symbolic pad)
        graph = make_fx(fn, decomposition_table=select_decomp_table(), tracing_mode="real")(*fakes)
    with tracing(TracingContext(fake_mode)):
        compiled = compile_fx(graph, fakes, config_patches=config_patches)
    for guard in shape_env.guards:
        expr = guard.expr
        if not (isinstance(expr, sympy.Eq) and all(side in rows for side in expr.args)):
            raise RuntimeError(f"the kernel's compile assumed {expr} of its sizes, which its callers do not check ({guard.sloc})")
    return compiled


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


def register_deduplicated_fallback(op: torch._ops.OpOverload) -> None:
    """Lower the pure op `op` as Inductor's implicit fallback kernel would (same layout
    constraint), except that within one graph a call with the same input buffers (name and layout)
    and arguments as an earlier one reuses its output. HF models feed one normalised activation to
    several linears (query, key and value; gate and up), each with its own activation quantizer:
    in the post-AOT graph these are identical calls on one buffer (its inputs are not mutated
    between uses: the graph is functional), which Inductor does not merge across fallback
    kernels. Idempotent; imports Inductor's lowering table only when called."""
    import weakref

    from torch._inductor import ir, lowering
    from torch._inductor.virtualized import V
    from torch._library.utils import get_layout_constraint_tag

    if op in lowering.lowerings:
        return
    constraint = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
    lowering.make_fallback(op, layout_constraint=constraint, warn=False)
    fallback = lowering.lowerings[op]
    outputs = weakref.WeakKeyDictionary()  # graph -> {call key: (args, output)}

    def key_of(arg):
        if isinstance(arg, ir.IRNode):
            try:
                return ("buffer", arg.get_name(), str(arg.get_layout()))
            except Exception:  # an unnamed IR value: only the same object is the same input
                return ("node", id(arg))
        return ("value", tuple(arg) if isinstance(arg, list) else arg)

    def lower(*args, **kwargs):
        calls = outputs.setdefault(V.graph, {})
        key = (tuple(map(key_of, args)), tuple((k, key_of(v)) for k, v in sorted(kwargs.items())))
        if key not in calls:
            calls[key] = (args, fallback(*args, **kwargs))  # args kept: ids stay unique while used
        return calls[key][1]

    lowering.lowerings[op] = lower


def register_hadamard_lowering(op: torch._ops.OpOverload) -> bool:
    """Lower `mxfx::hadamard(x, block_size, axis)` on fp32 `x` to one Inductor Pointwise, so the
    rotation is computed inside the loop that consumes it instead of as buffers between stages.

    Inductor, given the butterfly as a chain of broadcast pointwise ops, realizes an intermediate
    buffer every two stages (a value read by more than one later load is realized once its
    read count passes `realize_reads_threshold`): for a block of 32 that is three loop nests with
    inner loops of 2 and 8 elements before the quantizer's. Here each output element is instead
    computed from the `block_size` loads of its block by the same butterfly tree that eager runs:

        T_0(i) = x[i],   T_b(j) = T_{b-1}(j with bit b-1 clear) + s_{b-1}(j) T_{b-1}(j with bit b-1 set)

    with s_b(j) = -1 where bit b of j's in-block position is set, else +1, and one final multiply by
    1/sqrt(block_size). The leaves are x[block start + i] for i = 0 .. block_size - 1 in order and
    the adds happen in the same tree order as the eager stages; a sign flip commutes exactly with
    IEEE addition (round-to-nearest is symmetric), so every output is bit-identical to eager's
    (each node is `fma(high, s, low)`, exact too: `s * high` is). It costs block_size loads and
    block_size - 1 multiply-adds per element (the butterfly: log2(block_size) adds), all from the
    one block in cache; the loads do not depend on the position, so a vectorized loop over
    positions broadcasts them. The iteration space is (..., block, position, ...), which the
    quantizer's per-block loop shares: Inductor fuses the two into one loop nest and keeps the
    rotated block in a local buffer.

    Other dtypes keep the decomposition (eager rounds every stage to bf16/fp16; Inductor would
    compute in fp32). Idempotent. Returns whether the lowering is registered.
    """
    import math

    try:
        from torch._inductor import ir, lowering
        from torch._inductor.virtualized import ops
        from torch.utils._sympy.functions import FloorDiv
    except ImportError as error:  # a torch whose internals moved: the decomposition stays
        _log.info("mxfx: no Inductor lowering for %s (%s)", op, error)
        return False
    if op in lowering.lowerings:
        return True

    @lowering.register_lowering(op, type_promotion_kind=None)
    def _hadamard(x, block_size, axis):
        size = list(x.get_size())
        axis = axis % len(size)
        load = x.make_loader()
        bits = block_size.bit_length() - 1
        # Iterate over (..., block, position in block, ...): the loads of a block do not depend
        # on the position, so the vectorized inner loop broadcasts them (no gathers).
        ranges = [*size[:axis], FloorDiv(size[axis], block_size), block_size, *size[axis + 1 :]]

        def inner_fn(index):
            outer, block, position, inner = index[:axis], index[axis], index[axis + 1], index[axis + 2 :]
            # s_b = 1 - 2 * ((position >> b) & 1), from the position as a contiguous int32 vector
            lane = ops.index_expr(position, torch.int32)
            one, two = ops.constant(1, torch.int32), ops.constant(2, torch.int32)
            signs = [ops.to_dtype(ops.sub(one, ops.mul(two, ops.bitwise_and(
                ops.bitwise_right_shift(lane, ops.constant(b, torch.int32)), one))), torch.float32) for b in range(bits)]

            def tree(first: int, count: int):
                if count == 1:
                    return load([*outer, block * block_size + first, *inner])
                half = count // 2
                low, high = tree(first, half), tree(first + half, half)
                # fma(high, s, low) == low + s * high exactly: s * high is exact (s = +-1)
                return ops.fma(high, signs[half.bit_length() - 1], low)

            # the same constant eager multiplies by, rounded to fp32 the same way
            return ops.mul(tree(0, block_size), ops.constant(1.0 / math.sqrt(block_size), torch.float32))

        rotated = ir.Pointwise.create(device=x.get_device(), dtype=x.get_dtype(), inner_fn=inner_fn, ranges=ranges)
        return lowering.view(rotated, size)

    return True


def inductor_freezing():
    """A context in which torch.compile compiles with Inductor freezing (`inductor.config.freezing`).

    Freezing turns the parameters and buffers of the compiled module into constants and folds the
    parts of the graph that depend only on them (after the mxfx decompositions are traced, so the
    dequantize of packed weight codes is folded into a constant weight). It must be on while Dynamo
    traces (Dynamo reads it to decide how parameters enter the graph), which
    `torch.compile(options={"freezing": True})` does not achieve in torch 2.13 (the options reach
    Inductor only): the global config is patched for the duration of the context.

    Inductor's folder also treats every constructor (`aten.full`, which is what a Python scalar in
    `torch.where(mask, nan, x)` or a `torch.ones_like` becomes) as not constant, so the fold of an
    MX decode stopped at its first such op and left full-size int32/bool intermediates as constants
    (more bytes per call than the uint8 codes). Within the context the folder evaluates
    constructors too but never turns a constructor itself into a constant: a constructor whose
    every user folds disappears, one that feeds the rest of the graph stays a constructor.
    Fail-safe: on a torch without these internals, a log message and whatever part still applies.
    """

    stack = contextlib.ExitStack()
    try:
        from torch._inductor import config

        if not hasattr(config, "freezing"):
            raise AttributeError("torch._inductor.config.freezing")
        stack.enter_context(config.patch(freezing=True))
    except (ImportError, AttributeError) as error:
        _log.warning("mxfx: Inductor freezing is not available in this torch (%s); weights are not folded", error)
        return stack
    try:
        from unittest import mock

        from torch._inductor import constant_folding, freezing

        if not (callable(getattr(freezing, "constant_fold", None)) and hasattr(constant_folding, "ConstantFolder")
                and hasattr(constant_folding, "replace_node_with_constant")):
            raise AttributeError("torch._inductor.freezing.constant_fold")
        stack.enter_context(mock.patch.object(freezing, "constant_fold", _constant_fold_with_constructors))
    except (ImportError, AttributeError) as error:
        _log.warning("mxfx: cannot extend Inductor's constant folding in this torch (%s); "
                     "packed weights are folded only in part", error)
    return stack


def _constant_fold_with_constructors(gm, constraint_fn=None) -> None:
    """torch 2.13's `constant_folding.constant_fold`, with `skip_constructors=False` and
    constructor nodes themselves never replaced by constants (see `inductor_freezing`)."""
    from torch._inductor.constant_folding import ConstantFolder, replace_node_with_constant

    def foldable(node) -> bool:
        if constraint_fn is not None and not constraint_fn(node):
            return False
        return node.op != "call_function" or bool(node.all_input_nodes)  # a constructor reads no node

    with torch.utils._python_dispatch._disable_current_modes():
        folder = ConstantFolder(gm, skip_constructors=False)
        folder.run()
        for node, constant in folder.node_replacements.items():
            if foldable(node):
                replace_node_with_constant(gm, node, constant)
        erased = []
        for node in gm.graph.find_nodes(op="get_attr"):
            if len(node.users) == 0:
                if hasattr(gm, node.target):
                    delattr(gm, node.target)
                erased.append(node)
        for node in erased:
            gm.graph.erase_node(node)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
