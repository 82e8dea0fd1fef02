"""The documentation's code: every ```python block in README.md and docs/*.md compiles, every
`mxfx.` name a block uses exists, and the README's quickstart block runs."""

from __future__ import annotations

import contextlib
import importlib
import io
import re
from pathlib import Path

import pytest
import torch

import mxfx

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
MXFX_NAME = re.compile(r"(?<![\w.])mxfx(?:\.[A-Za-z_]\w*)+")
FROM_IMPORT = re.compile(r"^\s*from (mxfx(?:\.\w+)*) import (\([^)]*\)|[^\n#]+)", re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number of the opening fence, source) of each ```python block of a Markdown text."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in FENCE.finditer(text)]


def section_blocks(text: str, heading: str) -> list[str]:
    """The ```python blocks between `heading` (a whole line) and the next heading of its level."""
    level = heading.split(" ")[0]
    start = text.index(f"\n{heading}\n")
    end = text.find(f"\n{level} ", start + 1)
    return [source for _, source in python_blocks(text[start: end if end != -1 else None])]


BLOCKS = [(path, line, source) for path in DOCS for line, source in python_blocks(path.read_text())]


def test_the_blocks_are_found():
    assert (ROOT / "docs").is_dir() and len(DOCS) > 1
    assert sum(path.name == "README.md" for path, _, _ in BLOCKS) >= 3
    # A broken block is caught: the same extraction and compile as the tests below.
    (line, source), = python_blocks("text\n\n```python\nx = (1,\n```\n")
    assert line == 3
    with pytest.raises(SyntaxError):
        compile(source, f"example.md:{line}", "exec")


@pytest.mark.parametrize(("path", "line", "source"), BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _ in BLOCKS])
def test_block_compiles(path, line, source):
    compile(source, f"{path.relative_to(ROOT)}:{line}", "exec")


@pytest.mark.parametrize(("path", "line", "source"), BLOCKS,
                         ids=[f"{p.relative_to(ROOT)}:{n}" for p, n, _ in BLOCKS])
def test_block_names_exist(path, line, source):
    """Every dotted `mxfx.` name and every `from mxfx... import` name of a block resolves."""
    missing = []
    for dotted in set(MXFX_NAME.findall(source)):
        obj, parts = mxfx, dotted.split(".")
        for i, part in enumerate(parts[1:], 2):
            if not hasattr(obj, part):
                try:  # a submodule a block imports (mxfx.integrations.generation)
                    importlib.import_module(".".join(parts[:i]))
                except ImportError:
                    pass
            if not hasattr(obj, part):
                missing.append(dotted)
                break
            obj = getattr(obj, part)
    for module, names in FROM_IMPORT.findall(source):
        imported = importlib.import_module(module)
        for entry in names.strip("()").split(","):
            name = entry.split("#")[0].split(" as ")[0].strip()
            if name and not hasattr(imported, name):
                missing.append(f"{module}.{name}")
    assert not missing, f"{path.relative_to(ROOT)}:{line} uses names mxfx does not have: {sorted(missing)}"


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    """The first ```python block under "## Quickstart" runs on its own (a fresh namespace) and its
    prepared model quantizes both linears and tracks the fp model."""
    blocks = section_blocks((ROOT / "README.md").read_text(), "## Quickstart")
    assert blocks, "README.md has no ```python block under '## Quickstart'"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__quickstart__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out), torch.no_grad():
        exec(compile(blocks[0], "README.md:Quickstart", "exec"), namespace)
    prepared, model, x, y = (namespace[k] for k in ("prepared", "model", "x", "y"))
    assert [s.status for s in prepared.mxfx_report.sites] == ["quantized", "quantized"]
    reference = model(x)
    assert y.shape == reference.shape
    assert 0 < ((y - reference).norm() / reference.norm()).item() < 0.25  # quantized, and close
    assert "quantized sites: 2" in out.getvalue()
