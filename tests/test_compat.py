"""mxfx._compat: the Inductor loop-split guard on plain torch code, the version gate, lazy hooks,
and every private torch API failing (each falls back to a public path with the same bits).

The loop-split guard (mxfx._compat.guard_inductor_loop_split), on plain torch code.

mxfx's reference math is plain ATen, so it is compiled here directly, without the custom ops:
pad to whole blocks, a per-block scale, a slice back to n elements. Without the guard, torch
2.13's CPU loop split runs the output loop over n // 32 * 32 elements only.
"""

import ast
import contextlib
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import bits_equal
from torch._inductor import config as inductor_config
from torch._inductor.codegen.cpp import CppScheduling

import mxfx
from mxfx import _compat
from mxfx.numerics.reference import fake_quantize_last_axis


def _scale_partial_blocks(x: torch.Tensor) -> torch.Tensor:
    return fake_quantize_last_axis(x, "fp6_e2m3", 32).contiguous()


def _compiled_matches_eager(x: torch.Tensor) -> bool:
    """Callers reset dynamo with the `fresh_dynamo` fixture; the caches are off for this compile."""
    with inductor_config.patch(force_disable_caches=True):
        compiled = torch.compile(_scale_partial_blocks, fullgraph=True, dynamic=False)(x)
    return bits_equal(compiled, _scale_partial_blocks(x))


def test_guard_is_installed_once():
    assert CppScheduling.try_loop_split._mxfx_guarded
    before = CppScheduling.try_loop_split
    mxfx._compat.guard_inductor_loop_split()
    assert CppScheduling.try_loop_split is before


@pytest.mark.parametrize("shape", [(3, 200), (3, 48, 40), (2, 64)])
def test_guarded_loop_split_covers_the_partial_block(shape, fresh_dynamo):
    assert _compiled_matches_eager(torch.randn(shape))


@pytest.mark.xfail(strict=True, reason="torch 2.13's unguarded CPU loop split drops the partial block")
def test_unguarded_loop_split_covers_the_partial_block(monkeypatch, fresh_dynamo):
    """Upstream-bug canary: XPASS (a strict failure) once torch fixes the split; then the guard can go."""
    monkeypatch.setattr(CppScheduling, "try_loop_split", CppScheduling.try_loop_split.__wrapped__)
    assert _compiled_matches_eager(torch.randn(3, 200))


def _raise(*args, **kwargs):
    raise RuntimeError("renamed in a later torch")


@pytest.mark.parametrize("broken", ["snapshot raises", "snapshot missing", "restore raises"])
def test_guard_stands_aside_when_torch_internals_break(broken, monkeypatch, fresh_dynamo):
    """A torch whose scheduler internals moved: every compile still works (the guard returns the
    original method's result) and the guard says once, in an MXFXWarning, that it could not check."""
    monkeypatch.setattr(_compat, "_BROKEN", set())
    # Inductor itself uses these methods too, so they are broken where only the guard reaches them.
    if broken == "snapshot raises":
        monkeypatch.setattr(_compat, "_snapshot_loop", _raise)
    elif broken == "snapshot missing":
        monkeypatch.setattr(_compat, "_snapshot_loop", lambda node: node.snapshot_loop_state_renamed())
    else:  # only reached when a split dropped iterations: the partial-block shape below
        monkeypatch.setattr(_compat, "_restore_loop", _raise)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _compiled_matches_eager(torch.randn(2, 64))  # whole blocks: the split is correct
        torch._dynamo.reset()
        with inductor_config.patch(force_disable_caches=True):
            torch.compile(_scale_partial_blocks, fullgraph=True, dynamic=False)(torch.randn(3, 200))
    _one_warning(caught, "loop-split guard", _compat.LOOP_SPLIT_GUARD_ENV)


def test_guard_version_gate_and_switch():
    decide = _compat.loop_split_guard_decision
    assert decide("2.13.0", {})[0] and decide("2.13.1+cpu", {})[0] and decide("2.14.0", {})[0]
    assert not decide("2.12.1", {})[0] and not decide("2.15.0", {})[0] and not decide("3.0.0", {})[0]
    assert decide("2.15.0", {_compat.INTERNALS_ENV: "1"})[0]  # the hooks forced on: the guard too
    assert not decide("2.13.0", {_compat.INTERNALS_ENV: "0"})[0]
    for off in ("0", "false", "OFF", "no"):
        installed, why = decide("2.13.0", {_compat.LOOP_SPLIT_GUARD_ENV: off})
        assert not installed and _compat.LOOP_SPLIT_GUARD_ENV in why
    assert decide("2.13.0", {_compat.LOOP_SPLIT_GUARD_ENV: "1"})[0]


