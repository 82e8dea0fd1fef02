"""Quantize a small nanoGPT-style model, look at it, save it as .pt2, load it back."""

import tempfile
from pathlib import Path

import torch

import mxfx
from mxfx.testing.models import NanoGPT

torch.manual_seed(0)
model, idx = NanoGPT(n_layer=2), torch.randint(0, 256, (2, 16))
prepared = mxfx.prepare(model, "llm_mxfp8", (idx,))
print(mxfx.summary(prepared).table(), "\n")
print(mxfx.graph_text(prepared), "\n")
with tempfile.TemporaryDirectory() as folder:
    path = mxfx.save(prepared, Path(folder) / "nanogpt_mxfp8.pt2")
    loaded = mxfx.load(path)
    same = torch.equal(loaded(idx), prepared(idx))
    print(f"saved {path.stat().st_size} bytes; loaded module equals the prepared one bitwise: {same}")
    try:
        print(f"drew {mxfx.draw(loaded, Path(folder) / 'graph.svg')}")
    except mxfx.MXFXError as error:
        print(f"no picture: {error}")
