"""mxfx: a PyTorch 2 graph-mode quantizer for the OCP Microscaling (MX) formats."""

from mxfx import attention, ops  # noqa: F401  (register the torch.ops.mxfx ops)
from mxfx.api import MXData, dequantize, fake_quantize, linear, matmul, quantize
from mxfx.checks import NonFinite, check_nonfinite
from mxfx.config import AttentionSpec, MXSpec, QuantConfig, Rule, load_config, preset_names
from mxfx.errors import (
    ArchiveError,
    ConfigError,
    ExportError,
    FormatError,
    InputGuardError,
    MissingDependencyError,
    MXFXError,
    MXFXWarning,
    MXTypeError,
    MXValueError,
)
from mxfx.export import export
from mxfx.formats import FORMATS, ElementFormat, format_table, get_format
from mxfx.inspect import Summary, draw, graph_text, load, save, summary
from mxfx.kernels import fused_kernels
from mxfx.ops import frozen_weights
from mxfx.prepare import PrepareReport, prepare
from mxfx.search import Front, SearchResult, search
from mxfx.sensitivity import SensitivityReport, evaluate, sensitivity
from mxfx.sites import Site, find_sites

__all__ = [
    "export",
    "frozen_weights",
    "fused_kernels",
    "find_sites",
    "Site",
    "check_nonfinite",
    "NonFinite",
    "InputGuardError",
    "Front",
    "MissingDependencyError",
    "SearchResult",
    "SensitivityReport",
    "evaluate",
    "search",
    "sensitivity",
    "Summary",
    "draw",
    "graph_text",
    "load",
    "save",
    "summary",
    "AttentionSpec",
    "MXSpec",
    "MXFXWarning",
    "PrepareReport",
    "QuantConfig",
    "Rule",
    "load_config",
    "prepare",
    "preset_names",
    "MXData",
    "dequantize",
    "fake_quantize",
    "linear",
    "matmul",
    "quantize",
    "FORMATS",
    "ArchiveError",
    "ConfigError",
    "ElementFormat",
    "ExportError",
    "FormatError",
    "MXFXError",
    "MXTypeError",
    "MXValueError",
    "format_table",
    "get_format",
]
