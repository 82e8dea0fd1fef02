"""Every private torch API mxfx touches, in one place, so a torch upgrade touches one file.

Two kinds of use, both fail-safe (docs/compatibility.md):

- *hooks* change what torch does: the Inductor decompositions and lowerings of the mxfx ops, the
  shared kernels, the loop-split guard, the dtype-propagation backport, the compile cache-key tag
  and the freezing constant-fold extension. They are installed only on the torch releases mxfx is
  tested with (`TESTED_RELEASES`), or on any with `MXFX_TORCH_INTERNALS=1`, and on none with
  `MXFX_TORCH_INTERNALS=0`; the process-wide ones have a switch each. `import mxfx` installs
  none of them: each waits for the Inductor module it changes to be imported (`after_import`),
  so `import mxfx` loads no Inductor code and a program that never compiles sees no change.
- *reads* ask torch something (whether a tensor is fake, a size hint, pytree leaves, the compile
  mode); each has a public answer to fall back on if the private name is gone.

When a private API fails (a name moved, a call raised), mxfx takes the slower public path with
the same results and says so with one `MXFXWarning` per feature, naming the torch version and
the switch that selects that path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from collections.abc import Callable

import torch

from mxfx.errors import MXFXWarning

_log = logging.getLogger(__name__)

# torch releases (major, minor; any patch release) mxfx is tested with: 2.13 (CPU, every CI run)
# and 2.14 (the whole suite run under 2.14.1, `make test-torch-next`).
TESTED_RELEASES = ((2, 13), (2, 14))
# Every hook on ("1") or off ("0"); unset: on for `TESTED_RELEASES` only.
INTERNALS_ENV = "MXFX_TORCH_INTERNALS"
# Process-wide changes, each with its own opt-out ("0"):
LOOP_SPLIT_GUARD_ENV = "MXFX_INDUCTOR_LOOP_SPLIT_GUARD"
DTYPE_BACKPORT_ENV = "MXFX_DTYPE_PROPAGATION_BACKPORT"
CACHE_TAG_ENV = "MXFX_COMPILE_CACHE_TAG"
# Shared compiled kernels on CPU ("0": every mxfx op is inlined into the model's kernels).
SHARED_KERNELS_ENV = "MXFX_SHARED_KERNELS"
_OFF = ("0", "false", "off", "no")
_ON = ("1", "true", "on", "yes")


def _setting(name: str, environ=None) -> bool | None:
    """An on/off environment switch: True, False, or None where it is unset (or unreadable)."""
    value = (os.environ if environ is None else environ).get(name, "").strip().lower()
    return True if value in _ON else False if value in _OFF else None


def _release(version: str | None = None):
    from torch.torch_version import TorchVersion

    return TorchVersion(torch.__version__ if version is None else version)


def tested_release(version: str | None = None) -> bool:
    """Whether a torch version (default: the running one) is one of `TESTED_RELEASES`."""
    parsed = _release(version)
    return any(parsed >= (major, minor) and parsed < (major, minor + 1) for major, minor in TESTED_RELEASES)


def internals_decision(version: str | None = None, environ=None) -> tuple[bool, str]:
    """(install mxfx's hooks into torch?, why) for a torch `version` and an environment.

    Args:
        version: a torch version string (default: the running torch).
        environ: a mapping of environment variables (default: `os.environ`).

    Returns:
        True with `MXFX_TORCH_INTERNALS=1`, False with `=0`; unset, whether the release is tested.

    Example:
        >>> internals_decision("2.15.0", {})[0], internals_decision("2.15.0", {"MXFX_TORCH_INTERNALS": "1"})[0]
        (False, True)
    """
    setting, parsed = _setting(INTERNALS_ENV, environ), _release(version)
    if setting is not None:
        raw = (os.environ if environ is None else environ)[INTERNALS_ENV]
        return setting, f"turned {'on' if setting else 'off'} by {INTERNALS_ENV}={raw} (torch {parsed})"
    if tested_release(parsed):
        return True, f"torch {parsed} is a tested release"
    known = ", ".join(f"{a}.{b}" for a, b in TESTED_RELEASES)
    return False, f"torch {parsed} is not a release mxfx is tested with ({known})"


_INTERNALS: tuple[bool, str] | None = None


def internals_enabled() -> bool:
    """Whether mxfx's hooks go into this process's torch (`internals_decision`, decided once). An
    untested torch gets one MXFXWarning saying so; `MXFX_TORCH_INTERNALS=0` is taken silently."""
    global _INTERNALS
    if _INTERNALS is None:
        _INTERNALS = internals_decision()
        if not _INTERNALS[0] and _setting(INTERNALS_ENV) is None:
            warnings.warn(f"mxfx: {_INTERNALS[1]}, so its Inductor hooks are off: torch.compile runs every mxfx op "
                          "as its eager kernel (the same results, slower compiled code). Set "
                          f"{INTERNALS_ENV}=1 to try the hooks on this torch, {INTERNALS_ENV}=0 to silence this.",
                          MXFXWarning, stacklevel=2)
    return _INTERNALS[0]


_BROKEN: set[str] = set()


def degraded(feature: str, error: BaseException | str, fallback: str, switch: str) -> None:
    """Record that `feature` (a use of a private torch API) failed and warn once per feature:
    which torch, what failed, what mxfx does instead (`fallback`), and the `switch` that selects
    the fallback from the start. Never raises."""
    if feature in _BROKEN:
        return
    _BROKEN.add(feature)
    what = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    warnings.warn(f"mxfx: {feature} failed on torch {torch.__version__} ({what}); {fallback}. {switch}",
                  MXFXWarning, stacklevel=3)


def broken(feature: str) -> bool:
    """Whether `degraded` was called for `feature` in this process."""
    return feature in _BROKEN


# --- hooks that wait for an Inductor module ------------------------------------------------------

_PENDING: dict[str, list[Callable]] = {}


class _AfterImport:
    """A `sys.meta_path` finder that never loads anything itself: for a module a hook waits for,
    it asks the finders after it for the spec and has the module's own loader run the hooks right
    after the module's code has run. It leaves `sys.meta_path` once no hook waits."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in _PENDING:
            return None
        for finder in list(sys.meta_path):
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        try:
            original = loader.exec_module

            def exec_module(module):
                try:
                    original(module)
                finally:
                    vars(loader).pop("exec_module", None)  # the loader is as it was
                _fire(fullname, module)

            loader.exec_module = exec_module  # this module's loader only, for this one import
        except AttributeError:  # a loader without exec_module or __dict__: hooks run at first use
            pass
        return spec


_FINDER = _AfterImport()


def _fire(name: str, module) -> None:
    hooks = _PENDING.pop(name, [])
    if not _PENDING and _FINDER in sys.meta_path:
        sys.meta_path.remove(_FINDER)
    for hook in hooks:
        hook(module)


def after_import(name: str, hook: Callable, feature: str, fallback: str, switch: str) -> None:
    """Run `hook(module)` once the module `name` has been imported: now if it is already, else
    right after its code has run. An exception of the hook is never raised into the import: it
    becomes `degraded(feature, error, fallback, switch)`."""

    def run(module) -> None:
        try:
            hook(module)
        except Exception as error:
            degraded(feature, error, fallback, switch)

    module = sys.modules.get(name)
    if module is not None:
        run(module)
        return
    _PENDING.setdefault(name, []).append(run)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


def inductor_hooks_pending() -> list[str]:
    """The Inductor modules some mxfx hook still waits for (empty once they are imported)."""
    return sorted(_PENDING)


def compiler_disable(fn: Callable) -> Callable:
    """`torch.compiler.disable` for a module-level function, without importing Dynamo (~3 s) now:
    the module's attribute becomes the disabled function as soon as `torch._dynamo` is imported,
    which happens before anything is traced (torch.compile and torch.export import it). Callers
    must look the function up in its module when they call it (a call by its global name does).

    Example:
        >>> @compiler_disable
        ... def first_call(x):
        ...     return x
    """
    if "torch._dynamo" in sys.modules:
        return torch.compiler.disable(fn)
    module, name = sys.modules[fn.__module__], fn.__name__

    def install(_) -> None:
        setattr(module, name, torch.compiler.disable(fn))

    after_import("torch._dynamo", install, f"torch.compiler.disable({fn.__module__}.{name})",
                 "Dynamo traces into it (slower first calls)", "There is no switch: this path is the only one left.")
    return fn


_OPAQUE = "torch.compile runs the mxfx ops as their eager kernels (the same results, slower compiled code)"
_INTERNALS_SWITCH = f"Set {INTERNALS_ENV}=0 to take that path without this warning."


def register_inductor_decomposition(op: torch._ops.OpOverload, fn: Callable) -> None:
    """Let Inductor trace `fn` in place of the opaque custom op `op`, so the op's math fuses.

    torch.export and eager keep the op (it is not in the core ATen decomposition table);
    only Inductor's own table learns it, when `torch._inductor.decomposition` is imported (Inductor
    reads the table only while it compiles). Inductor caches its table on first use
    (`fast_random_decomps` is functools.cache'd), so the cache is cleared after registering.
    Without it (hooks off, or the registration failed) Inductor calls the op's eager kernel.
    """
    if not internals_enabled():
        return

    def install(decomposition) -> None:
        if broken(_TAG_FEATURE):  # a cache that cannot be keyed on mxfx's sources could go stale
            return
        decomposition.register_decomposition([op])(fn)
        decomposition.fast_random_decomps.cache_clear()

    after_import("torch._inductor.decomposition", install, "registering Inductor decompositions of the mxfx ops",
                 _OPAQUE, _INTERNALS_SWITCH)


def run_and_get_code(fn: Callable, *args, **kwargs):
    """(result, [generated source]) of running a compiled function; for tests and benchmarks."""
    from torch._inductor.utils import run_and_get_code as _run_and_get_code

    return _run_and_get_code(fn, *args, **kwargs)


def detect_fake_mode(values):
    """The FakeTensorMode that produced a graph's meta["val"] tensors (None if there is none).
    Fallback: the `fake_mode` attribute of the first value that has one."""
    try:
        from torch._guards import detect_fake_mode as _detect

        return _detect(values)
    except (ImportError, AttributeError) as error:
        degraded("torch._guards.detect_fake_mode", error, "the fake mode is read from the first fake tensor's "
                 "fake_mode attribute (the same mode where every value has one)", "There is no switch: this path is the "
                 "only one left.")
    return next((mode for mode in (getattr(v, "fake_mode", None) for v in values) if mode is not None), None)


def pytree_module():
    """torch's pytree functions (`tree_leaves`, `tree_map`, `tree_structure`, `tree_unflatten`):
    `torch.utils._pytree` in torch 2.13/2.14; where it is gone, the public `torch.utils.pytree`."""
    try:
        from torch.utils import _pytree

        return _pytree
    except ImportError as error:
        degraded("torch.utils._pytree", error, "torch.utils.pytree (public) is used", "There is no switch: this path "
                 "is the only one left.")
    import torch.utils.pytree as public

    return public


def tree_leaves(tree) -> list:
    """The leaves of a pytree (nested tuples, lists, dicts, named tuples and registered classes such
    as Hugging Face `ModelOutput`), as `torch.utils._pytree.tree_leaves` orders them. Fallback:
    the same walk over tuples, lists and dicts (values in insertion order; None is a leaf)."""
    try:
        from torch.utils import _pytree

        return _pytree.tree_leaves(tree)
    except (ImportError, AttributeError) as error:
        degraded("torch.utils._pytree.tree_leaves", error, "tuples, lists and dicts are walked by mxfx (classes "
                 "registered only with torch's pytree count as leaves)", "There is no switch: this path is the only "
                 "one left.")
    return _public_leaves(tree)


def _public_leaves(tree) -> list:
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _public_leaves(item)]
    if isinstance(tree, dict):
        return [leaf for item in tree.values() for leaf in _public_leaves(item)]
    return [tree]


