"""The Inductor loop-split guard (mxfx._compat.guard_inductor_loop_split), on plain torch code.

mxfx's reference math is plain ATen, so it is compiled here directly, without the custom ops:
pad to whole blocks, a per-block scale, a slice back to n elements. Without the guard, torch
2.13's CPU loop split runs the output loop over n // 32 * 32 elements only.
"""

import pytest
import torch
from conftest import bits_equal
from torch._inductor import config as inductor_config
from torch._inductor.codegen.cpp import CppScheduling

import mxfx
from mxfx.numerics import fake_quantize_last_axis


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


def test_unguarded_loop_split_still_drops_the_tail(monkeypatch, fresh_dynamo):
    """Fails once torch fixes the bug upstream: then the guard can go (see _compat)."""
    monkeypatch.setattr(CppScheduling, "try_loop_split", CppScheduling.try_loop_split.__wrapped__)
    assert not _compiled_matches_eager(torch.randn(3, 200))


def test_compile_caches_are_keyed_on_the_mx_sources():
    from mxfx.ops import _source_digest

    digest = _source_digest()
    assert f"mxfx-{digest}" in torch.compiler.config.cache_key_tag.split("+")
    # config.patch, not pytest's monkeypatch: its undo deletes a torch config entry
    with torch.compiler.config.patch(cache_key_tag="users-own-tag"):
        mxfx._compat.tag_compile_caches(digest)
        mxfx._compat.tag_compile_caches(digest)  # idempotent
        assert torch.compiler.config.cache_key_tag == f"users-own-tag+mxfx-{digest}"
    assert f"mxfx-{digest}" in torch.compiler.config.cache_key_tag.split("+")
