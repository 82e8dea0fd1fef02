"""AMD Quark's layout (`quant_method: "quark"`): the route by which MXFP6 E3M2 loads in runtimes.

Per quantized nn.Linear `L`: `L.weight` holds the element codes (fp4: uint8 [N, K/2], two codes a
byte, first in the low nibble; fp6 E2M3 or E3M2: uint8 [N, 3K/4], four codes in a little-endian
24-bit word) and `L.weight_scale` the E8M0 bytes, uint8 [N, K/32] (OCP MX v1.0 §5.4.1). MXFP8
weights are refused (see WEIGHT_DTYPES). The config is Quark's `QConfig.to_dict()` form (amd-quark 0.13): `per_group` specs with
`group_size` 32 and `scale_format` "e8m0"; the most common weight format is the global config,
other formats are `layer_quant_config` entries keyed by module name; unquantized linears are in
`exclude`.

Activation rules become `input_tensors` specs (dynamic, per_group 32, e8m0) with Quark's
`scale_calculation_mode`: its MX fake-quantizer (`quark.torch.kernel.hw_emulation.
hw_emulation_interface.fake_quantize_mx`) knows "floor", "ceil" and "even" (`even_round`: the
block maximum rounded at the element's mantissa width, mxfx's `even`); elements round half to
even. Other mxfx scale modes and roundings are refused.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

from mxfx.errors import CheckpointError
from mxfx.io.checkpoint_plan import MX_BLOCK, CheckpointPlan, QuantizedLinear, refuse_activation

DTYPES = {"fp4_e2m1": "fp4", "fp6_e2m3": "fp6_e2m3", "fp6_e3m2": "fp6_e3m2", "fp8_e4m3": "fp8_e4m3"}
# amd-quark 0.13 loads packed per_group (MX) weights for fp4 and fp6 only: its fp8 dequantizer
# (hw_emulation_interface.dequantize_fp8) has per-tensor, per-channel and per-block paths and raises
# "Unsupported QuantSchema: per_group" for an MXFP8 weight (measured on CPU).
WEIGHT_DTYPES = ("fp4_e2m1", "fp6_e2m3", "fp6_e3m2")
SCALE_MODES = ("floor", "ceil", "even")  # Quark's scale_calculation_mode values for MX blocks
VERSION = "0.13"  # the amd-quark release this layout was checked against


def _spec(fmt: str, dynamic: bool, scale_mode: str | None) -> dict:
    return {"dtype": DTYPES[fmt], "is_dynamic": dynamic, "qscheme": "per_group", "ch_axis": -1,
            "group_size": MX_BLOCK, "block_size": None, "symmetric": None, "round_method": "half_even",
            "scale_type": "float", "zero_point_type": "int32", "scale_format": "e8m0",
            "scale_calculation_mode": scale_mode, "mx_element_dtype": None, "observer_cls": "PerBlockMXObserver",
            "is_scale_quant": False}


def _layer_config(layer: QuantizedLinear) -> dict:
    fmt = layer.data.elem_format
    if fmt not in WEIGHT_DTYPES:
        hint = " (amd-quark 0.13 cannot load per-group FP8 weights; compressed-tensors stores MXFP8)" \
            if fmt == "fp8_e4m3" else ""
        raise CheckpointError(f"site {layer.fqn} stores {fmt} weights: Quark checkpoints load MX weights in "
                              f"{', '.join(WEIGHT_DTYPES)}{hint}")
    inputs = None
    spec = layer.activation
    if spec is not None:
        if spec.format not in DTYPES or spec.block_size != MX_BLOCK or spec.scale_mode not in SCALE_MODES \
                or spec.rounding != "even":
            raise refuse_activation(layer, "Quark", f"quantizes inputs to {', '.join(DTYPES)} in blocks of "
                                    f"{MX_BLOCK} with scale modes {', '.join(SCALE_MODES)} and rounding 'even' only")
        inputs = _spec(spec.format, True, spec.scale_mode)
    return {"input_tensors": inputs, "output_tensors": None, "weight": _spec(fmt, False, None), "bias": None,
            "target_device": None}


def _tensors(layer: QuantizedLinear) -> dict[str, Tensor]:
    codes = layer.data.codes.contiguous()
    if layer.data.elem_format == "fp8_e4m3":
        codes = codes.view(torch.float8_e4m3fn)  # OCP E4M3 bit patterns
    return {f"{layer.fqn}.weight": codes, f"{layer.fqn}.weight_scale": layer.data.scales.contiguous()}


def convert(plan: CheckpointPlan) -> tuple[dict, dict[str, Tensor]]:
    """The `quantization_config` and the quantized tensors of a Quark checkpoint."""
    if not plan.quantized:
        raise CheckpointError("the prepared model quantizes no linear weight: nothing to write as Quark")
    configs = {fqn: _layer_config(layer) for fqn, layer in plan.quantized.items()}
    keys = {fqn: repr(config) for fqn, config in configs.items()}
    common = Counter(keys.values()).most_common(1)[0][0]
    global_config = next(config for fqn, config in configs.items() if keys[fqn] == common)
    config = {
        "global_quant_config": global_config,
        "exclude": list(plan.unquantized_linears),
        "algo_config": None,
        "softmax_quant_spec": None,
        "quant_method": "quark",
        "layer_type_quant_config": {},
        # Quark matches these keys as fnmatch patterns; module names have no pattern characters.
        "layer_quant_config": {fqn: config for fqn, config in configs.items() if keys[fqn] != common},
        "kv_cache_quant_config": {},
        "kv_cache_post_rope": False,
        "quant_mode": "eager_mode",
        "version": VERSION,
        "export": {"kv_cache_group": [], "min_kv_scale": 0.0, "pack_method": "reorder",
                   "weight_format": "real_quantized", "weight_merge_groups": None},
    }
    tensors: dict[str, Tensor] = {}
    for layer in plan.quantized.values():
        tensors |= _tensors(layer)
    return config, tensors