def loop_split_guard_decision(version: str | None = None, environ=None) -> tuple[bool, str]:
    """(install the loop-split guard?, why) for a torch `version` and an environment.

    Args:
        version: a torch version string (default: the running torch).
        environ: a mapping of environment variables (default: `os.environ`).

    Returns:
        False where `MXFX_INDUCTOR_LOOP_SPLIT_GUARD=0`, else `internals_decision`'s answer: the
        guard is one of the hooks (2.13 has the bug, tests/test_compat.py shows it; upstream's
        `try_loop_split` still splits without a divisibility check, and the guard changes nothing
        where a split keeps every iteration).

    Example:
        >>> loop_split_guard_decision("2.13.0", {"MXFX_INDUCTOR_LOOP_SPLIT_GUARD": "0"})[0]
        False
    """
    if _setting(LOOP_SPLIT_GUARD_ENV, environ) is False:
        environ = os.environ if environ is None else environ
        return False, f"disabled by {LOOP_SPLIT_GUARD_ENV}={environ[LOOP_SPLIT_GUARD_ENV]}"
    return internals_decision(version, environ)


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
    fail-safe: it is installed only where the hooks are (`internals_decision`), not at all when the
    environment sets `MXFX_INDUCTOR_LOOP_SPLIT_GUARD=0`, only once Inductor's C++ backend is
    imported (`after_import`), and if its own use of Inductor internals
    (`SchedulerNode.snapshot_loop_state`, `restore_loop_state`, `group`) fails, it warns once and
    returns what the original method returned. Exceptions of the original method itself propagate
    unchanged. Idempotent.

    Returns:
        Whether the guard is installed, or will be when Inductor's C++ backend is imported.
    """
    wanted, why = loop_split_guard_decision()
    if not wanted:
        _log.info("mxfx: Inductor loop-split guard not installed: %s", why)
        return False
    after_import("torch._inductor.codegen.cpp", _install_loop_split_guard, "installing the Inductor loop-split guard",
                 "CPU compiles run Inductor's unguarded loop split, which drops the tail of loops whose MX block axis "
                 "is not a multiple of the block size",
                 f"Set {LOOP_SPLIT_GUARD_ENV}=0 to choose this without a warning.")
    return True


def _install_loop_split_guard(cpp) -> None:
    original = getattr(cpp.CppScheduling, "try_loop_split", None)
    if original is None:  # a torch without this optimisation has no such bug
        _log.info("mxfx: this torch's CppScheduling has no try_loop_split; no loop-split guard needed")
        return
    if getattr(original, "_mxfx_guarded", False):
        return

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
    cpp.CppScheduling.try_loop_split = try_loop_split


# The guard's only contact with Inductor's scheduler nodes, one function each (the tests break them).
def _snapshot_loop(node):
    return node.snapshot_loop_state()


def _restore_loop(node, state) -> None:
    node.restore_loop_state(state)


def _loop_iterations(node):
    """The iteration count of a scheduler node's loop nest (pointwise sizes times reduction sizes)."""
    import sympy

    return sympy.expand(sympy.Mul(*node.group[1][0], *node.group[1][1]))


