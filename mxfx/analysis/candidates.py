"""Candidates: (weight format, activation format) pairs, their labels and the CLI syntax.

One normaliser for sensitivity and search: formats are canonicalised through `get_format`, None keeps
an operand in high precision, (None, None) and duplicates are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from mxfx.errors import MXValueError
from mxfx.numerics.formats import get_format

DEFAULT_FORMATS = ("fp8_e4m3", "fp6_e2m3", "fp4_e2m1", "int8")  # sensitivity's default

Candidate = tuple[str | None, str | None]  # (weight format, activation format); None: high precision


def format_or_none(name: str | None) -> str | None:
    """The canonical name of a format alias; None stays None (high precision)."""
    return None if name is None else get_format(name).name


def normalize_candidates(formats: Iterable[str] | str | None, candidates: Iterable[Sequence] | None,
                         activations: bool = True, default: Sequence[str] = DEFAULT_FORMATS) -> list[Candidate]:
    """Candidates as canonical (weight, activation) pairs, for sensitivity and search alike.

    `formats` (a name or a list) is shorthand for (f, f) pairs, or (f, None) with
    `activations=False`; neither given means `default`. A pair listed twice, (None, None), or an
    empty list is refused.

        >>> normalize_candidates(["fp8"], None)
        [('fp8_e4m3', 'fp8_e4m3')]
    """
    if formats is not None and candidates is not None:
        raise MXValueError("pass formats= or candidates=, not both")
    if candidates is None:
        formats = list(default if formats is None else ([formats] if isinstance(formats, str) else formats))
        candidates = [(f, f if activations else None) for f in formats]
    out: list[Candidate] = []
    for candidate in candidates:
        if isinstance(candidate, str) or len(candidate) != 2:
            raise MXValueError(f"a candidate is a (weight format, activation format) pair, got {candidate!r}")
        pair = (format_or_none(candidate[0]), format_or_none(candidate[1]))
        if pair == (None, None):
            raise MXValueError("the candidate (None, None) quantizes nothing")
        if pair in out:
            raise MXValueError(f"candidate {candidate_label(pair)} is listed twice")
        out.append(pair)
    if not out:
        raise MXValueError("no candidates to measure")
    return out


def candidate_label(candidate: Candidate) -> str:
    """"fp8_e4m3" for (fp8_e4m3, fp8_e4m3); "fp4_e2m1:fp8_e4m3" otherwise ("none" = high precision),
    the syntax of the CLI's --candidates."""
    weight, activation = candidate
    return weight if weight == activation else f"{weight or 'none'}:{activation or 'none'}"


def parse_candidates(text: str) -> list[Candidate]:
    """'fp4_e2m1:fp8_e4m3,fp8_e4m3' -> [("fp4_e2m1", "fp8_e4m3"), ("fp8_e4m3", "fp8_e4m3")]."""
    out = []
    for item in text.split(","):
        weight, sep, activation = item.strip().partition(":")
        pair = (weight, activation if sep else weight)
        out.append(tuple(None if p.lower() in ("none", "") else p for p in pair))
    return out


