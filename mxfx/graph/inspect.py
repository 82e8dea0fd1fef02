"""See what mxfx did to a model: a summary table, a readable graph, a picture, and .pt2 files.

Everything here reads the graph itself (the `mxfx` ops and their arguments), so it works the same
on a module fresh from `mxfx.prepare` and on one loaded from a `.pt2` file.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch import fx

from mxfx.errors import MXTypeError
from mxfx.graph.config import MXSpec
from mxfx.graph.sites import ATTENTION, EXPERT_FORMS, LINEAR, QUANTIZED, STATUSES, Site, graph_sites, site_of
from mxfx.numerics import ops as _ops  # noqa: F401  (registers the torch.ops.mxfx ops named here)
from mxfx.numerics.ops import op_arguments
from mxfx.passes._utils import module_path
from mxfx.passes.match_attention_sites import PRODUCTS, SOFTMAXES, product_operands
from mxfx.passes.match_expert_sites import grouped_ops

mxfx_ops, aten = torch.ops.mxfx, torch.ops.aten


def _site_name(node: fx.Node) -> str:
    site = site_of(node)
    if site is not None:
        return site.fqn
    return module_path(node)


def _rule_label(gm: fx.GraphModule, node: fx.Node) -> str:
    report = getattr(gm, "mxfx_report", None)
    if report is None:
        return "-"
    site = site_of(node)
    if site is None:  # a loaded module: the report still names each site
        site = next((s for s in report.sites if s.fqn == _site_name(node)), None)
    if site is None or site.rule is None:
        return "-"
    return site.rule_label.split(" in ")[0]


def _arg_text(arg: str) -> str:
    """An attention operand's spec argument (`MXSpec.to_arg()`, "" for none) as table text."""
    spec = MXSpec.from_arg(arg)
    return "-" if spec is None else _spec_text(spec.format, spec.block_size, spec.scale_mode, spec.rounding)


def _spec_text(fmt: str, block: int, scale_mode: str = "floor", rounding: str = "even") -> str:
    if not fmt:
        return "-"
    extra = "" if (scale_mode, rounding) == ("floor", "even") else f" {scale_mode}/{rounding}"
    return f"{fmt}/{block}{extra}"


def _attr(gm: fx.GraphModule, node) -> torch.Tensor | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        value = gm
        for part in str(node.target).split("."):
            value = getattr(value, part)
        return value
    return None


def _row(site: str, kind: str, rule: str, weight: str, activation: str, storage: str, status: str = QUANTIZED,
         reason: str = "", before: int = 0, after: int = 0, bits: float | None = None) -> dict:
    return dict(site=site, kind=kind, rule=rule, weight=weight, activation=activation, storage=storage, status=status,
                weight_bytes_before=before, weight_bytes_after=after, bits_per_weight=bits, reason=reason)


def _attention_halves(gm: fx.GraphModule) -> dict[str, tuple[str, Site]]:
    """matmul node name -> ("QK^T" or "PV", its attention Site), from the explicit attention
    sites' `nodes` (qk, pv); for a loaded module (no node annotations), from its report."""
    halves: dict[str, tuple[str, Site]] = {}
    annotated = [site for site in graph_sites(gm) if site.kind == ATTENTION]
    report = getattr(gm, "mxfx_report", None)
    for site in annotated or (report.sites if report is not None else ()):
        if site.kind == ATTENTION and len(site.nodes) == 2:
            halves[site.nodes[0]] = ("QK^T", site)
            halves[site.nodes[1]] = ("PV", site)
    return halves


# Between a softmax and the P.V matmul (for a loaded module whose node names differ from the report's).
_PROBS_PASS_THROUGH = (mxfx_ops.fake_quantize.default, aten.dropout.default, aten.to.dtype, aten._to_copy.default,
                       aten.type_as.default, aten.clone.default, aten.contiguous.default)


def _reads_softmax(node: Any, depth: int = 6) -> bool:
    for _ in range(depth):
        if not (isinstance(node, fx.Node) and node.op == "call_function"):
            return False
        if node.target in SOFTMAXES:
            return True
        if node.target not in _PROBS_PASS_THROUGH:
            return False
        node = node.args[0]
    return False