def test_environment_switch_turns_the_guard_off():
    code = ("import mxfx; from torch._inductor.codegen.cpp import CppScheduling; "
            "print(getattr(CppScheduling.try_loop_split, '_mxfx_guarded', False))")
    env = {**os.environ, _compat.LOOP_SPLIT_GUARD_ENV: "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    assert CppScheduling.try_loop_split._mxfx_guarded  # this process: on by default


def test_compile_caches_are_keyed_on_the_mx_sources():
    import torch._inductor.decomposition  # noqa: F401  (the tag is set when Inductor's table is imported)

    from mxfx.numerics.ops import _DIGEST as digest  # _source_digest() of the sources imported

    assert f"mxfx-{digest}" in torch.compiler.config.cache_key_tag.split("+")
    # config.patch, not pytest's monkeypatch: its undo deletes a torch config entry
    with torch.compiler.config.patch(cache_key_tag="users-own-tag"):
        mxfx._compat.tag_compile_caches(digest)
        mxfx._compat.tag_compile_caches(digest)  # idempotent
        assert torch.compiler.config.cache_key_tag == f"users-own-tag+mxfx-{digest}"
    assert f"mxfx-{digest}" in torch.compiler.config.cache_key_tag.split("+")


def test_dtype_propagation_backport_skips_rebuilds_but_sees_new_rules(monkeypatch):
    from torch._inductor import lowering, utils  # noqa: F401  (lowering registers the op rules the handler needs)
    from torch._inductor.dtype_propagation import DtypePropagationOpsHandler

    assert _compat.backport_dtype_propagation_init()  # installed at import; idempotent
    handler = DtypePropagationOpsHandler()
    sentinel = object()
    monkeypatch.setattr(handler, "add", sentinel)
    assert DtypePropagationOpsHandler() is handler and handler.add is sentinel  # not rebuilt: rules unchanged
    rule = next(iter(utils.op_dtype_propagation_rules.values()))
    monkeypatch.setitem(utils.op_dtype_propagation_rules, "mxfx_late_rule", rule)
    DtypePropagationOpsHandler()
    assert hasattr(handler, "mxfx_late_rule") and handler.add is not sentinel  # a late rule: rebuilt
    monkeypatch.undo()
    DtypePropagationOpsHandler()  # rebuilt without the test's rule


def _one_warning(caught, *words) -> None:
    """Exactly one MXFXWarning among `caught`, naming the torch version and each of `words`."""
    messages = [str(w.message) for w in caught if issubclass(w.category, mxfx.MXFXWarning)]
    assert len(messages) == 1, messages
    assert torch.__version__ in messages[0] and all(word in messages[0] for word in words), messages[0]


# --- lazy hooks: `import mxfx` loads no Inductor code --------------------------------------------

_LAZY_PROBE = """
import sys
import mxfx
from mxfx import _compat
pending = _compat.inductor_hooks_pending()
import lazymod
import torch._inductor.decomposition as decomposition, torch._inductor.lowering, torch._inductor.codegen.cpp as cpp
import torch._inductor.dtype_propagation as dtype_propagation, torch
hadamard = torch.ops.mxfx.hadamard.default
print(pending)
print(torch.ops.mxfx.fake_quantize.default in decomposition.decompositions, _compat.has_inductor_lowering(hadamard),
      cpp.CppScheduling.try_loop_split._mxfx_guarded, dtype_propagation.DtypePropagationOpsHandler.__init__._mxfx_backport,
      torch.compiler.config.cache_key_tag.startswith("mxfx-"), _compat.inductor_hooks_pending(),
      _compat._FINDER in sys.meta_path, getattr(lazymod.first_call, "_torchdynamo_disable", False))
"""


def test_import_loads_no_inductor_and_the_hooks_wait_for_it(tmp_path):
    """`import mxfx` imports no torch._inductor or torch._dynamo module (python -X importtime); the
    hooks are installed as soon as the Inductor modules they change are imported."""
    (tmp_path / "lazymod.py").write_text("from mxfx import _compat\n\n\n@_compat.compiler_disable\n"
                                         "def first_call(x):\n    return x\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for name in (_compat.INTERNALS_ENV, _compat.LOOP_SPLIT_GUARD_ENV, _compat.DTYPE_BACKPORT_ENV, _compat.CACHE_TAG_ENV,
                 "TORCH_COMPILE_CACHE_KEY_TAG"):
        env.pop(name, None)
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", _LAZY_PROBE], env=env, capture_output=True,
                         text=True, check=True)
    lines = out.stderr.splitlines()
    end = next(i for i, line in enumerate(lines) if line.endswith("| mxfx"))  # the line `import mxfx` ends with
    loaded = [line.rsplit("|", 1)[-1].strip() for line in lines[: end + 1] if line.startswith("import time:")]
    assert "torch" in loaded and "mxfx.numerics.ops" in loaded
    assert not [m for m in loaded if m.startswith(("torch._inductor", "torch._dynamo"))]
    pending, installed = out.stdout.strip().splitlines()
    assert {"torch._dynamo", "torch._inductor.codegen.cpp", "torch._inductor.decomposition",
            "torch._inductor.dtype_propagation", "torch._inductor.lowering"} <= set(eval(pending))
    assert installed == "True True True True True [] False True"