def _guard_failed(error: Exception) -> None:
    """Warn once that the guard could not check a loop split (never raises)."""
    degraded("the Inductor loop-split guard's reading of loop state", error,
             "CPU compiles run the unguarded split, which drops the tail of loops whose MX block axis is not a "
             "multiple of the block size", f"Set {LOOP_SPLIT_GUARD_ENV}=0 to choose this without a warning.")


def backport_dtype_propagation_init() -> bool:
    """Backport pytorch/pytorch#192820 to torch 2.13/2.14: Inductor constructs its singleton
    `DtypePropagationOpsHandler` once per op it generates code for, and each construction re-runs
    the handler's metaprogramming (a `setattr` per op rule and a `dir()`), ~35% of the code
    generation of an MX quantizer kernel (measured: 0.94 -> 0.62 s for one fake-quantize).
    As upstream, the re-run is skipped while `op_dtype_propagation_rules`, the one registry it reads
    that grows, is unchanged, so a late registration is still picked up. It changes no result
    (the same attributes are set to the same rules); every compile in the process gets it, so it
    is installed only where the hooks are (`internals_decision`), not with
    `MXFX_DTYPE_PROPAGATION_BACKPORT=0`, and only once `torch._inductor.dtype_propagation` is
    imported. Idempotent.

    Returns:
        Whether it is installed, or will be when Inductor's module is imported.
    """
    if _setting(DTYPE_BACKPORT_ENV) is False or not internals_enabled():
        return False
    after_import("torch._inductor.dtype_propagation", _install_dtype_backport,
                 "the dtype-propagation backport (pytorch/pytorch#192820)", "Inductor's code generation runs unchanged "
                 "(the same code, generated more slowly)", f"Set {DTYPE_BACKPORT_ENV}=0 to choose this without a warning.")
    return True