def site_rows(gm: fx.GraphModule) -> list[dict]:
    """One dict per site: the quantized ones read from the graph's mxfx ops and their arguments
    (and their Site), then every site left in high precision with its status and reason."""
    rows: list[dict] = []
    seen_weights: set[int] = set()
    halves = _attention_halves(gm)
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is mxfx_ops.linear.default:
            a = op_arguments(node)
            codes, scales, wfmt, wblock, in_features = (a["weight_codes"], a["weight_scales"], a["weight_format"],
                                                         a["weight_block_size"], a["in_features"])
            afmt, ablock, amode, arnd = a["act_format"], a["act_block_size"], a["act_scale_mode"], a["act_rounding"]
            out_features = node.meta["val"].shape[-1] if "val" in node.meta else scales.meta["val"].shape[0]
            dtype = node.meta["val"].dtype if "val" in node.meta else torch.float32
            code_t, scale_t = _attr(gm, codes), _attr(gm, scales)
            after = 0
            if code_t is not None and id(code_t) not in seen_weights:
                seen_weights.add(id(code_t))
                after = code_t.nbytes + scale_t.nbytes
            before = out_features * in_features * dtype.itemsize if after else 0
            rows.append(_row(_site_name(node), "linear", _rule_label(gm, node), _spec_text(wfmt, wblock),
                             _spec_text(afmt, ablock, amode, arnd), "packed", before=before, after=after,
                             bits=round(8 * after / (out_features * in_features), 3) if after else None))
        elif node.target is aten.linear.default and (site := _quantized_site(gm, node)) is not None:
            # quantized with simulated weights, or activation only: the specs are on the Site
            w, a = site.weight, site.activation
            weight = node.args[1].meta["val"]
            nbytes = weight.numel() * weight.dtype.itemsize
            rows.append(_row(site.fqn, "linear", _rule_label(gm, node),
                             w.describe().replace("/b", "/") if w else "-", a.describe().replace("/b", "/") if a else "-",
                             site.weight_storage or "-", before=nbytes, after=nbytes,
                             bits=float(8 * weight.dtype.itemsize)))
        elif (site := _expert_site(gm, node)) is not None:
            rows.append(_expert_row(gm, node, site))
        elif node.target is mxfx_ops.attention.default:
            a = op_arguments(node)
            specs = [_arg_text(a[s]) for s in ("query_spec", "key_spec", "value_spec", "probs_spec")]
            rows.append(_row(_site_name(node), "attention (sdpa)", _rule_label(gm, node), "-",
                             f"Q {specs[0]}, K {specs[1]}, V {specs[2]}, P {specs[3]}", "-"))
        elif node.target in PRODUCTS:  # an explicit attention's QK^T or PV (baddbmm: batch1 @ batch2)
            operands = list(product_operands(node))
            quantized = [o for o in operands if isinstance(o, fx.Node) and o.target is mxfx_ops.fake_quantize.default]
            if quantized:
                half, site = halves.get(node.name, (None, None))
                if half is None:
                    half = "PV" if _reads_softmax(operands[0]) else "QK^T"
                text = ", ".join(_spec_text(*(op_arguments(o)[k] for k in ("elem_format", "block_size", "scale_mode", "rounding")))
                                 for o in quantized)
                rule = site.rule_label.split(" in ")[0] if site is not None and site.rule is not None else "-"
                rows.append(_row(site.fqn if site is not None else _site_name(node), half, rule, "-", text, "-"))
    report = getattr(gm, "mxfx_report", None)
    if report is not None:
        for site in report.unquantized:
            rows.append(_row(site.fqn, site.kind, site.rule_label.split(" in ")[0] if site.rule is not None else "(no rule)",
                             "high precision", "high precision", "-", status=site.status, reason=site.reason))
    return rows