# --- the version gate ------------------------------------------------------------------------------


def test_internals_decision():
    decide = _compat.internals_decision
    assert decide("2.13.0+cpu", {})[0] and decide("2.14.1", {})[0]
    for newer in ("2.15.0", "2.16.0.dev20270101", "3.0.0"):
        on, why = decide(newer, {})
        assert not on and newer.split(".dev")[0] in why and "2.13, 2.14" in why
    assert not decide("2.12.1", {})[0]
    assert decide("2.15.0", {_compat.INTERNALS_ENV: "1"})[0] and decide("2.15.0", {_compat.INTERNALS_ENV: "yes"})[0]
    on, why = decide("2.13.0", {_compat.INTERNALS_ENV: "0"})
    assert not on and _compat.INTERNALS_ENV in why


def _all_ops(x, w_codes, w_scales):
    """Every mxfx op, partial blocks included (x: (..., 40), blocks of 32)."""
    fq = torch.ops.mxfx.fake_quantize(x, "fp6_e2m3", 32, -1, "floor", "even", 0, False)
    codes, scales = torch.ops.mxfx.quantize(x, "fp4_e2m1", 32, -1, "floor", "even", 0, False)
    dq = torch.ops.mxfx.dequantize(codes, scales, "fp4_e2m1", 32, -1, list(x.shape), x.dtype)
    lin = torch.ops.mxfx.linear(x, w_codes, w_scales, None, "fp6_e3m2", 32, 40, "fp8_e4m3", 32, "floor", "even")
    mm = torch.ops.mxfx.matmul(codes, scales, "fp4_e2m1", 32, codes, scales, "fp4_e2m1", 32, 40, x.dtype)
    rot = torch.ops.mxfx.hadamard(x[..., :32], 32, -1)
    return fq, dq, lin, mm, rot


def _all_ops_inputs():
    torch.manual_seed(0)
    w_codes, w_scales = torch.ops.mxfx.quantize(torch.randn(8, 40), "fp6_e3m2", 32, -1, "floor", "even", 0, False)
    return torch.randn(6, 40), w_codes, w_scales


def _compiled_equals_eager(fn=_all_ops, inputs=None) -> bool:
    inputs = _all_ops_inputs() if inputs is None else inputs
    torch._dynamo.reset()
    with inductor_config.patch(force_disable_caches=True):
        compiled = torch.compile(fn, fullgraph=True, dynamic=False)(*inputs)
    return all(bits_equal(a, b) for a, b in zip(compiled, fn(*inputs), strict=True))


_UNTESTED_TORCH = """
import warnings, sys, torch
from torch.torch_version import TorchVersion
torch.__version__ = TorchVersion("2.15.0")
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import mxfx
    from mxfx import _compat
    sys.path.insert(0, {tests!r})
    from test_compat import _compiled_equals_eager
    import torch._inductor.decomposition as decomposition, torch._inductor.codegen.cpp as cpp
    print(_compiled_equals_eager())
print([str(w.message) for w in caught if issubclass(w.category, mxfx.MXFXWarning)])
print(any(op.namespace == "mxfx" for op in decomposition.decompositions if hasattr(op, "namespace")),
      hasattr(cpp.CppScheduling.try_loop_split, "_mxfx_guarded"), torch.compiler.config.cache_key_tag,
      _compat.inductor_hooks_pending(), _compat._FINDER in sys.meta_path)
"""


