"""mxfx.save / mxfx.load: a saved Hugging Face model loads in a fresh process that imports only mxfx."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mxfx
from mxfx.errors import ArchiveError
from mxfx.io import pt2
from mxfx.testing.models import MLP

# A fresh process: imports mxfx only, loads the file, runs it on the saved inputs and prints what
# it got, and whether transformers was imported before the load (it must not be).
_FRESH = """
import sys
import torch
import mxfx
before = "transformers" in sys.modules
module = mxfx.load(sys.argv[1])
args, kwargs = torch.load(sys.argv[2])
with torch.no_grad():
    out = module(*args, **kwargs)
torch.save(out.last_hidden_state, sys.argv[3])
print(before, type(out).__module__ + "." + type(out).__name__)
"""


def _load_in_a_fresh_process(path, inputs, result):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", _FRESH, str(path), str(inputs), str(result)], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_a_saved_hugging_face_model_loads_in_a_fresh_process(tmp_path):
    pytest.importorskip("transformers")
    from mxfx.testing import zoo

    model, args, kwargs = zoo.bert()
    prepared = mxfx.prepare(model, "mxfp8", args, example_kwargs=kwargs)
    with torch.no_grad():
        expected = prepared(*args, **kwargs)
    assert type(expected).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    inputs = tmp_path / "inputs.pt"
    torch.save((args, kwargs), inputs)

    saved = mxfx.save(prepared, tmp_path / "bert.pt2")
    assert _load_in_a_fresh_process(saved, inputs, tmp_path / "a.pt") == \
        "False transformers.modeling_outputs.BaseModelOutputWithPoolingAndCrossAttentions"
    assert torch.equal(torch.load(tmp_path / "a.pt"), expected.last_hidden_state)

    # A file without mxfx's record (plain torch.export.save): load imports the module torch names.
    program = torch.export.export(prepared, args, kwargs=kwargs)
    torch.export.save(program, str(tmp_path / "plain.pt2"))
    assert _load_in_a_fresh_process(tmp_path / "plain.pt2", inputs, tmp_path / "b.pt").endswith(
        "BaseModelOutputWithPoolingAndCrossAttentions")
    assert torch.equal(torch.load(tmp_path / "b.pt"), expected.last_hidden_state)


def test_save_records_the_modules_of_output_classes_and_load_names_a_missing_one(tmp_path, monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    prepared = mxfx.prepare(MLP().eval(), "mxfp8", (x,))
    program = torch.export.export(prepared, (x,))
    assert pt2.pytree_modules(program) == []  # a tensor in, a tensor out: nothing to import

    monkeypatch.setattr(pt2, "pytree_modules", lambda program: ["mxfx_no_such_module"])
    path = mxfx.save(prepared, tmp_path / "mlp.pt2")
    with pytest.raises(ArchiveError, match="mxfx_no_such_module"):
        mxfx.load(path)
    monkeypatch.undo()
    path = mxfx.save(prepared, tmp_path / "mlp.pt2")
    with torch.no_grad():
        assert torch.equal(mxfx.load(path)(x), prepared(x))
