"""The compressed-tensors layout (llm-compressor's output; vLLM and transformers load it).

Per quantized nn.Linear `L` (blocks of 32 along in_features, OCP MX v1.0 §5.2):
- MXFP4 (`mxfp4-pack-quantized`): `L.weight_packed` uint8 [N, K/2], element 2j in the low nibble,
  2j+1 in the high one, OCP E2M1 code bits (mxfx's own packing); `L.weight_scale` uint8 [N, K/32],
  the E8M0 byte (scale 2^(byte - 127), §5.4.1).
- MXFP8 (`mxfp8-quantized`): `L.weight` float8_e4m3fn [N, K] (the OCP E4M3 codes) + `L.weight_scale`.
- MXFP6 E2M3 (`mxfp6-pack-quantized`): `L.weight_packed` uint8 [N, 3K/4], four codes in a
  little-endian 24-bit word (mxfx's fp6 packing) + `L.weight_scale`.

One config group per element format: a single-format model targets "Linear" with the
unquantized linears in `ignore`; a mixed one lists each group's modules as `re:` targets under
the top-level format "mixed-precision".

Activation rules: compressed-tensors' dynamic MX activation scale is the block maximum rounded to
the FP4 mantissa width (E2M3's for 6 bits), then floor(log2) minus the element's emax
(`compressed_tensors.quantization.utils.mxfp_utils.generate_mx_scales`), which is mxfx's `even`
for FP4 and FP6 E2M3; elements round to nearest even and saturate. For 8-bit elements it rounds
with FP4's mantissa width too, which no mxfx scale mode reproduces, so FP8 activation rules are
refused.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from mxfx.errors import CheckpointError
from mxfx.io.checkpoint_plan import MX_BLOCK, CheckpointPlan, QuantizedLinear, refuse_activation

# mxfx element format -> (compressed-tensors format, num_bits, tensor name of the codes)
FORMATS = {
    "fp4_e2m1": ("mxfp4-pack-quantized", 4, "weight_packed"),
    "fp6_e2m3": ("mxfp6-pack-quantized", 6, "weight_packed"),
    "fp8_e4m3": ("mxfp8-quantized", 8, "weight"),
}
ACTIVATION_FORMATS = ("fp4_e2m1", "fp6_e2m3")  # where the library's dynamic scale rule is mxfx's `even`
DEFAULT_VERSION = "0.20.1"  # the compressed-tensors release this layout was checked against


def _library_version() -> str | None:
    """The installed compressed-tensors version, or None when it is not installed (writing needs
    no library; the check below only refuses formats an installed older release lacks)."""
    try:
        import compressed_tensors
    except ImportError:
        return None
    return getattr(compressed_tensors, "__version__", DEFAULT_VERSION)


def _check_library_has(fmt: str) -> None:
    try:
        from compressed_tensors.config import CompressionFormat
    except ImportError:
        return
    if fmt not in {member.value for member in CompressionFormat}:
        raise CheckpointError(f"the installed compressed-tensors ({_library_version()}) has no {fmt!r} format: "
                              "upgrade it (pip install 'compressed-tensors>=0.20.1') or use format='quark'")


def _weights_args(num_bits: int) -> dict:
    return {"num_bits": num_bits, "type": "float", "symmetric": True, "group_size": MX_BLOCK, "strategy": "group",
            "dynamic": False, "scale_dtype": "torch.uint8"}


def _activation_args(layer: QuantizedLinear) -> dict | None:
    spec = layer.activation
    if spec is None:
        return None
    if spec.format not in ACTIVATION_FORMATS or spec.block_size != MX_BLOCK or spec.scale_mode != "even" \
            or spec.rounding != "even":
        raise refuse_activation(
            layer, "compressed-tensors",
            "quantizes activations dynamically with its own scale rule, which equals mxfx's scale_mode 'even' "
            f"(rounding 'even', blocks of {MX_BLOCK}) for fp4_e2m1 and fp6_e2m3 only")
    return {"num_bits": FORMATS[spec.format][1], "type": "float", "symmetric": True, "group_size": MX_BLOCK,
            "strategy": "group", "dynamic": True, "scale_dtype": "torch.uint8"}


def _tensors(layer: QuantizedLinear) -> dict[str, Tensor]:
    data = layer.data
    name = FORMATS[data.elem_format][2]
    codes = data.codes.contiguous()
    if data.elem_format == "fp8_e4m3":
        codes = codes.view(torch.float8_e4m3fn)  # the codes are OCP E4M3 bit patterns
    return {f"{layer.fqn}.{name}": codes, f"{layer.fqn}.weight_scale": data.scales.contiguous()}


def convert(plan: CheckpointPlan) -> tuple[dict, dict[str, Tensor]]:
    """The `quantization_config` and the quantized tensors of a compressed-tensors checkpoint."""
    groups: dict[tuple, list[QuantizedLinear]] = {}
    for layer in plan.quantized.values():
        fmt = layer.data.elem_format
        if fmt not in FORMATS:
            hint = " (format='quark' stores fp6_e3m2)" if fmt == "fp6_e3m2" else ""
            raise CheckpointError(f"site {layer.fqn} stores {fmt} weights: compressed-tensors has MX layouts for "
                                  f"{', '.join(FORMATS)} only{hint}")
        _check_library_has(FORMATS[fmt][0])
        activation = _activation_args(layer)
        key = (fmt, tuple(sorted(activation.items())) if activation else None)
        groups.setdefault(key, []).append(layer)
    if not groups:
        raise CheckpointError("the prepared model quantizes no linear weight: nothing to write as compressed-tensors")
    formats = {FORMATS[fmt][0] for fmt, _ in groups}
    single = len(groups) == 1
    config_groups = {}
    for index, ((fmt, activation), layers) in enumerate(groups.items()):
        targets = ["Linear"] if single else [f"re:^{re.escape(layer.fqn)}$" for layer in layers]
        config_groups[f"group_{index}"] = {
            "targets": targets,
            "weights": _weights_args(FORMATS[fmt][1]),
            "input_activations": dict(activation) if activation else None,
            "output_activations": None,
            "format": FORMATS[fmt][0],
        }
    config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": list(plan.unquantized_linears),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "sparsity_config": {},
        "transform_config": {},
        "version": _library_version() or DEFAULT_VERSION,
    }
    tensors: dict[str, Tensor] = {}
    for layers in groups.values():
        for layer in layers:
            tensors |= _tensors(layer)
    return config, tensors
