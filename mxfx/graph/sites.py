"""The site layer: one typed record per place in a graph where MX quantization can happen.

A *site* is a linear-like product with a parameter operand (`nn.Linear`, `F.linear`, `x @ W.T`,
GPT-2's `Conv1D`, a slice of a packed `in_proj_weight`) or an attention (an SDPA call, or the
QK^T -> softmax -> PV chain of an explicit implementation). The passes that find sites annotate
their graph nodes with a `Site` under `SITE_META`; everything else (prepare's report, the
summary, sensitivity, search) reads sites through this module's functions, never through
node-metadata strings or another module's privates.

    sites = mxfx.find_sites(mxfx.export(model, (x,)), config)   # what prepare would do, nothing changed
    for site in prepared.mxfx_report.sites: print(site.fqn, site.kind, site.status)

A site mxfx saw but did not quantize keeps a record too, with its status and reason, so that
nothing is missed in silence (`Site.quantized`, `Site.supported`, `PrepareReport.unquantized`):
a product with a parameter operand in a form mxfx does not rewrite is UNSUPPORTED, one whose
shape/axis check failed is CHECK_FAILED (both annotate the product node itself).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import fx

from mxfx.errors import MXValueError
from mxfx.graph.config import AttentionSpec, MXSpec, QuantConfig

# node.meta keys, defined once. SITE_META holds the Site of the node that *is* the site (the
# canonical aten.linear, the SDPA or mxfx.attention call, or the softmax of an explicit attention).
SITE_META = "mxfx_site"

LINEAR, ATTENTION = "linear", "attention"
KINDS = (LINEAR, ATTENTION)
# Site.form of a mixture-of-experts site: a stacked [E, out, in] (or [E, in, out]) parameter applied
# per expert, by a grouped product of expert-sorted rows, or by bmm with the gathered W[expert_ids].
GROUPED_MM, EXPERT_BMM = "grouped_mm", "expert_bmm"
EXPERT_FORMS = (GROUPED_MM, EXPERT_BMM)

# Site.status values
QUANTIZED = "quantized"  # a rule quantizes it (at least one operand)
SKIPPED = "skipped"  # the first matching rule says skip (or quantizes nothing of this kind)
NO_RULE = "no rule"  # no rule matched: stays in high precision
UNSUPPORTED = "unsupported"  # looks like a site, but its form is not one mxfx quantizes
CHECK_FAILED = "check failed"  # the form matched, a shape/axis check did not: left alone
STATUSES = (QUANTIZED, SKIPPED, NO_RULE, UNSUPPORTED, CHECK_FAILED)


@dataclasses.dataclass(frozen=True)
class Site:
    """One linear or attention site of a graph, what the config decided for it, and why.

    `fqn` is what config rules match (`re.fullmatch`): the owning module's path
    (`transformer.h.0.attn.c_attn`), with a suffix for a slice of a packed weight (`.q`, `.k`,
    `.v`), or the parameter path without `.weight` for `F.linear` on a bare parameter. A
    mixture-of-experts site is named by its stacked parameter (`model.layers.0.mlp.experts.down_proj`).
    """

    fqn: str
    kind: str  # LINEAR or ATTENTION
    form: str  # how it appears in the graph: "linear", "addmm", "mm", "matmul", "einsum", "sdpa", ...
    node: str  # name of the graph node annotated with this site (for reports and debugging)
    status: str = NO_RULE  # one of STATUSES
    reason: str = ""  # why a site is not quantized (empty when it is)
    rule: int | None = None  # index of the first matching rule in the config, None: no rule matched
    rule_label: str = ""  # that rule's label for messages ("rule 2 ('.*')", "rule 0 in x.toml")
    weight: MXSpec | None = None  # linear: the weight's spec (blocked along in_features)
    activation: MXSpec | None = None  # linear: the input's spec (blocked along in_features)
    weight_storage: str = ""  # linear: "packed" or "simulated" when the weight is quantized
    attention: AttentionSpec | None = None  # attention: the operands' specs
    weight_target: str = ""  # linear: the parameter/buffer path the weight is read from
    weight_shape: tuple[int, ...] = ()  # linear: (out_features, in_features); experts: (E, out_features, in_features)
    nodes: tuple[str, ...] = ()  # attention (explicit form): the QK^T and PV matmul nodes
    rotation_block: int = 0  # block-Hadamard size the rule rotates with (linear: x and W; attention: Q and K), 0: none
    weight_rounding: str = ""  # linear: "nearest" or "gptq" when the weight is quantized

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise MXValueError(f"Site.kind must be one of {KINDS}, got {self.kind!r}")
        if self.status not in STATUSES:
            raise MXValueError(f"Site.status must be one of {STATUSES}, got {self.status!r}")

    @property
    def quantized(self) -> bool:
        return self.status == QUANTIZED

    @property
    def supported(self) -> bool:
        """Whether mxfx can quantize this site (its form is rewritten and checked): False for
        UNSUPPORTED and CHECK_FAILED records, which stay in the graph as they were."""
        return self.status not in (UNSUPPORTED, CHECK_FAILED)

    @property
    def experts(self) -> int:
        """The number of experts of a mixture-of-experts site (`form` in EXPERT_FORMS), else 0."""
        return self.weight_shape[0] if self.form in EXPERT_FORMS and self.weight_shape else 0

    @property
    def weight_numel(self) -> int:
        numel = 1
        for size in self.weight_shape:
            numel *= size
        return numel if self.weight_shape else 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (specs as their `to_arg()` strings)."""
        out = dataclasses.asdict(self)
        for key in ("weight", "activation"):
            spec = getattr(self, key)
            out[key] = spec.to_arg() if spec is not None else None
        if self.attention is not None:
            out["attention"] = {k: (None if v is None else v.to_arg())
                                for k, v in ((f.name, getattr(self.attention, f.name))
                                             for f in dataclasses.fields(self.attention))}
        out["weight_shape"] = list(self.weight_shape)
        out["nodes"] = list(self.nodes)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Site:
        """Inverse of `to_dict` (a report read back from a .pt2 file)."""
        data = dict(data)
        for key in ("weight", "activation"):
            data[key] = MXSpec.from_arg(data.get(key) or "")
        if data.get("attention"):
            data["attention"] = AttentionSpec(**{k: MXSpec.from_arg(v or "") for k, v in data["attention"].items()})
        data["weight_shape"] = tuple(data.get("weight_shape") or ())
        data["nodes"] = tuple(data.get("nodes") or ())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def site_of(node: fx.Node) -> Site | None:
    """The Site a node is annotated with, or None."""
    site = node.meta.get(SITE_META)
    return site if isinstance(site, Site) else None


