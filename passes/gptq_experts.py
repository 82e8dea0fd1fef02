"""GPTQ-quantize the stacked weights of config-selected mixture-of-experts sites, one expert at a time.

The expert form of GPTQWeightsPass: calibration runs the exported graph on the batches given to
`prepare` and records, at each expert product whose rule says `weight_rounding = "gptq"`, one
Hessian per expert, X_e^T X_e of the rows routed to expert e (grouped products: the rows between
consecutive offsets; gathered bmm: the rows whose expert id is e; bmm against the stack: batch
entry e), after RotateExpertsPass's
rotation if any. Each expert matrix (out, in) is then quantized by `mxfx.gptq` with its own
Hessian; the stacked result replaces the parameter and its codes ride along on the new get_attr
(`PRECOMPUTED_META`) for InsertExpertQDQPass to store as they are.

An expert that no calibration token reached has no Hessian (GPTQ would zero it): it is rounded to
nearest on the same MX grid instead, and prepare warns once per site with the expert indices.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from mxfx.passes._utils import PRECOMPUTED_META, count_rewrites, create_get_attr, fake_mode_of, finish
from mxfx.passes.gptq_weights import calibration_inputs, graph_tensors
from mxfx.passes.insert_expert_qdq import replace_weight
from mxfx.passes.match_expert_sites import GROUPED_MM, ExpertProduct, expert_product
from mxfx.passes.rotate_linear import attribute, drop_unread
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx.errors import ConfigError, MXFXWarning
from mxfx.graph.config import MXSpec, QuantConfig
from mxfx.graph.sites import EXPERT_FORMS, site_of
from mxfx.numerics import api
from mxfx.progress import Progress, Reporter
from mxfx.recovery.gptq import gptq_quantize
from mxfx.recovery.gptq_resume import GPTQResume, run_record, site_record
from mxfx.resume_files import digest

log = logging.getLogger(__name__)
DONE_META = "mxfx_expert_gptq"


class _Recorder(fx.Interpreter):
    """Runs the graph and adds, per watched expert product and expert, X_e^T X_e of its rows."""

    def __init__(self, gm: fx.GraphModule, watched: dict[fx.Node, ExpertProduct]) -> None:
        super().__init__(gm)
        self.watched = watched
        self.hessians: dict[str, list] = {node.name: [None] * p.shape[0] for node, p in watched.items()}
        # routing values, kept when computed: the Interpreter frees a value after its last reader,
        # which for the expert ids can come before the product (the bias gather reads them too)
        self.routing = {p.routing for p in watched.values() if p.routing is not None}
        self.kept: dict[fx.Node, torch.Tensor] = {}

    def run_node(self, node: fx.Node):
        product = self.watched.get(node)
        if product is not None:
            x = self.env[node.args[product.x_index]].detach().to(torch.float32)
            x = x.movedim(product.x_axis, -1)
            routing = self.kept[product.routing] if product.routing is not None else None
            hessians = self.hessians[node.name]
            for expert, rows in enumerate(_rows_per_expert(x, routing, product)):
                if rows.shape[0]:
                    h = rows.T @ rows
                    hessians[expert] = h if hessians[expert] is None else hessians[expert] + h
        out = super().run_node(node)
        if node in self.routing:
            self.kept[node] = out
        return out


def _rows_per_expert(x: torch.Tensor, routing: torch.Tensor | None, product: ExpertProduct) -> list[torch.Tensor]:
    """The (rows, in) inputs of each expert: between consecutive offsets (grouped), where the
    gathered expert id is e (bmm), or batch entry e (bmm against the stack itself); x's other axes
    flattened into rows."""
    experts, in_features = product.shape[0], x.shape[-1]
    if routing is None:
        return [x[e].reshape(-1, in_features) for e in range(experts)]
    if product.form == GROUPED_MM:
        ends = routing.tolist()
        starts = [0, *ends[:-1]]
        return [x[start:end].reshape(-1, in_features) for start, end in zip(starts, ends)]
    return [x[routing == e].reshape(-1, in_features) for e in range(experts)]


class GPTQExpertsPass(PassBase):
    """Replace the stacked weight of each quantized expert site whose rule says
    `weight_rounding = "gptq"` by its per-expert GPTQ result on the site's MX grid.

    Requires: MatchExpertSitesPass annotations (and RotateExpertsPass, if any); runs before
    InsertExpertQDQPass. Ensures: the new get_attr nodes carry meta["val"] and the stacked GPTQ
    codes; products are marked, so running twice is a no-op.

    With `resume` (a directory, `mxfx.recovery.gptq_resume`), each expert site's result (all its
    experts: the site is the unit) is saved as it is computed, and sites saved by an earlier run of the
    same model, config and batches are loaded instead; calibration is skipped when every site is saved.

    Raises:
        ConfigError: a site asks for GPTQ and no calibration batches were given, or the batches are empty.
        ResumeError: a saved result of another run in `resume`.
    """

    def __init__(self, config: QuantConfig, calibration=None, progress: Progress = True,
                 resume: str | Path | None = None) -> None:
        self.config = config
        self.calibration = calibration
        self.progress = progress  # mxfx.progress: per calibration batch, then per expert site
        self.resume = resume  # a directory of saved site results (mxfx.recovery.gptq_resume), or None

    def call(self, gm: fx.GraphModule) -> PassResult:
        sites = {}
        for node in gm.graph.nodes:
            site = site_of(node)
            if site is None or site.form not in EXPERT_FORMS or not site.quantized or DONE_META in node.meta:
                continue
            if site.weight_rounding == "gptq" and site.weight is not None:
                sites[node] = (site, expert_product(node), site.weight)
        if not sites:
            count_rewrites(gm, type(self).__name__, 0)
            return PassResult(gm, False)
        if self.calibration is None:
            raise ConfigError(f"expert site {next(iter(sites.values()))[0].fqn} asks for weight_rounding = 'gptq': "
                              "pass calibration batches to mxfx.prepare(..., calibration=[...])")
        batches = [calibration_inputs(batch) for batch in self.calibration]
        store, records, saved = None, {}, {}
        if self.resume is not None:
            store = GPTQResume(self.resume, run_record(graph_tensors(gm), batches))
            records = {node: site_record("experts", site.fqn, spec, attribute(gm, str(product.attr.target)).detach())
                       for node, (site, product, spec) in sites.items()}
            saved = store.load_all(records)
            log.info("GPTQ: %d of %d expert sites resumed from %s", len(saved), len(sites), store.path)
        hessians = {}
        if len(saved) < len(sites):  # every site saved: no Hessian is needed
            hessians = self._calibrate(gm, sites, batches)
            for node, found in saved.items():
                records[node]["hessian"] = _hessian_digests(hessians[node.name])
                store.check_hessian(found, records[node])
        fake_mode = fake_mode_of(gm)
        replaced: set[str] = set()
        reporter = Reporter(self.progress, len(sites), "GPTQ experts", done=len(saved))
        for count, (node, (site, product, spec)) in enumerate(sites.items()):
            target = str(product.attr.target)
            tensor = attribute(gm, target).detach()
            if node in saved:
                (q, data), unseen = GPTQResume.result(saved[node], tensor.device), saved[node]["unseen"]
            else:
                q, data, unseen = _quantize_experts(tensor, product.param_axis, hessians[node.name], spec)
                if store is not None:
                    record = {**records[node], "hessian": _hessian_digests(hessians[node.name])}
                    store.save(record, q, data, unseen=unseen)
            if unseen:
                warnings.warn(f"mxfx: GPTQ at expert site {site.fqn}: no calibration token reached expert(s) "
                              f"{unseen}; they are rounded to nearest instead", MXFXWarning, stacklevel=2)
            name = f"mxfx_gptq_experts{count}_" + target.replace(".", "_")
            gm.register_buffer(name, q)
            with gm.graph.inserting_before(product.chain[0] if product.chain else node):
                new = create_get_attr(gm, name, fake_mode)
            new.meta[PRECOMPUTED_META] = data
            replace_weight(gm, node, product, new)
            replaced.add(target)
            node.meta[DONE_META] = True
            if node not in saved:
                reporter.update(f"expert site {site.fqn}")
        reporter.close()
        finish(gm)
        drop_unread(gm, replaced)
        count_rewrites(gm, type(self).__name__, len(sites))
        return PassResult(gm, True)

    def _calibrate(self, gm: fx.GraphModule, sites: dict, batches: list[list]) -> dict[str, list]:
        """Per expert site (by node name), each expert's X_e^T X_e over all batches (None: no rows)."""
        recorder = _Recorder(gm, {node: product for node, (_, product, _) in sites.items()})
        with torch.no_grad(), Reporter(self.progress, len(batches), "GPTQ experts calibration") as reporter:
            for index, inputs in enumerate(batches):
                recorder.run(*inputs)
                reporter.update(f"batch {index + 1}")
        if not batches:
            raise ConfigError("GPTQ calibration: the calibration batches are empty")
        return recorder.hessians


