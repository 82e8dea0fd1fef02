"""`MXSpec`: how one tensor is quantized (element format, block size, scale mode, rounding).

The numerics layer's one typed description of an MX quantizer. It lives here, not with the
configs, so that the ops and kernels parse their string arguments without depending on the
config layer above them (`mxfx.graph.config` builds rules out of specs).
"""

from __future__ import annotations

import dataclasses

from mxfx.errors import ConfigError
from mxfx.numerics.formats import get_format
from mxfx.numerics.reference import ROUNDINGS, SCALE_MODES


@dataclasses.dataclass(frozen=True)
class MXSpec:
    """How one tensor is quantized."""

    format: str  # element format name (any alias; stored canonical)
    block_size: int = 32  # elements per E8M0 scale
    scale_mode: str = "floor"  # floor (OCP), ceil, even, rceil, mse (error-minimizing exponent)
    rounding: str = "even"  # even (OCP), away, toward_zero, stochastic

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", get_format(self.format).name)
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ConfigError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.scale_mode not in SCALE_MODES:
            raise ConfigError(f"unknown scale_mode {self.scale_mode!r}; valid: {', '.join(SCALE_MODES)}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"unknown rounding {self.rounding!r}; valid: {', '.join(ROUNDINGS)}")

    def to_arg(self) -> str:
        """The compact string form the attention op takes: "format/block_size/scale_mode/rounding"."""
        return f"{self.format}/{self.block_size}/{self.scale_mode}/{self.rounding}"

    @classmethod
    def from_arg(cls, text: str) -> MXSpec | None:
        """Inverse of `to_arg`; "" means no quantization (None)."""
        if not text:
            return None
        fmt, block, scale_mode, rounding = text.split("/")
        return cls(fmt, int(block), scale_mode, rounding)

    def describe(self) -> str:
        return f"{self.format}/b{self.block_size}" + (
            "" if (self.scale_mode, self.rounding) == ("floor", "even") else f"/{self.scale_mode}/{self.rounding}"
        )