@pytest.mark.slow
def test_an_untested_torch_runs_public_paths_with_one_warning():
    """torch 2.15 (its version string patched in a fresh process): one MXFXWarning at import, no
    hook in torch (no decomposition, guard, tag or import finder), and a compile of every mxfx op
    equals eager bit for bit (Inductor calls the ops' eager kernels)."""
    code = _UNTESTED_TORCH.format(tests=os.path.dirname(__file__))
    env = {k: v for k, v in os.environ.items() if k not in (_compat.INTERNALS_ENV, "TORCH_COMPILE_CACHE_KEY_TAG")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    equal, warned, hooks = out.stdout.strip().splitlines()[-3:]
    assert equal == "True"
    messages = eval(warned)
    assert len(messages) == 1 and "2.15.0" in messages[0] and _compat.INTERNALS_ENV in messages[0], messages
    assert hooks == "False False  [] False"


# --- each private API failing: one warning, the public path, the same bits ---------------------


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each feature warns once per process: forget which have failed (restored afterwards)."""
    monkeypatch.setattr(_compat, "_BROKEN", set())


def _renamed(*args, **kwargs):
    raise AttributeError("renamed in a later torch")


def test_decompositions_that_cannot_be_registered_leave_the_eager_kernels(monkeypatch, fresh_warnings, fresh_dynamo):
    from torch._inductor import decomposition

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with monkeypatch.context() as m:
            m.delattr(decomposition, "register_decomposition")
            _compat.register_inductor_decomposition(torch.ops.mxfx.fake_quantize.default, lambda *a: None)
    _one_warning(caught, "decompositions", _compat.INTERNALS_ENV)
    # the fallback: Inductor without the mxfx decompositions (as after a failed registration)
    try:
        with monkeypatch.context() as m:
            for op in [op for op in decomposition.decompositions if getattr(op, "namespace", None) == "mxfx"]:
                m.delitem(decomposition.decompositions, op)
            decomposition.fast_random_decomps.cache_clear()
            assert _compiled_equals_eager()
    finally:
        decomposition.fast_random_decomps.cache_clear()


def test_hadamard_lowering_failure_traces_the_butterfly(monkeypatch, fresh_warnings, fresh_dynamo):
    from torch._inductor import lowering

    op = torch.ops.mxfx.hadamard.default
    monkeypatch.setattr(_compat, "_LOWERED", set())  # as on a torch where the registration failed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with monkeypatch.context() as m:
            m.delattr(lowering, "register_lowering")
            _compat.register_hadamard_lowering(op)
    _one_warning(caught, "mxfx::hadamard", _compat.INTERNALS_ENV)
    assert not _compat.has_inductor_lowering(op)
    x = torch.randn(5, 64)
    assert _compiled_equals_eager(lambda t: (torch.ops.mxfx.hadamard(t, 32, -1),), (x,))


@pytest.fixture
def restore_lowerings():
    """Put Inductor's lowerings of the mxfx ops back as they were (a test's compile adds fallbacks)."""
    from torch._inductor import lowering

    before = {op: fn for op, fn in lowering.lowerings.items() if getattr(op, "namespace", None) == "mxfx"}
    yield
    for op in [op for op in lowering.lowerings if getattr(op, "namespace", None) == "mxfx"]:
        del lowering.lowerings[op]
    lowering.lowerings.update(before)


@pytest.mark.parametrize("broken", ["realize lowering", "deduplicated fallback"])
def test_lowering_failures_leave_inductors_fallback_kernels(broken, restore_lowerings, monkeypatch, fresh_warnings,
                                                            fresh_dynamo):
    from torch._inductor import lowering

    if broken == "realize lowering":
        monkeypatch.setattr(_compat, "_register_realize_lowering", _renamed)
        monkeypatch.delitem(lowering.lowerings, torch.ops.mxfx.realize.default, raising=False)
        context = mxfx.fused_kernels()  # the inlined decompositions realize their inputs
    else:
        monkeypatch.setattr(_compat, "_register_deduplicated_fallback", _renamed)
        for op in (torch.ops.mxfx.shared_fake_quantize, torch.ops.mxfx.shared_quantize,
                   torch.ops.mxfx.shared_dequantize, torch.ops.mxfx.shared_attention):
            monkeypatch.delitem(lowering.lowerings, op.default, raising=False)
        context = contextlib.nullcontext()
    x, w_codes, w_scales = _all_ops_inputs()

    def twice(t):  # two identical quantizer calls on one buffer: what deduplication merges
        return _all_ops(t, w_codes, w_scales) + _all_ops(t, w_codes, w_scales)

    with warnings.catch_warnings(record=True) as caught, context:
        warnings.simplefilter("always")
        assert _compiled_equals_eager(twice, (x,))
    _one_warning(caught, "realize" if broken == "realize lowering" else "deduplicated", _compat.INTERNALS_ENV)


def test_a_shared_kernel_build_failure_runs_eager_math_then_inlines(monkeypatch, fresh_warnings, fresh_dynamo):
    from mxfx.numerics import kernels

    monkeypatch.setattr(kernels, "_KERNELS", {})
    monkeypatch.setattr(_compat, "compile_rows_kernel", _renamed)
    monkeypatch.setenv("MXFX_NATIVE_KERNELS", "0")  # the Inductor-built shared kernels (test_native: the C ones)
    assert _compat.shared_kernels_enabled()
    inputs = _all_ops_inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # compiled with shared-kernel calls; the first call cannot build them: eager math, same bits
        assert _compiled_equals_eager(inputs=inputs)
    _one_warning(caught, "shared mxfx kernel", _compat.SHARED_KERNELS_ENV)
    assert not _compat.shared_kernels_enabled()
    torch._dynamo.reset()
    with inductor_config.patch(force_disable_caches=True):
        _, code = _compat.run_and_get_code(torch.compile(_all_ops, fullgraph=True, dynamic=False), *inputs)
    assert "shared_" not in "\n".join(code)  # later compiles inline the ops


def test_the_shared_kernel_switch_inlines(monkeypatch, fresh_dynamo):
    from mxfx.numerics import kernels

    monkeypatch.setenv(_compat.SHARED_KERNELS_ENV, "0")
    monkeypatch.setattr(kernels, "_KERNELS", {})
    inputs = _all_ops_inputs()
    with inductor_config.patch(force_disable_caches=True):
        out, code = _compat.run_and_get_code(torch.compile(_all_ops, fullgraph=True, dynamic=False), *inputs)
    assert "shared_" not in "\n".join(code) and not kernels._KERNELS
    assert all(bits_equal(a, b) for a, b in zip(out, _all_ops(*inputs), strict=True))


def test_process_wide_changes_that_fail_warn_once(monkeypatch, fresh_warnings):
    from torch._inductor import decomposition, dtype_propagation

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with monkeypatch.context() as m:
            m.delattr(dtype_propagation, "DtypePropagationOpsHandler")
            _compat.backport_dtype_propagation_init()
            _compat.backport_dtype_propagation_init()
    _one_warning(caught, "dtype-propagation", _compat.DTYPE_BACKPORT_ENV)
    # the cache-key tag: where it cannot be set, the mxfx decompositions are taken out again
    table = dict(decomposition.decompositions)
    assert torch.ops.mxfx.fake_quantize.default in table
    try:
        with warnings.catch_warnings(record=True) as caught, monkeypatch.context() as m:
            warnings.simplefilter("always")
            m.setattr(decomposition, "decompositions", table)
            m.setattr(_compat, "tag_compile_caches", _renamed)
            _compat.tag_compile_caches_on_compile(lambda: "digest")
            _compat.register_inductor_decomposition(torch.ops.mxfx.fake_quantize.default, lambda *a: None)
            assert not [op for op in table if getattr(op, "namespace", None) == "mxfx"]
        _one_warning(caught, "cache keys", _compat.CACHE_TAG_ENV)
    finally:
        decomposition.fast_random_decomps.cache_clear()


def test_process_wide_switches(monkeypatch):
    for env, install in ((_compat.DTYPE_BACKPORT_ENV, _compat.backport_dtype_propagation_init),
                         (_compat.CACHE_TAG_ENV, lambda: _compat.tag_compile_caches_on_compile(lambda: "x")),
                         (_compat.LOOP_SPLIT_GUARD_ENV, _compat.guard_inductor_loop_split)):
        monkeypatch.setenv(env, "0")
        assert not install()
    monkeypatch.setattr(_compat, "_INTERNALS", (False, "turned off by the test"))
    assert not _compat.backport_dtype_propagation_init() and not _compat.register_hadamard_lowering(
        torch.ops.mxfx.hadamard.default)


def test_freezing_fold_failure_uses_inductors_own(monkeypatch, fresh_warnings, fresh_dynamo):
    monkeypatch.setattr(_compat, "_constant_fold_with_constructors", _renamed)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32)).eval()
    x = torch.randn(4, 64)
    prepared = mxfx.prepare(model, "mxfp6_weights_mxfp8_activations", (x,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compiled = torch.compile(prepared)
        with inductor_config.patch(force_disable_caches=True), mxfx.frozen_weights():
            frozen = compiled(x)
    _one_warning(caught, "constant folding", _compat.INTERNALS_ENV)
    with torch.no_grad():
        torch.testing.assert_close(frozen, prepared(x), rtol=1e-5, atol=1e-5)  # a frozen GEMM may round otherwise


def test_readers_fall_back_to_public_answers(monkeypatch, fresh_warnings):
    from torch._inductor import virtualized
    from torch.fx.experimental import _config
    from torch.utils import _pytree

    tree = ((torch.ones(1), [2, {"b": torch.zeros(2), "a": None}]), {"k": (3,)})
    expected = _pytree.tree_leaves(tree)
    with warnings.catch_warnings(record=True) as caught, monkeypatch.context() as m:
        warnings.simplefilter("always")
        m.delattr(_pytree, "tree_leaves")
        leaves = _compat.tree_leaves(tree)
    assert len(leaves) == len(expected) and all(a is b for a, b in zip(leaves, expected, strict=True))
    _one_warning(caught, "tree_leaves")

    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fakes = [torch.empty(2), torch.empty(3)]
    with warnings.catch_warnings(record=True) as caught, monkeypatch.context() as m:
        warnings.simplefilter("always")
        m.setattr("torch._guards.detect_fake_mode", _renamed)
        assert _compat.detect_fake_mode(fakes) is mode and _compat.detect_fake_mode([torch.ones(1)]) is None
    _one_warning(caught, "detect_fake_mode")

    with warnings.catch_warnings(record=True) as caught, monkeypatch.context() as m:
        warnings.simplefilter("always")
        m.setattr(type(_config), "patch", _renamed)
        with _compat.size_oblivious_export():
            pass
        m.delattr(type(virtualized.V), "aot_compilation")
        assert _compat.inductor_runs_python_fallbacks() is False
    assert sum("size-oblivious" in str(w.message) for w in caught) == 1
    assert sum("compile mode" in str(w.message) for w in caught) == 1

    with warnings.catch_warnings(record=True) as caught, monkeypatch.context() as m:
        warnings.simplefilter("always")
        m.setattr(type(inductor_config), "get_config_copy", lambda self: {"fallback_random": True})
        assert _compat.eager_numerics() == {"fallback_random": True}
    _one_warning(caught, "emulate_precision_casts")


# --- the rule: private torch names only in mxfx/_compat.py; numpy nowhere ------------------------

# torch._ops.OpOverload is the type of every `torch.ops.ns.op.overload` (isinstance checks and
# annotations); gguf's writer takes numpy arrays (the gguf package, an extra, depends on numpy).
_ALLOWED = {"torch._ops", "torch._ops.OpOverload"}
_NUMPY_ALLOWED = {"mxfx/io/gguf.py"}


def _dotted(node) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def _private_torch(name: str) -> bool:
    parts = name.split(".")
    return (parts[0] == "torch" and parts[1:2] != ["ops"] and name not in _ALLOWED
            and any(p.startswith("_") and not p.startswith("__") for p in parts[1:]))


def test_private_torch_names_only_in_compat_and_no_numpy():
    root = Path(__file__).resolve().parent.parent
    found = []
    for path in sorted([*root.glob("mxfx/**/*.py"), *root.glob("passes/**/*.py")]):
        name = path.relative_to(root).as_posix()
        if name == "mxfx/_compat.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            used = []
            if isinstance(node, ast.Import):
                used = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                used = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Attribute):
                used = [d for d in [_dotted(node)] if d]
            for dotted in used:
                if _private_torch(dotted) or (dotted.split(".")[0] == "numpy" and name not in _NUMPY_ALLOWED):
                    found.append(f"{name}:{node.lineno}: {dotted}")
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "numpy"
                    and name not in _NUMPY_ALLOWED):
                found.append(f"{name}:{node.lineno}: .numpy()")
    assert not found, "private torch names belong in mxfx/_compat.py, numpy nowhere:\n" + "\n".join(sorted(set(found)))
