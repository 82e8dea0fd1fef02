"""Quickstart: quantize and dequantize a tensor, and multiply MX operands (incl. 4-D attention)."""

import torch

import mxfx

torch.manual_seed(0)
x = torch.randn(128, 256)

# Quantize to MXFP8 E4M3 with blocks of 32 along the last axis; codes and E8M0 scales are uint8.
q = mxfx.quantize(x, "fp8_e4m3", block_size=32)
print(f"MXFP8 E4M3: codes {tuple(q.codes.shape)}, scales {tuple(q.scales.shape)}, {q.nbytes} bytes (fp32: {x.nbytes})")
x_hat = q.dequantize()
print(f"round-trip SQNR: {10 * torch.log10(x.pow(2).sum() / (x - x_hat).pow(2).sum()):.1f} dB")

# Every format, one line each
for name in mxfx.FORMATS:
    err = x - mxfx.fake_quantize(x, name)
    print(f"  {name:9s} SQNR {10 * torch.log10(x.pow(2).sum() / err.pow(2).sum()):5.1f} dB, {mxfx.quantize(x, name).nbytes:6d} bytes")

# MX matmul: a blocked along its last axis, b along its second-to-last (the reduction axis).
w = torch.randn(256, 64)
y = mxfx.matmul(mxfx.quantize(x, "fp8_e4m3"), mxfx.quantize(w, "fp6_e3m2", axis=-2))
print(f"MX matmul {tuple(y.shape)}, relative error vs fp32: {((y - x @ w).norm() / (x @ w).norm()):.4f}")

# Attention scores Q @ K^T on 4-D MX operands: both blocked along head_dim.
q4, k4 = torch.randn(2, 8, 16, 64), torch.randn(2, 8, 16, 64)
scores = mxfx.matmul(mxfx.quantize(q4, "fp8_e4m3"), mxfx.quantize(k4.transpose(-2, -1), "fp8_e4m3", axis=-2))
print(f"attention scores {tuple(scores.shape)}")

# An MX linear layer with separate weight and activation formats.
out = mxfx.linear(torch.randn(4, 256), torch.randn(32, 256), None, weight_format="fp6_e3m2", activation_format="fp8_e4m3")
print(f"MX linear output {tuple(out.shape)}")
