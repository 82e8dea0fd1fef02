"""mxfx: a PyTorch 2 graph-mode quantizer for the OCP Microscaling (MX) formats.

The package is layered; each layer imports only from the ones below it:

    mxfx.errors, mxfx._compat      exceptions; every private torch API
    mxfx.numerics                  formats, reference math, MXSpec, tensor API, torch.ops.mxfx ops, kernels
    mxfx.recovery                  GPTQ on the MX grid, block-Hadamard rotation
    mxfx.graph (config, export, sites) -> mxfx.passes -> mxfx.graph (prepare, checks, inspect)
    mxfx.analysis                  sensitivity, search, metrics, noise floors, divergence
    mxfx.io, mxfx.integrations     .pt2 files and checkpoints; generation and evaluation harnesses
    mxfx.cli                       the `mxfx` command

The names below are the public API; `import mxfx.<subpackage>.<module>` reaches the rest.
"""

# ruff: noqa: I001  (imports grouped by layer, bottom up)
# Numerics: formats and the tensor API (importing the ops registers torch.ops.mxfx.*)
from mxfx.numerics import ops as _ops  # noqa: F401
from mxfx.numerics.api import MXData, dequantize, fake_quantize, linear, matmul, quantize
from mxfx.numerics.formats import FORMATS, ElementFormat, format_table, get_format
from mxfx.numerics.kernels import fused_kernels
from mxfx.numerics.ops import frozen_weights
from mxfx.numerics.spec import MXSpec
from mxfx.recovery import rotation as _rotation  # noqa: F401  (registers torch.ops.mxfx.hadamard)

# Graph: configs, export, sites, prepare, checks and views
from mxfx.graph.config import AttentionSpec, QuantConfig, Rule, load_config, preset_names
from mxfx.graph.export import export
from mxfx.graph.sites import Site
from mxfx.graph.prepare import PrepareReport, find_sites, prepare
from mxfx.graph.checks import NonFinite, check_nonfinite
from mxfx.graph.inspect import Summary, draw, graph_text, summary

# Analysis: sensitivity and search (divergence and noise loaded so that mxfx.analysis.divergence.compare works)
from mxfx.analysis import divergence as _divergence, noise as _noise  # noqa: F401
from mxfx.analysis.search import Front, SearchResult, search
from mxfx.analysis.evaluation import evaluate
from mxfx.analysis.sensitivity import SensitivityReport, sensitivity

# I/O
from mxfx.io.pt2 import load, save
from mxfx.io.checkpoints import save_pretrained

# Errors and warnings
from mxfx.errors import (
    ArchiveError,
    CheckpointError,
    ConfigError,
    ExportError,
    FormatError,
    InputGuardError,
    MissingDependencyError,
    MXFXError,
    MXFXWarning,
    MXTypeError,
    MXValueError,
    ResumeError,
)

__all__ = [
    # numerics
    "FORMATS",
    "ElementFormat",
    "MXData",
    "MXSpec",
    "dequantize",
    "fake_quantize",
    "format_table",
    "frozen_weights",
    "fused_kernels",
    "get_format",
    "linear",
    "matmul",
    "quantize",
    # graph
    "AttentionSpec",
    "NonFinite",
    "PrepareReport",
    "QuantConfig",
    "Rule",
    "Site",
    "Summary",
    "check_nonfinite",
    "draw",
    "export",
    "find_sites",
    "graph_text",
    "load_config",
    "prepare",
    "preset_names",
    "summary",
    # analysis
    "Front",
    "SearchResult",
    "SensitivityReport",
    "evaluate",
    "search",
    "sensitivity",
    # io
    "load",
    "save",
    "save_pretrained",
    # errors
    "ArchiveError",
    "CheckpointError",
    "ConfigError",
    "ExportError",
    "FormatError",
    "InputGuardError",
    "MXFXError",
    "MXFXWarning",
    "MXTypeError",
    "MissingDependencyError",
    "MXValueError",
    "ResumeError",
]
