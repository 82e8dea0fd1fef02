"""The mxfx exception family: every error mxfx raises on purpose is an `MXFXError`.

Each subclass also derives from the built-in exception a Python user would expect
(`ValueError`, `TypeError`, ...), so existing `except ValueError` code keeps working.
"""

from __future__ import annotations


class MXFXError(Exception):
    """Base class of every error mxfx raises on purpose."""


class FormatError(MXFXError, ValueError):
    """An unknown element format, scale mode or rounding mode."""


class MXValueError(MXFXError, ValueError):
    """An argument with the right type but an unusable value (block size, axis, shape)."""


class MXTypeError(MXFXError, TypeError):
    """An argument of the wrong type (an integer tensor, a non-MX operand, ...)."""


class ConfigError(MXFXError, ValueError):
    """A quantization config that cannot be used (unknown key, bad regex, bad value)."""


class ExportError(MXFXError, RuntimeError):
    """torch.export could not trace the model; the message says why and what to try."""


class ArchiveError(MXFXError, ValueError):
    """A file that is not a readable mxfx / torch.export archive."""


class InputGuardError(MXFXError, ValueError):
    """A prepared module was called with inputs its export does not cover (e.g. another batch size)."""


class CheckpointError(MXFXError, ValueError):
    """A prepared model (or one of its sites) that a checkpoint format cannot express; the message names the site."""


class ResumeError(MXValueError):
    """A resume file that cannot be used: written by another run (other config, weights or data) or
    not a resume file; the message names the file, what differs, and to delete it or pick another path."""


class MissingDependencyError(MXFXError, ImportError):
    """An optional package or program a feature needs is not installed (the message says how to get it)."""


class MXFXWarning(UserWarning):
    """Warnings from mxfx: rules that match nothing, Inf inputs that turn MX blocks into NaN, ..."""
