"""Independent references for the zoo tests, written without mxfx's code:

- `e4m3_fake_quantize`: MXFP8 E4M3 quantize -> dequantize (OCP MX v1.0 §5.3, §6.3) through torch's
  own `float8_e4m3fn` cast (round to nearest even) after clamping to the largest normal (448),
  with the E8M0 scale 2^(floor(log2(amax)) - emax_elem) from `torch.frexp`;
- graph counts of linear-like products and attention softmaxes in a plain `torch.export` graph;
- forward hooks that recompute every nn.Linear / GPT-2 Conv1D / nn.MultiheadAttention with
  quantized inputs and weights.
"""

from __future__ import annotations

import contextlib
import operator

import torch
import torch.nn.functional as F

E4M3_MAX, E4M3_EMAX, BLOCK = 448.0, 8, 32
aten = torch.ops.aten


def e4m3_fake_quantize(x: torch.Tensor, axis: int = -1) -> torch.Tensor:
    """MXFP8 E4M3, blocks of 32 along `axis` (a short last block is its own block), in fp32."""
    moved = x.detach().float().movedim(axis, -1)
    n = moved.shape[-1]
    padded = F.pad(moved, (0, -n % BLOCK))
    blocks = padded.reshape(*padded.shape[:-1], -1, BLOCK)
    amax = blocks.abs().amax(-1, keepdim=True)
    _, exponent = torch.frexp(amax)  # amax = m * 2^exponent, 0.5 <= m < 1: floor(log2 amax) = exponent - 1
    scale_exp = (exponent - 1 - E4M3_EMAX).clamp(-127, 127)
    scale = torch.ldexp(torch.ones_like(amax), scale_exp)
    scaled = (blocks / scale).clamp(-E4M3_MAX, E4M3_MAX)
    out = scaled.to(torch.float8_e4m3fn).float() * scale
    return out.reshape(padded.shape)[..., :n].movedim(-1, axis).to(x.dtype)


# ---- graph counts on a plain torch.export graph ------------------------------------------------

PRODUCT_OPS = {aten.linear.default, aten.addmm.default, aten.mm.default, aten.matmul.default, aten.bmm.default,
               aten.baddbmm.default, aten.einsum.default}
SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
SDPA_OPS = {aten.scaled_dot_product_attention.default}
# ops through which a parameter is still "the parameter" (transposed, sliced, reshaped, cast)
_PARAM_VIEWS = {aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default, aten.reshape.default,
                aten.slice.Tensor, aten.select.int, aten.narrow.default, aten.expand.default, aten.unsqueeze.default,
                aten.contiguous.default, aten.clone.default, aten.detach.default, aten.alias.default,
                aten._to_copy.default, aten.to.dtype, aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default,
                aten.unbind.int}


def _tensor_args(node):
    for arg in node.args:
        for item in arg if isinstance(arg, (list, tuple)) else (arg,):
            if isinstance(item, torch.fx.Node):
                yield item


def from_parameter(node) -> bool:
    while isinstance(node, torch.fx.Node):
        if node.op == "get_attr":
            return True
        if node.op == "call_function" and node.target is operator.getitem:
            node = node.args[0]
            continue
        if node.op != "call_function" or node.target not in _PARAM_VIEWS:
            return False
        node = node.args[0]
    return False


def linear_product_count(gm: torch.fx.GraphModule) -> int:
    """Products (linear, addmm, mm, matmul, bmm, baddbmm, einsum) with a parameter operand."""
    return sum(1 for n in gm.graph.nodes
               if n.op == "call_function" and n.target in PRODUCT_OPS and any(map(from_parameter, _tensor_args(n))))


def _first_products(node):
    """The products met first walking back from `node` through any other op."""
    found, seen, stack = [], set(), [node]
    while stack:
        current = stack.pop()
        if current in seen or not isinstance(current, torch.fx.Node):
            continue
        seen.add(current)
        if current.op == "call_function" and current.target in PRODUCT_OPS:
            found.append(current)
        elif current.op == "call_function":
            stack.extend(_tensor_args(current))
    return found


def attention_softmaxes(gm: torch.fx.GraphModule) -> list[str]:
    """Softmax nodes over the last axis whose input comes from a product of two activations."""
    names = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in SOFTMAX_OPS:
            continue
        ndim = n.args[0].meta["val"].dim()
        if n.args[1] % ndim != ndim - 1:
            continue
        if any(not any(map(from_parameter, _tensor_args(p))) for p in _first_products(n.args[0])):
            names.append(n.name)
    return names


def sdpa_calls(gm: torch.fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in SDPA_OPS]


# ---- hook-based reference: every linear-like layer with quantized input and weight -------------

def _linear(x, weight, bias):
    return F.linear(e4m3_fake_quantize(x), e4m3_fake_quantize(weight), bias)


def _mha(module: torch.nn.MultiheadAttention, args, kwargs):
    query, key, value = (kwargs.get(k, args[i] if i < len(args) else None) for i, k in enumerate(("query", "key", "value")))
    if not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    e, heads = module.embed_dim, module.num_heads
    w, b = module.in_proj_weight, module.in_proj_bias
    q, k, v = (_linear(t, w[i * e:(i + 1) * e], b[i * e:(i + 1) * e]) for i, t in enumerate((query, key, value)))
    q, k, v = (t.unflatten(-1, (heads, e // heads)).transpose(1, 2) for t in (q, k, v))
    mask, causal = kwargs.get("attn_mask"), bool(kwargs.get("is_causal", False))
    if kwargs.get("key_padding_mask") is not None:
        raise NotImplementedError("key_padding_mask in the reference")
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
    out = _linear(out.transpose(1, 2).flatten(-2), module.out_proj.weight, module.out_proj.bias)
    return out if module.batch_first else out.transpose(0, 1)


@contextlib.contextmanager
def quantized_linears(model: torch.nn.Module):
    """Within the context, every nn.Linear, GPT-2 Conv1D and nn.MultiheadAttention of `model`
    returns the output recomputed from E4M3-quantized inputs and weights (blocked along
    in_features); the attention math itself stays in high precision."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover
        Conv1D = ()

    def linear_hook(module, args, output):
        return _linear(args[0], module.weight, module.bias)

    def conv1d_hook(module, args, output):  # y = x @ W + b, W of shape (in, out)
        return _linear(args[0], module.weight.t(), module.bias)

    def mha_hook(module, args, kwargs, output):
        return _mha(module, args, kwargs), None

    handles = []
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            handles.append(module.register_forward_hook(mha_hook, with_kwargs=True))
        elif isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
        elif Conv1D and isinstance(module, Conv1D):
            handles.append(module.register_forward_hook(conv1d_hook))
    try:
        # grad mode on: nn.TransformerEncoderLayer / MultiheadAttention then take their Python path
        # (their fused inference fast path would bypass the hooks)
        with torch.enable_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()
