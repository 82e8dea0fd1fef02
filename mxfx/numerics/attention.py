"""The fused MX attention op `mxfx::attention` and its reference math.

`scaled_dot_product_attention` rewritten into MX-quantized math (OCP MX v1.0 §6.2 dot products):

    Q, K  quantized along head_dim            (the reduction axis of Q @ K^T)
    S  = (Q @ K^T) in fp32, times the softmax scale (not folded into Q: that would change rounding)
    S += mask (or -inf where a boolean mask / is_causal excludes a key)
    P  = softmax(S) in fp32, quantized along the key axis   (the reduction axis of P @ V)
    V  quantized along the sequence axis
    O  = P @ V in fp32, returned in Q's dtype

Operands are quantized exactly as SDPA receives them, after grouped-query head repetition. Each
operand spec is a string "format/block_size/scale_mode/rounding" or "" (high precision). With all
four empty the op is plain fp32 SDPA math. Inference only (no autograd formula).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mxfx.numerics.native import fake_quantize_last_axis
from mxfx.numerics.spec import MXSpec


def quantize_operand(x: Tensor, spec: str, axis: int = -1, hint=None, quantizer=None) -> Tensor:
    """x in fp32, fake-quantized along `axis` when `spec` (`MXSpec.to_arg()`, "" for none) is set.
    `hint`: see `mxfx.numerics.ops._realizing` (Inductor only; applied to the operand and its block scales).
    `quantizer(x, spec, axis)`, if given, fake-quantizes the fp32 operand instead of the math
    inlined here (`mxfx.kernels` passes its shared kernel)."""
    x = x.to(torch.float32)
    parsed = MXSpec.from_arg(spec)
    if parsed is None:
        return x
    if quantizer is not None:
        return quantizer(x, parsed, axis)
    moved = (x if hint is None else hint(x)).movedim(axis, -1)
    return fake_quantize_last_axis(moved, parsed.format, parsed.block_size, parsed.scale_mode,
                                   parsed.rounding, hint=hint).movedim(-1, axis)


def attention_reference(
    query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, is_causal: bool,
    scale: float | None, enable_gqa: bool, query_spec: str, key_spec: str, value_spec: str, probs_spec: str,
    hint=None, quantizer=None,
) -> Tensor:
    """SDPA semantics (dropout 0) with MX quantization of Q, K, V and the softmax output P
    (`hint`, `quantizer`: see `quantize_operand`)."""
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeat, dim=-3)
        value = value.repeat_interleave(repeat, dim=-3)
    q = quantize_operand(query, query_spec, -1, hint, quantizer)
    k = quantize_operand(key, key_spec, -1, hint, quantizer)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    length, source = query.shape[-2], key.shape[-2]
    if is_causal:
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.to(torch.float32)
    probs = quantize_operand(torch.softmax(scores, dim=-1), probs_spec, -1, hint, quantizer)
    v = quantize_operand(value, value_spec, -2, hint, quantizer)
    return sdpa_layout(torch.matmul(probs, v).to(query.dtype))


def sdpa_layout(out: Tensor) -> Tensor:
    """`out` with the strides ATen's CPU SDPA gives a 4-D output, (B, L, H, E) in memory, so that
    graphs traced against SDPA (a `transpose(1, 2).view(...)` with no copy) stay valid."""
    if out.dim() != 4:
        return out.contiguous()
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@torch.library.custom_op("mxfx::attention", mutates_args=())
def attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
    query_spec: str,
    key_spec: str,
    value_spec: str,
    probs_spec: str,
) -> Tensor:
    """scaled_dot_product_attention with MX-quantized Q, K, V and P (see the module docstring)."""
    return attention_reference(query, key, value, attn_mask, is_causal, scale, enable_gqa,
                               query_spec, key_spec, value_spec, probs_spec)


@attention.register_fake
def _(query, key, value, attn_mask, is_causal, scale, enable_gqa, query_spec, key_spec, value_spec, probs_spec):
    return sdpa_layout(query.new_empty((*query.shape[:-1], value.shape[-1])))


# Registered by mxfx.numerics.ops, which gives it the realize hint (`_realizing`).
