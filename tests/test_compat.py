"""The Inductor loop-split guard (mxfx._compat.guard_inductor_loop_split), on plain torch code.

mxfx's reference math is plain ATen, so it is compiled here directly, without the custom ops:
pad to whole blocks, a per-block scale, a slice back to n elements. Without the guard, torch
2.13's CPU loop split runs the output loop over n // 32 * 32 elements only.
"""

import logging
import os
import subprocess
import sys

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
def test_guard_stands_aside_when_torch_internals_break(broken, monkeypatch, fresh_dynamo, caplog):
    """A torch whose scheduler internals moved: every compile still works (the guard returns the
    original method's result) and the guard says once, in the log, that it could not check."""
    monkeypatch.setattr(_compat, "_GUARD_FAILURES", set())
    # Inductor itself uses these methods too, so they are broken where only the guard reaches them.
    if broken == "snapshot raises":
        monkeypatch.setattr(_compat, "_snapshot_loop", _raise)
    elif broken == "snapshot missing":
        monkeypatch.setattr(_compat, "_snapshot_loop", lambda node: node.snapshot_loop_state_renamed())
    else:  # only reached when a split dropped iterations: the partial-block shape below
        monkeypatch.setattr(_compat, "_restore_loop", _raise)
    with caplog.at_level(logging.WARNING, logger="mxfx._compat"):
        assert _compiled_matches_eager(torch.randn(2, 64))  # whole blocks: the split is correct
        torch._dynamo.reset()
        with inductor_config.patch(force_disable_caches=True):
            torch.compile(_scale_partial_blocks, fullgraph=True, dynamic=False)(torch.randn(3, 200))
    assert any("loop-split guard cannot inspect" in r.getMessage() for r in caplog.records)


def test_guard_version_gate_and_switch():
    decide = _compat.loop_split_guard_decision
    assert decide("2.13.0", {})[0] and decide("2.13.1+cpu", {})[0] and decide("2.14.0", {})[0]
    assert not decide("2.12.1", {})[0] and not decide("2.15.0", {})[0] and not decide("3.0.0", {})[0]
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
    from mxfx.numerics.ops import _source_digest

    digest = _source_digest()
    assert f"mxfx-{digest}" in torch.compiler.config.cache_key_tag.split("+")
    # config.patch, not pytest's monkeypatch: its undo deletes a torch config entry
    with torch.compiler.config.patch(cache_key_tag="users-own-tag"):
        mxfx._compat.tag_compile_caches(digest)
        mxfx._compat.tag_compile_caches(digest)  # idempotent
        assert torch.compiler.config.cache_key_tag == f"users-own-tag+mxfx-{digest}"
    assert f"mxfx-{digest}" in torch.compiler.config.cache_key_tag.split("+")


def test_dtype_propagation_backport_skips_rebuilds_but_sees_new_rules(monkeypatch):
    from torch._inductor import utils
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