def _install_dtype_backport(dtype_propagation) -> None:
    handler = dtype_propagation.DtypePropagationOpsHandler
    original = handler.__init__
    if getattr(original, "_mxfx_backport", False):
        return
    rules = sys.modules["torch._inductor.utils"].op_dtype_propagation_rules  # imported by dtype_propagation

    def __init__(self) -> None:
        built_from = tuple(rules.items())
        if getattr(self, "_mxfx_built_from", None) == built_from:
            return
        original(self)
        self._mxfx_built_from = built_from

    __init__._mxfx_backport = True
    handler.__init__ = __init__


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
    ops), which changes the op schemas. mxfx sets it through `tag_compile_caches_on_compile`.
    """
    tag = torch.compiler.config.cache_key_tag
    mark = f"mxfx-{digest}"
    if mark not in tag.split("+"):
        torch.compiler.config.cache_key_tag = f"{tag}+{mark}" if tag else mark


_TAG_FEATURE = "tagging torch.compile's cache keys with mxfx's sources"


def tag_compile_caches_on_compile(digest: Callable[[], str]) -> bool:
    """`tag_compile_caches(digest())` once Inductor's decomposition table is imported: before any
    compile can use the mxfx decompositions the tag keys, and never in a process that does not
    compile. Only where the hooks are, and not with `MXFX_COMPILE_CACHE_TAG=0` (then a warm cache
    may hand back kernels built from other mxfx sources: clear the Inductor cache,
    `TORCHINDUCTOR_CACHE_DIR`, after changing mxfx). Where setting the tag fails, the mxfx
    decompositions are removed again (stale kernels are then impossible: the ops run their eager
    kernels). Returns whether the tag is set or will be.
    """
    if _setting(CACHE_TAG_ENV) is False or not internals_enabled():
        return False

    def install(decomposition) -> None:
        try:
            tag_compile_caches(digest())
        except Exception:
            for op in [op for op in decomposition.decompositions if getattr(op, "namespace", None) == "mxfx"]:
                del decomposition.decompositions[op]
            decomposition.fast_random_decomps.cache_clear()
            raise

    after_import("torch._inductor.decomposition", install, _TAG_FEATURE, _OPAQUE,
                 f"Set {CACHE_TAG_ENV}=0 to keep the decompositions untagged (then clear the Inductor cache after "
                 "changing mxfx).")
    return True


def cache_key_suffix(suffix: str):
    """A context that extends `torch.compiler.config.cache_key_tag` (see `tag_compile_caches`) with
    `suffix`, so that compiles under it never share cache entries with compiles outside it (a
    no-op context where torch has no such tag: then the mxfx decompositions are off anyway)."""
    try:
        tag = torch.compiler.config.cache_key_tag
        return torch.compiler.config.patch(cache_key_tag=f"{tag}+{suffix}" if tag else suffix)
    except Exception:
        return contextlib.nullcontext()


def inductor_runs_python_fallbacks() -> bool:
    """Whether the Inductor compile being traced now runs its graph from Python and without freezing:
    a Python custom op can then be left opaque (a fallback kernel called at run time). False for
    ahead-of-time compilation and the C++ wrapper (no Python at run time), and under freezing
    (which must see through the ops to fold the weights). Fail-safe: False if unsure."""
    try:
        from torch._inductor import config
        from torch._inductor.virtualized import V

        return not (config.freezing or config.cpp_wrapper or V.aot_compilation)
    except Exception as error:
        degraded("reading Inductor's compile mode", error, "mxfx ops are inlined into the model's kernels (no shared "
                 "kernels: the same results, a slower first compile)",
                 f"Set {SHARED_KERNELS_ENV}=0 to choose this without a warning.")
        return False


def shared_kernels_enabled() -> bool:
    """Whether mxfx ops may become calls of shared compiled kernels (`mxfx.numerics.kernels`): not
    with `MXFX_SHARED_KERNELS=0`, nor once building a shared kernel failed in this process."""
    return _setting(SHARED_KERNELS_ENV) is not False and not broken(SHARED_KERNELS_FEATURE)


SHARED_KERNELS_FEATURE = "building a shared mxfx kernel"


def shared_kernel_failed(error: BaseException) -> None:
    """`degraded` for a shared kernel that could not be built: later compiles inline the mxfx ops."""
    degraded(SHARED_KERNELS_FEATURE, error, "that kernel runs the eager reference math, and later compiles inline "
             "the mxfx ops into the model's kernels (the same results)",
             f"Set {SHARED_KERNELS_ENV}=0 to inline them from the start.")


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
    except Exception as error:
        degraded("torch._subclasses.fake_tensor.is_fake", error, "every tensor is treated as traced: eager MX math takes "
                 "its trace-safe path (the same results, slower)", "There is no switch: this path is the only one left.")
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


def statically_known_true(expr) -> bool:
    """Whether a (possibly symbolic) boolean is true for every size (torch's
    `symbolic_shapes.statically_known_true`, imported on first use: that module costs ~0.5 s of
    `import mxfx`). Fallback: True only for a plain `True` (conservative: "not known")."""
    try:
        from torch.fx.experimental.symbolic_shapes import statically_known_true as known

        return bool(known(expr))
    except ImportError as error:
        degraded("torch.fx.experimental.symbolic_shapes.statically_known_true", error, "only plain booleans count as "
                 "known (symbolic checks are treated as unknown)", "There is no switch: this path is the only one left.")
    return expr is True


def pytree_node_types(spec) -> set[type]:
    """The classes of the nodes of a pytree spec (`ExportedProgram.call_spec.in_spec`/`out_spec`), read
    from `TreeSpec.type` and `children_specs` (torch.utils._pytree). Fallback: an empty set."""
    types, stack = set(), [spec]
    try:
        while stack:
            node = stack.pop()
            if node is None:
                continue
            types.add(node.type)
            stack.extend(node.children_specs)
    except AttributeError as error:
        degraded("reading pytree specs (TreeSpec.type, children_specs)", error, "mxfx.save records no output "
                 "classes, so a file whose outputs are a library's class loads only where that library is imported",
                 "There is no switch: import the library before mxfx.load.")
        return set()
    return types


def size_oblivious_export():
    """A context in which torch.export reasons about dynamic sizes size-obliviously: a dimension
    traced at size >= 2 is exported for sizes 0 and 1 too (torch's 0/1 specialization would
    otherwise guard it to >= 2; a prepared model must accept one window or one decoded token).
    Fallback: no such context (an exported dimension then accepts sizes >= 2 only)."""
    try:
        from torch.fx.experimental import _config

        return _config.patch(backed_size_oblivious=True)
    except Exception as error:
        degraded("size-oblivious export (torch.fx.experimental._config.backed_size_oblivious)", error,
                 "dynamic dimensions are exported for sizes >= 2 only", "Pass dynamic_shapes to mxfx.export for "
                 "other ranges.")
        return contextlib.nullcontext()


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
    Returns a fresh dict (the global Inductor config is never touched), without the switches this
    torch's Inductor does not have (torch.compile rejects unknown options; one warning names them).
    """
    options = {
        "emulate_precision_casts": True,
        "cpp.enable_unsafe_math_opt_flag": False,
        "cpp.enable_floating_point_contract_flag": "off",
        "fallback_random": True,
    }
    try:
        from torch._inductor import config

        known = config.get_config_copy()
        missing = [name for name in options if name not in known]
    except Exception as error:
        missing, known = [f"all ({type(error).__name__}: {error})"], {}
    if missing:
        degraded("eager_numerics' Inductor options", f"unknown: {', '.join(missing)}", "they are left out",
                 "There is no switch: torch.compile rejects unknown options.")
    return {name: value for name, value in options.items() if name in known}