def _hessian_digests(hessians: list) -> list:
    return [None if h is None else digest(h) for h in hessians]


def _quantize_experts(tensor: torch.Tensor, axis: int, hessians: list, spec: MXSpec):
    """GPTQ each expert matrix (out, in) of a stacked parameter with its Hessian (round to nearest
    without one). Returns (the stacked result in the parameter's layout and dtype, its MXData blocked
    along `axis`, the experts without a Hessian)."""
    results, codes, scales, unseen = [], [], [], []
    for expert, hessian in enumerate(hessians):
        weight = tensor[expert] if axis == 2 else tensor[expert].T  # (out, in)
        if hessian is None:
            unseen.append(expert)
            data = api.quantize(weight.contiguous(), spec.format, block_size=spec.block_size, axis=-1,
                                scale_mode=spec.scale_mode, rounding=spec.rounding)
            q = data.dequantize(torch.float32)
        else:
            q, data = gptq_quantize(weight, hessian, spec)
        results.append(q)
        codes.append(data.codes)
        scales.append(data.scales)
    stacked = torch.stack(results)  # (E, out, in)
    if axis == 1:
        stacked = stacked.transpose(1, 2)
    data = api.MXData(torch.stack(codes), torch.stack(scales), api.check_options(spec.format, spec.block_size),
                      spec.block_size, axis, tuple(tensor.shape), tensor.dtype, spec.scale_mode, spec.rounding)
    return stacked.to(tensor.dtype).contiguous(), data, unseen
