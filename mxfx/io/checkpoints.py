"""Checkpoints that other runtimes load: compressed-tensors, AMD Quark and GGUF (MXFP4).

    prepared = mxfx.prepare(model, "mxfp4_weight_only", (ids,))
    mxfx.save_pretrained(prepared, "out/", format="compressed-tensors", model=model, tokenizer=tokenizer)

The writer reads the codes and E8M0 scales the prepared graph computes with
(`mxfx.graph.weights.site_weights`): after GPTQ, mse scales or a searched mixed config, the
checkpoint holds exactly those bits, so a loader that decodes them reproduces mxfx's weight-only
simulation. Everything mxfx cannot express in the target format is refused with a
`CheckpointError` naming the site (a Hadamard-rotated site, an activation rule the format cannot
carry, an element format it has no type for, a quantized attention site, a simulated weight).
docs/checkpoints.md has the layouts, loading recipes and the runtimes each format loads in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import fx

from mxfx.io import compressed_tensors, gguf, quark
from mxfx.io.checkpoint_plan import CHECKPOINT_FORMATS, plan_checkpoint, write_hf_folder  # noqa: F401  (public here)


def save_pretrained(prepared: fx.GraphModule, path: str | Path, *, format: str, model: Any = None,
                    tokenizer: Any = None) -> Path:
    """Write a prepared Hugging Face model as a checkpoint other runtimes load.

    Args:
        prepared: a module from `mxfx.prepare` whose quantized linear weights are packed
            (`weight_storage = "packed"`, the default).
        path: the output folder (created); for `format="gguf"` the folder gets `model.gguf`, or
            give a path ending in `.gguf`.
        format: "compressed-tensors" (MXFP4/MXFP6 E2M3/MXFP8 E4M3, mixed configs as one group per
            format), "quark" (fp4, fp6_e2m3, fp6_e3m2) or "gguf" (MXFP4, llama-family).
        model: the transformers model the prepared module came from (its config and other tensors).
        tokenizer: saved with the checkpoint (GGUF: its vocabulary goes into the file's metadata).

    Returns:
        The folder (or the .gguf file) written.

    Raises:
        CheckpointError: something the format cannot express (the message names the site).
        MissingDependencyError: GGUF needs the `gguf` package (`pip install 'mxfx[checkpoints]'`).

    Example:
        >>> prepared = mxfx.prepare(model, "mxfp4_weight_only", (ids,))
        >>> mxfx.save_pretrained(prepared, "smollm2-mxfp4", format="compressed-tensors", model=model)
        >>> # elsewhere: AutoModelForCausalLM.from_pretrained("smollm2-mxfp4", dtype=torch.float32,
        >>> #     quantization_config=CompressedTensorsConfig(dequantize=True))
    """
    plan = plan_checkpoint(prepared, model, format)
    if format == "gguf":
        return gguf.write(plan, Path(path), tokenizer)
    writer = compressed_tensors if format == "compressed-tensors" else quark
    quantization_config, tensors = writer.convert(plan)
    return write_hf_folder(plan, Path(path), quantization_config, tensors, tokenizer)