def register_realize_lowering(op: torch._ops.OpOverload) -> None:
    """Lower the identity op `op` in Inductor by realizing its input into a buffer.

    Inductor inlines an unrealized producer (GELU, LayerNorm, residual adds) into every loop of
    its consumer; an MX quantizer reads each block twice (the block amax, then the elements), so
    the producer was computed twice per element. Realizing it first costs one write and one read
    instead. Idempotent; imports Inductor's lowering table only when called (while compiling).
    Fail-safe: without the lowering, Inductor calls the op's eager kernel (a copy; the same values).
    """
    if broken(_REALIZE_FEATURE):
        return
    try:
        _register_realize_lowering(op)
    except Exception as error:
        degraded(_REALIZE_FEATURE, error, "mxfx::realize runs as its eager kernel (a copy: the same results, slower)",
                 _INTERNALS_SWITCH)


_REALIZE_FEATURE = "registering Inductor's lowering of mxfx::realize"


def _register_realize_lowering(op: torch._ops.OpOverload) -> None:
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
    kernels. Idempotent; imports Inductor's lowering table only when called (while compiling).
    Fail-safe: without it, Inductor's own fallback kernel runs every call (the same results)."""
    if broken(_DEDUPLICATE_FEATURE):
        return
    try:
        _register_deduplicated_fallback(op)
    except Exception as error:
        degraded(_DEDUPLICATE_FEATURE, error, "every shared-kernel call runs, identical ones too (the same results, "
                 "slower)", _INTERNALS_SWITCH)


