"""GPTQ-quantize the weights of config-selected linears from calibration data.

Calibration runs the exported graph (an `fx.Interpreter`) on the batches given to `prepare` and
records, at each linear site whose rule says `weight_rounding = "gptq"`, the X^T X of the
linear's input (after RotateLinearPass: the rotated input, matching the rotated weight). Every
site's Hessian comes from the same unquantized forward passes (not layer-by-layer sequential
GPTQ, which would feed each layer the outputs of the already quantized ones). `mxfx.gptq` then
quantizes each weight; the linear reads the GPTQ result from a new buffer, and the codes and
scales GPTQ computed ride along on that get_attr node (`PRECOMPUTED_META`) for InsertQDQPass to
store as they are (re-quantizing could pick other scales). With `mxfx.prepare(..., gptq_resume=path)`
each site's result is saved as it is computed and a later run loads it (`mxfx.recovery.gptq_resume`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from mxfx.passes._utils import PRECOMPUTED_META, count_rewrites, create_get_attr, evaluate_chain, fake_mode_of, finish
from mxfx.passes.match_linear_sites import linear_weight
from mxfx.passes.rotate_linear import attribute, drop_unread
from torch import fx
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from mxfx import _compat
from mxfx.errors import ConfigError
from mxfx.graph.config import QuantConfig
from mxfx.graph.sites import site_of
from mxfx.progress import Progress, Reporter
from mxfx.recovery.gptq import gptq_quantize
from mxfx.recovery.gptq_resume import GPTQResume, run_record, site_record
from mxfx.resume_files import digest

log = logging.getLogger(__name__)
DONE_META = "mxfx_gptq"


def calibration_inputs(batch) -> list:
    """The flat inputs of one calibration batch: a tensor, a tuple of positional inputs, or a
    dict with "args" (tuple) and/or "kwargs" (dict)."""
    if isinstance(batch, torch.Tensor):
        args, kwargs = (batch,), {}
    elif isinstance(batch, tuple):
        args, kwargs = batch, {}
    elif isinstance(batch, dict) and set(batch) <= {"args", "kwargs"}:
        args, kwargs = tuple(batch.get("args", ())), dict(batch.get("kwargs", {}))
    else:
        raise ConfigError("a calibration batch is a tensor, a tuple of positional inputs, or a dict with "
                          f"'args' and 'kwargs'; got {type(batch).__name__}")
    return _compat.tree_leaves((args, kwargs))


class _Recorder(fx.Interpreter):
    """Runs the graph and adds X^T X of the inputs of the watched linear nodes (by input node)."""

    def __init__(self, gm: fx.GraphModule, watched: dict[str, str]) -> None:
        super().__init__(gm)
        self.watched = watched  # linear node name -> input node name
        self.hessians: dict[str, torch.Tensor] = {}

    def run_node(self, node: fx.Node):
        source = self.watched.get(node.name)
        if source is not None and source not in self.done:  # q, k and v may share their input
            self.done.add(source)
            x = self.env[node.args[0]].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)
            self.hessians[source] = self.hessians.get(source, 0) + x.T @ x
        return super().run_node(node)

    def run_batch(self, inputs: list) -> None:
        self.done: set[str] = set()
        super().run(*inputs)


class GPTQWeightsPass(PassBase):
    """Replace the weight of each quantized linear site whose rule says `weight_rounding = "gptq"`
    by its GPTQ result on the site's MX grid.

    Requires: MatchLinearSitesPass annotations (and RotateLinearPass, if any); runs before
    InsertQDQPass. Ensures: the new get_attr nodes carry meta["val"] and the GPTQ codes; sites
    are marked, so running twice is a no-op.

    With `resume` (a directory, `mxfx.recovery.gptq_resume`), each site's result is saved as it is
    computed, and sites saved by an earlier run of the same model, config and calibration batches are
    loaded instead of computed; calibration is skipped when every site is saved.

    Raises:
        ConfigError: a site asks for GPTQ and no calibration batches were given.
        ResumeError: a saved result of another run in `resume`.
    """

    def __init__(self, config: QuantConfig, calibration=None, progress: Progress = True,
                 resume: str | Path | None = None) -> None:
        self.config = config
        self.calibration = calibration
        self.progress = progress  # mxfx.progress: a bar on a terminal, else log lines; per batch, then per layer
        self.resume = resume  # a directory of saved site results (mxfx.recovery.gptq_resume), or None

    def call(self, gm: fx.GraphModule) -> PassResult:
        sites = []
        for node in gm.graph.nodes:
            site, found = site_of(node), linear_weight(node)
            if site is None or found is None or not site.quantized or DONE_META in node.meta:
                continue
            weight = found  # (get_attr, chain): the weight the linear reads
            if site.weight_rounding == "gptq" and site.weight is not None:
                sites.append((node, site, weight))
        if not sites:
            count_rewrites(gm, type(self).__name__, 0)
            return PassResult(gm, False)
        if self.calibration is None:
            raise ConfigError(f"{sites[0][1].rule_label or 'a rule'} (site {sites[0][1].fqn}) asks for weight_rounding = 'gptq': pass calibration "
                              "batches to mxfx.prepare(..., calibration=[...])")
        batches = [calibration_inputs(batch) for batch in self.calibration]
        store, records, saved = None, {}, {}
        if self.resume is not None:
            store = GPTQResume(self.resume, run_record(graph_tensors(gm), batches))
            records = {node: site_record("linear", site.fqn, site.weight, _weight_of(gm, weight))
                       for node, site, weight in sites}
            saved = store.load_all(records)
            log.info("GPTQ: %d of %d sites resumed from %s", len(saved), len(sites), store.path)
        hessians = {}
        if len(saved) < len(sites):  # every site saved: no Hessian is needed
            hessians = self._calibrate(gm, sites, batches)
            for node, found in saved.items():
                records[node]["hessian"] = digest(hessians[node.args[0].name])
                store.check_hessian(found, records[node])
        fake_mode = fake_mode_of(gm)
        replaced: set[str] = set()
        reporter = Reporter(self.progress, len(sites), "GPTQ", done=len(saved))
        for count, (node, site, weight) in enumerate(sites, 1):
            attr, _ = weight
            if node in saved:
                q, data = GPTQResume.result(saved[node], attribute(gm, str(attr.target)).device)
            else:
                hessian = hessians[node.args[0].name]
                q, data = gptq_quantize(_weight_of(gm, weight), hessian, site.weight)
                q = q.to(node.args[1].meta["val"].dtype)
                if store is not None:
                    store.save({**records[node], "hessian": digest(hessian)}, q, data)
            name = f"mxfx_gptq{count - 1}_" + str(attr.target).replace(".", "_")
            gm.register_buffer(name, q)
            with gm.graph.inserting_before(node):
                new_weight = create_get_attr(gm, name, fake_mode)
            new_weight.meta[PRECOMPUTED_META] = data
            node.update_arg(1, new_weight)
            replaced.add(str(attr.target))
            node.meta[DONE_META] = True
            if node not in saved:
                reporter.update(site.fqn)
        reporter.close()
        finish(gm)
        drop_unread(gm, replaced)
        count_rewrites(gm, type(self).__name__, len(sites))
        return PassResult(gm, True)

    def _calibrate(self, gm: fx.GraphModule, sites: list, batches: list[list]) -> dict[str, torch.Tensor]:
        """X^T X of each site's input, by input node name, over all batches."""
        recorder = _Recorder(gm, {node.name: node.args[0].name for node, _, _ in sites})
        with torch.no_grad(), Reporter(self.progress, len(batches), "GPTQ calibration") as reporter:
            for index, inputs in enumerate(batches):
                recorder.run_batch(inputs)
                reporter.update(f"batch {index + 1}")
        if not recorder.hessians:
            raise ConfigError("GPTQ calibration: the calibration batches are empty")
        return recorder.hessians


def _weight_of(gm: fx.GraphModule, weight: tuple) -> torch.Tensor:
    """The (out, in) weight a linear reads: its get_attr's tensor through the chain of views."""
    attr, chain = weight
    return evaluate_chain(attribute(gm, str(attr.target)).detach(), attr, chain).contiguous()


def graph_tensors(gm: fx.GraphModule) -> list[tuple[str, torch.Tensor]]:
    """The graph's parameters and buffers, by name (what a GPTQ resume file's run digest covers)."""
    return [*gm.named_parameters(), *gm.named_buffers()]
