"""Give the mixture-of-experts sites of a fresh export the quantized weights a prepared graph already has.

The expert form of `TransplantLinearsPass` (a model exported again for another shape class,
`mxfx.graph.shape_classes`): the re-export's expert products get the same rewrite as at prepare
time (`InsertExpertQDQPass`: an `mxfx.fake_quantize` of the activation operand, the stacked weight
read from MX codes and scales through an `mxfx.dequantize`, or from its simulated fp tensor), but
the weight buffers are the prepared module's own tensor objects, found under the names
`InsertExpertQDQPass` gave them (`expert_buffer_names`), never quantized again. GPTQ-rounded
experts come along with their codes. Sites pair in graph order, as the stacked weights are first
read; a missing buffer raises `TransplantError`.

Rotated expert sites (`rotation = "hadamard"`) are refused: their rotated fp weights are not kept
in the prepared module, and the rotation of the activation is `RotateExpertsPass`'s rewrite.
"""

from __future__ import annotations

import torch
from mxfx.passes.insert_expert_qdq import InsertExpertQDQPass, expert_buffer_names
from mxfx.passes.transplant_linears import TransplantError
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from mxfx.graph.config import MXSpec, QuantConfig
from mxfx.graph.sites import EXPERT_FORMS, site_of


class TransplantExpertsPass(InsertExpertQDQPass):
    """InsertExpertQDQPass with the stacked weights' quantized buffers taken from `source`.

    Requires: the matching passes have annotated the graph's expert sites; `source` was prepared
    from the same model with the same config. Ensures: what InsertExpertQDQPass ensures; the
    graph's buffers are `source`'s tensors (same storage).

    Raises:
        TransplantError: an expert site of `source` is rotated, or a buffer it should have is missing.
    """

    def __init__(self, config: QuantConfig, source: fx.GraphModule) -> None:
        super().__init__(config)
        self.source = source  # read only: its buffers are shared, never modified

    def call(self, gm: fx.GraphModule) -> PassResult:
        rotated = [site.fqn for site in map(site_of, self.source.graph.nodes)
                   if site is not None and site.form in EXPERT_FORMS and site.quantized and site.rotation_block]
        if rotated:
            raise TransplantError(f"rotated expert sites ({rotated[0]}, ...) cannot be copied into a re-exported graph")
        return super().call(gm)

    def _quantize(self, gm: fx.GraphModule, attr: fx.Node, axis: int, spec: MXSpec, storage: str,
                  index: int) -> tuple[str, ...]:
        names = expert_buffer_names(str(attr.target), index, storage)
        buffers = dict(self.source.named_buffers())
        for name in names:
            tensor = buffers.get(name)
            if not isinstance(tensor, torch.Tensor):
                raise TransplantError(f"the prepared module has no buffer {name} for the expert weight {attr.target}")
            gm.register_buffer(name, tensor)
        return names