_DEDUPLICATE_FEATURE = "registering Inductor's deduplicated fallback of the shared mxfx kernels"


def _register_deduplicated_fallback(op: torch._ops.OpOverload) -> None:
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
    compute in fp32). Registered once `torch._inductor.lowering` is imported (only where the hooks
    are); `has_inductor_lowering(op)` says, while compiling, whether it was. Where it fails, the
    decomposition traces the eager butterfly (the same bits, three more loop nests). Idempotent.

    Returns:
        Whether the lowering is registered, or will be when Inductor's lowering module is imported.
    """
    if not internals_enabled():
        return False
    after_import("torch._inductor.lowering", lambda lowering: _register_hadamard_lowering(lowering, op),
                 "registering Inductor's lowering of mxfx::hadamard", "the rotation is traced as the eager butterfly "
                 "(the same bits, slower compiled code)", _INTERNALS_SWITCH)
    return True


_LOWERED: set = set()


def has_inductor_lowering(op: torch._ops.OpOverload) -> bool:
    """Whether an mxfx lowering of `op` (`register_hadamard_lowering`) is registered in Inductor."""
    return op in _LOWERED


def _register_hadamard_lowering(lowering, op: torch._ops.OpOverload) -> None:
    import math

    if op in _LOWERED:
        return

    @lowering.register_lowering(op, type_promotion_kind=None)
    def _hadamard(x, block_size, axis):
        # imported while compiling, not while Inductor's lowering module is being imported
        from torch._inductor import ir
        from torch._inductor.virtualized import ops
        from torch.utils._sympy.functions import FloorDiv

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

    _LOWERED.add(op)


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
        degraded("Inductor freezing", error, "weights are not folded (the same results, dequantized on every call)",
                 "Compile without `mxfx.frozen_weights()` to choose this without a warning.")
        return stack
    if not internals_enabled():
        return stack
    try:
        from unittest import mock

        from torch._inductor import constant_folding, freezing

        if not (callable(getattr(freezing, "constant_fold", None)) and hasattr(constant_folding, "ConstantFolder")
                and hasattr(constant_folding, "replace_node_with_constant")):
            raise AttributeError("torch._inductor.freezing.constant_fold")
        original = freezing.constant_fold

        def constant_fold(gm, constraint_fn=None):
            try:
                return _constant_fold_with_constructors(gm, constraint_fn)
            except Exception as error:  # the folder evaluates before it replaces; each replacement keeps gm valid
                degraded(_FOLD_FEATURE, error, _FOLD_FALLBACK, _INTERNALS_SWITCH)
                return original(gm, constraint_fn)

        stack.enter_context(mock.patch.object(freezing, "constant_fold", constant_fold))
    except (ImportError, AttributeError) as error:
        degraded(_FOLD_FEATURE, error, _FOLD_FALLBACK, _INTERNALS_SWITCH)
    return stack


_FOLD_FEATURE = "extending Inductor's constant folding to constructors"
_FOLD_FALLBACK = "Inductor's own folding runs, which folds packed weights only in part (the same results)"


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