def annotate(node: fx.Node, site: Site) -> bool:
    """Annotate `node` with `site`; returns whether the annotation changed (for honest `modified`)."""
    if node.meta.get(SITE_META) == site:
        return False
    node.meta[SITE_META] = site
    return True


def decide(config: QuantConfig, fqn: str, kind: str) -> dict[str, Any]:
    """The Site fields a config decides for a site named `fqn` of `kind` (first matching rule wins)."""
    match = config.first_match(fqn)
    if match is None:
        return {"status": NO_RULE, "reason": "no rule matched", "rule": None, "rule_label": ""}
    index, rule = match
    fields: dict[str, Any] = {"rule": index, "rule_label": config.rule_label(index)}
    if kind == LINEAR and rule.quantizes_linear:
        return fields | {"status": QUANTIZED, "weight": rule.weight, "activation": rule.activation,
                         "weight_storage": rule.weight_storage if rule.weight is not None else "",
                         "weight_rounding": rule.weight_rounding if rule.weight is not None else "",
                         "rotation_block": rule.rotation_block or 0}
    if kind == ATTENTION and rule.quantizes_attention:
        return fields | {"status": QUANTIZED, "attention": rule.attention,
                         "rotation_block": rule.attention_rotation_block or 0}
    why = "the rule says skip" if rule.skip else f"the rule quantizes no {kind} operand"
    return fields | {"status": SKIPPED, "reason": why}


def graph_sites(gm: fx.GraphModule) -> list[Site]:
    """Every Site annotated on `gm`'s nodes, in graph order."""
    return [site for node in gm.graph.nodes if (site := site_of(node)) is not None]
