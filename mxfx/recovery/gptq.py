"""GPTQ for MX weights: column-by-column error feedback through the layer's input Hessian.

GPTQ (Frantar et al., 2022; IST-DASLab `gptq`, `GPTQ.fasterquant`) quantizes a linear layer's
weight W (out, in) one input column at a time and spreads each column's rounding error over the
columns not yet quantized, weighted by the inverse of H = 2 X^T X (X: the layer's inputs, one row
per token), which minimizes the layer's output error ||X W^T - X Q^T||^2 greedily:

    H += damp * mean(diag H) * I;  U = chol(H^-1)^T (upper)
    for each column i:  q_i = Q(w_i);  e = (w_i - q_i) / U_ii;  w_j -= e * U_ij  (j > i)

with the updates to later columns applied lazily in batches of 128 columns (the paper's §"Lazy
Batch-Updates"). Here Q is the MX grid: every block of `block_size` consecutive in_features of a
row shares one E8M0 scale (OCP MX v1.0 §6.3). A block's scale is chosen when GPTQ reaches the
block's first column, from the block's values at that moment (the original values plus the error
fed forward from earlier blocks: what the IST-DASLab code does for grouped quantization without
`static_groups`), with the spec's scale rule (`floor`, or `mse` to minimize the block's error);
the block's columns are then rounded on that fixed grid. The result is returned as the codes and
scales computed here, so the stored weight decodes exactly to the GPTQ result (re-quantizing the
result could choose another scale for a block whose maximum moved).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from mxfx.errors import MXValueError
from mxfx.numerics.api import MXData, quantize
from mxfx.numerics.formats import get_format
from mxfx.numerics.reference import decode_scales, encode_elements, pack_codes, packing_group, round_elements
from mxfx.numerics.spec import MXSpec

log = logging.getLogger(__name__)

LAZY_COLUMNS = 128  # columns per lazy batch update (rounded up to whole MX blocks)
DAMP = 0.01  # dampening: this fraction of the mean diagonal of H is added to it (GPTQ's percdamp)


def gptq_quantize(weight: Tensor, hessian: Tensor, spec: MXSpec, damp: float = DAMP) -> tuple[Tensor, MXData]:
    """GPTQ-quantize a (out, in) weight on the MX grid of `spec`, blocked along in_features.

    Args:
        weight: the (out, in) weight (any float dtype; the math is fp32, like GPTQ's).
        hessian: (in, in) X^T X of the layer's inputs (any positive scale: it is normalized).
        spec: the weight's MX spec; stochastic rounding rounds to nearest even here.
        damp: the dampening fraction of the mean diagonal.

    Returns:
        (Q, data): Q the quantized weight as fp32 values, and `data` its MX codes and scales
        (`mxfx.dequantize(data)` equals Q exactly).

    Raises:
        MXValueError: shapes that do not fit, or a non-finite weight or Hessian.
    """
    if weight.dim() != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise MXValueError(f"GPTQ needs a (out, in) weight and an (in, in) Hessian, got {tuple(weight.shape)} "
                           f"and {tuple(hessian.shape)}")
    if not (torch.isfinite(weight).all() and torch.isfinite(hessian).all()):
        raise MXValueError("GPTQ needs a finite weight and Hessian")
    fmt = get_format(spec.format)
    rounding = "even" if spec.rounding == "stochastic" else spec.rounding
    block = spec.block_size
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(torch.float32).clone()
    out_features, in_features = w.shape
    dead = h.diagonal() == 0  # inputs that are always zero: their weights do not matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(damp * h.diagonal().mean())
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    n_blocks = (in_features + block - 1) // block
    q = torch.zeros_like(w)
    scales = torch.zeros(out_features, n_blocks, dtype=torch.uint8)
    lazy = -(-LAZY_COLUMNS // block) * block  # whole MX blocks per lazy batch
    x_scale = torch.ones(out_features)
    for start in range(0, in_features, lazy):
        stop = min(start + lazy, in_features)
        w1, u1 = w[:, start:stop].clone(), u[start:stop, start:stop]
        err1 = torch.zeros_like(w1)
        for i in range(stop - start):
            column = start + i
            if column % block == 0:  # a new MX block: fix its scale from its current values
                values = w1[:, i : i + block]
                code = quantize(values.contiguous(), spec.format, block_size=block, scale_mode=spec.scale_mode,
                                rounding=rounding).scales[:, 0]
                scales[:, column // block] = code
                x_scale = decode_scales(code)
            col = w1[:, i]
            quantized = round_elements(col / x_scale, fmt, rounding) * x_scale
            q[:, column] = quantized
            err = (col - quantized) / u1[i, i]
            w1[:, i:] -= err[:, None] * u1[i, i:][None, :]
            err1[:, i] = err
        w[:, stop:] -= err1 @ u[start:stop, stop:]
    return q, _mx_data(q, scales, spec, weight.dtype)


def _mx_data(q: Tensor, scales: Tensor, spec: MXSpec, dtype: torch.dtype) -> MXData:
    """The MX codes of values `q` that lie on the grids of `scales` (exact: q / X is on the grid)."""
    fmt = get_format(spec.format)
    out_features, in_features = q.shape
    n_blocks = scales.shape[1]
    padded = torch.nn.functional.pad(q, (0, n_blocks * spec.block_size - in_features))
    x = decode_scales(scales).unsqueeze(-1)
    scaled = padded.reshape(out_features, n_blocks, spec.block_size) / x  # exact: a power of two
    codes = encode_elements(scaled, fmt, "even").reshape(out_features, n_blocks * spec.block_size)
    group_pad = (-codes.shape[-1]) % packing_group(fmt)
    if group_pad:
        codes = torch.nn.functional.pad(codes, (0, group_pad))
    return MXData(pack_codes(codes, fmt).contiguous(), scales.contiguous(), fmt.name, spec.block_size, 1,
                  tuple(q.shape), dtype, spec.scale_mode, spec.rounding)


