"""The torchmx README's nn.Sequential, with MXFP6 E3M2 weights and MXFP8 E4M3 activations,
through mxfx.prepare and torch.compile (no tensor subclasses, no module swapping)."""

import torch
from torch import nn

import mxfx

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 512)).eval()
x = torch.randn(64, 512)

config = mxfx.QuantConfig((
    mxfx.Rule(match=".*", weight=mxfx.MXSpec("fp6_e3m2"), activation=mxfx.MXSpec("fp8_e4m3")),
))  # or simply: mxfx.prepare(model, "mxfp6_weights_mxfp8_activations", (x,))
prepared = mxfx.prepare(model, config, (x,))
print(prepared.code)

compiled = torch.compile(prepared)
with torch.no_grad():
    reference, eager, fast = model(x), prepared(x), compiled(x)
sqnr = 10 * torch.log10(reference.pow(2).sum() / (reference - eager).pow(2).sum())
print(f"SQNR of the MX model vs fp32: {sqnr:.1f} dB; compiled == eager: max |diff| {(fast - eager).abs().max():.2e}")
fp_bytes = sum(m.weight.nbytes for m in model if isinstance(m, nn.Linear))
mx_bytes = sum(b.nbytes for name, b in prepared.named_buffers() if name.startswith("mxfx_w"))
print(f"linear weights: {fp_bytes} bytes fp32 -> {mx_bytes} bytes MXFP6 ({mx_bytes / fp_bytes:.3f}x)")