def _expert_site(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    """The quantized mixture-of-experts Site of a grouped / bmm product (by annotation, or for a
    loaded module by the report's expert site recorded for that node name), or None."""
    site = site_of(node)
    if site is None and node.target in (aten.bmm.default, *grouped_ops()):
        report = getattr(gm, "mxfx_report", None)
        site = next((s for s in report.sites if s.node == node.name and s.form in EXPERT_FORMS), None) if report else None
    return site if site is not None and site.form in EXPERT_FORMS and site.quantized else None


def _expert_row(gm: fx.GraphModule, node: fx.Node, site: Site) -> dict:
    """An expert site's row: specs from its Site, bytes from the stacked weight the product reads
    (packed: the codes and scales behind its `mxfx.dequantize`)."""
    numel = site.weight_numel
    source = next((n for n in node.all_input_nodes if _weight_source(n) is not None), None)
    source = _weight_source(source) if source is not None else None
    dtype = source.meta["val"].dtype if source is not None and "val" in source.meta else torch.float32
    before = after = numel * dtype.itemsize
    if source is not None and source.target is mxfx_ops.dequantize.default:
        tensors = [_attr(gm, a) for a in source.args[:2]]
        after = sum(t.nbytes for t in tensors if t is not None)
    w, a = site.weight, site.activation
    return _row(site.fqn, f"linear ({site.experts} experts)", _rule_label(gm, node),
                w.describe().replace("/b", "/") if w else "-", a.describe().replace("/b", "/") if a else "-",
                site.weight_storage or "-", before=before, after=after,
                bits=round(8 * after / numel, 3) if numel else None)


def _weight_source(node: Any, depth: int = 8) -> fx.Node | None:
    """The 3-D `mxfx.dequantize` or get_attr a stacked weight operand is read from, through views,
    casts and the expert gather; None for an activation."""
    for _ in range(depth):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "get_attr" or node.target is mxfx_ops.dequantize.default:
            value = node.meta.get("val")
            return node if isinstance(value, torch.Tensor) and value.dim() == 3 else None
        if node.op != "call_function" or not node.args or node.target is mxfx_ops.fake_quantize.default:
            return None
        node = node.args[0]
    return None


def _quantized_site(gm: fx.GraphModule, node: fx.Node) -> Site | None:
    """The quantized linear Site of an `aten.linear` node (by annotation, or for a loaded module
    by the report's site of that name), or None."""
    site = site_of(node)
    if site is None:
        report = getattr(gm, "mxfx_report", None)
        site = next((s for s in report.sites if s.fqn == _site_name(node) and s.kind == LINEAR), None) if report else None
    return site if site is not None and site.kind == LINEAR and site.quantized else None


@dataclasses.dataclass
class Summary:
    """Per-site rows and totals; renders as a table, Markdown, CSV or JSON.

    Each row has the site, kind, rule, formats, storage, `status` (quantized, skipped, no rule,
    unsupported, check failed) and `reason` (why a site stays in high precision); the totals
    count the sites of each status and the model's bytes before and after."""

    rows: list[dict]
    totals: dict

    def table(self, tablefmt: str = "simple") -> str:
        body = tabulate([list(r.values()) for r in self.rows], headers=list(self.rows[0]) if self.rows else [], tablefmt=tablefmt)
        totals = ", ".join(f"{k}: {v}" for k, v in self.totals.items())
        return f"{body}\n{totals}"

    def to_markdown(self) -> str:
        return self.table("github")

    def to_csv(self) -> str:
        out = io.StringIO()
        if self.rows:
            writer = csv.DictWriter(out, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        return out.getvalue()

    def to_json(self) -> str:
        return json.dumps({"sites": self.rows, "totals": self.totals}, indent=2)

    def __str__(self) -> str:
        return self.table()


def summary(prepared: fx.GraphModule) -> Summary:
    """The per-site summary of a prepared (or loaded) module: formats, rule, bytes before/after,
    and every site left in high precision with its status and reason."""
    if not isinstance(prepared, fx.GraphModule):
        raise MXTypeError(f"summary takes a module from mxfx.prepare or mxfx.load, got {type(prepared).__name__}")
    rows = site_rows(prepared)
    report = getattr(prepared, "mxfx_report", None)
    if report is not None:
        statuses = [site.status for site in report.sites]
    else:  # no report: count the graph's quantized sites (an explicit attention's QK^T and PV rows are one)
        statuses = [r["status"] for r in rows if r["kind"] != "PV"]
    model_before = sum(p.nbytes for p in prepared.parameters()) + sum(r["weight_bytes_before"] for r in rows)
    model_after = sum(p.nbytes for p in prepared.parameters()) + sum(b.nbytes for b in prepared.buffers())
    totals = {f"{status} sites": statuses.count(status) for status in STATUSES}
    totals |= {"model bytes before": model_before, "model bytes after": model_after}
    return Summary(rows, totals)


def graph_text(prepared: fx.GraphModule) -> str:
    """The FX code of the quantized graph, each mxfx op annotated with its format parameters."""
    notes = {}
    for node in prepared.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith("mxfx."):
            notes[node.name] = f"  # MX @ {_site_name(node) or '<root>'}: {_describe_op(node)}"
    lines = []
    for line in prepared.code.splitlines():
        if _ATTRIBUTE_READ.match(line) or "self._guards_fn" in line or not line.strip():
            continue  # `w = self.layer.weight` lines (the op lines name them) and export's input guards
        code = line.split(";  ")[0]  # drop FX's `x = None` bookkeeping
        lines.append(code + notes.get(code.strip().split(" = ")[0], ""))
    return "\n".join(lines)


_ATTRIBUTE_READ = re.compile(r"^\s+\w+ = (self\.|getattr\(self)[^(]*$")


def _describe_op(node: fx.Node) -> str:
    a = node.args
    if node.target is mxfx_ops.linear.default:
        act = _spec_text(a[7], a[8], a[9], a[10]) if a[7] else "high precision"
        return f"weight {_spec_text(a[4], a[5])} (packed), activation {act}"
    if node.target in (mxfx_ops.fake_quantize.default, mxfx_ops.quantize.default):
        return f"{_spec_text(a[1], a[2], a[4], a[5])} along axis {a[3]}"
    if node.target is mxfx_ops.dequantize.default:
        return f"{_spec_text(a[2], a[3])} along axis {a[4]}"
    if node.target is mxfx_ops.attention.default:
        specs = [_arg_text(spec) for spec in a[7:11]]
        return f"Q {specs[0]}, K {specs[1]}, V {specs[2]}, P {specs[3]}"
    return str(node.target)


def draw(prepared: fx.GraphModule, path: str | Path) -> Path:
    """Draw the graph with Graphviz, mxfx nodes highlighted; the file suffix picks the output.

    Args:
        prepared: a module from `mxfx.prepare` or `mxfx.load`.
        path: `.dot` (the Graphviz source: needs only the `pydot` package), `.svg` or `.png`
            (also need Graphviz's `dot` program: `apt-get install graphviz`).

    Returns:
        The path written.

    Raises:
        MissingDependencyError: pydot, or for SVG/PNG Graphviz's `dot`, is not installed.
        MXValueError: another suffix.
    """
    import shutil

    from mxfx.errors import MissingDependencyError, MXValueError

    path = Path(path)
    if path.suffix not in (".dot", ".svg", ".png"):
        raise MXValueError(f"draw writes .dot, .svg or .png files, got {path.name!r}")
    try:
        import pydot  # noqa: F401
    except ImportError:
        raise MissingDependencyError("drawing needs pydot: pip install 'mxfx[graph]' (or pip install pydot)") from None
    if path.suffix != ".dot" and shutil.which("dot") is None:
        raise MissingDependencyError(f"drawing {path.suffix} needs Graphviz's 'dot' program: apt-get install graphviz "
                                     "(or brew install graphviz); a .dot file needs only pydot")
    from torch.fx.passes.graph_drawer import FxGraphDrawer

    mx_ops = {n.name for n in prepared.graph.nodes
              if n.op == "call_function" and getattr(n.target, "namespace", None) == "mxfx"}
    graph = FxGraphDrawer(prepared, "mxfx", ignore_getattr=True).get_main_dot_graph()
    for node in graph.get_nodes():
        if node.get_name().strip('"') in mx_ops:
            node.set("fillcolor", "orange")
            node.set("style", "filled")
    if path.suffix == ".dot":
        path.write_text(graph.to_string())
    else:
        path.write_bytes(graph.create_svg() if path.suffix == ".svg" else graph.create_png())
    return path
