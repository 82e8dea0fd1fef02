"""The numerics layer: MX element formats, the reference math (OCP MX v1.0 §6.3), `MXSpec`, the
public tensor API (`quantize`, `dequantize`, `fake_quantize`, `matmul`, `linear`), the `torch.ops.mxfx`
ops with their Inductor kernels, and the MX attention op. Imports nothing above `mxfx.errors` and
`mxfx._compat`.
"""
