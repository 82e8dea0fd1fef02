"""A noise floor for MX evaluations: how much of a difference between two numbers is signal?

An MX simulation is exact given its inputs, but its inputs come from non-MX ops whose last bit
depends on details that do not change the format: the order a GEMM or a reduction accumulates in
(batch size, compiled vs eager kernels), a vectorised `exp` against a scalar one. A last-bit change
that moves a value across an MX rounding boundary moves the quantized value by a whole quantum,
and such flips compound over depth: measured on pretrained models, compiled and eager runs of
one config differ by up to 3% in perplexity, as much as the effects users compare.

`noise_floor` repeats a measurement under such perturbations and reports the spread:

- "jitter": a 1-ulp jitter (`nextafter` up or down) of a random half of the elements entering
  every MX quantizer (the activation operand of each mxfx op), one run per seed: what a last-bit
  difference in the op before each quantizer does, which is how compiled and eager runs differ;
- "split": the batch run in two parts (another GEMM and reduction blocking), outputs concatenated;
- "compiled": the prepared module run through `torch.compile` (opt-in: compiling takes minutes).

Reading it: `spread` is the largest minus the smallest value of a metric over the unperturbed run
and every perturbed run. Two measurements a and b differ in a way the simulation can resolve only
if `significant(a, b, floor)`, i.e. |a - b| > floor, with floor the larger spread of the two.
Tables mark a value that is *within* the floor of its reference with a trailing `~`
(`render(value, reference, floor)`: "31.2~" reads "indistinguishable from the reference").
`mxfx.search(..., noise=N)` marks searched front points this way against the best uniform config
at or under their budget; `mxfx.sensitivity(..., noise=N)` marks rows whose damage is within the
floor of no change (see those modules for the exact references and floors).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from mxfx import _compat
from mxfx.errors import InputGuardError, MXValueError
from mxfx.numerics import ops as _ops  # noqa: F401  (registers the torch.ops.mxfx ops named here)

pytree = _compat.pytree_module()  # torch.utils._pytree (private in torch 2.13/2.14)

log = logging.getLogger(__name__)
SOURCES = ("jitter", "split", "compiled")
DEFAULT_SOURCES = ("jitter", "split")
WITHIN_FLOOR = "~"  # appended to a rendered value within the noise floor of its reference


def jitter(x: torch.Tensor, seed: int, fraction: float = 0.5) -> torch.Tensor:
    """`x` with a random `fraction` of its elements moved by one ulp (up or down, at random);
    non-float tensors are returned as they are. Deterministic in `seed`."""
    if not x.is_floating_point():
        return x
    generator = torch.Generator(device="cpu").manual_seed(seed)
    chosen = torch.rand(x.shape, generator=generator) < fraction
    up = torch.rand(x.shape, generator=generator) < 0.5
    target = torch.where(up, torch.tensor(math.inf, dtype=x.dtype), torch.tensor(-math.inf, dtype=x.dtype))
    moved = torch.nextafter(x, target.to(x.device))
    return torch.where(chosen.to(x.device) & x.isfinite(), moved, x)


def _jitter_input(x, seed: int):
    """The graph-side jitter call (a plain function: fx calls it by name)."""
    return jitter(x, seed) if isinstance(x, torch.Tensor) else x


# The MX ops whose activation operands are jittered, and which of their arguments those are.
_JITTERED_ARGS = {  # by schema name, bound through the op's schema (positional or keyword)
    torch.ops.mxfx.linear.default: ("x",),
    torch.ops.mxfx.fake_quantize.default: ("x",),
    torch.ops.mxfx.quantize.default: ("x",),
    torch.ops.mxfx.attention.default: ("query", "key", "value"),
}


def jittered_copy(prepared: fx.GraphModule, seed: int) -> fx.GraphModule:
    """A copy of `prepared` (sharing its parameters and buffers) in which the activation operand
    of every MX op gets a 1-ulp jitter on a random half of its elements (deterministic in `seed`):
    what a last-bit difference in the non-MX op before each quantizer would do."""
    graph = fx.Graph()
    graph._codegen = prepared.graph._codegen  # the module's call signature and output structure
    env: dict[fx.Node, fx.Node] = {}
    count = 0
    for node in prepared.graph.nodes:
        if node.op == "output":
            graph.output(pytree.tree_map(lambda n: env[n] if isinstance(n, fx.Node) else n, node.args[0]))
            continue
        args, kwargs = list(node.args), dict(node.kwargs)
        names = _JITTERED_ARGS.get(node.target, ()) if node.op == "call_function" else ()
        positions = [a.name for a in node.target._schema.arguments] if names else []
        for name in names:
            index = positions.index(name)
            where, key = (args, index) if index < len(args) else (kwargs, name)
            if isinstance(where.get(key) if where is kwargs else where[key], fx.Node):
                count += 1
                where[key] = graph.call_function(_jitter_input, (env[where[key]], seed * 1000003 + count))
        new = graph.node_copy(node, lambda n: env[n])
        if names:
            new.args = tuple(env[a] if isinstance(a, fx.Node) and a in env else a for a in args)
            new.kwargs = {k: env[v] if isinstance(v, fx.Node) and v in env else v for k, v in kwargs.items()}
        env[node] = new
    return fx.GraphModule(prepared, graph)


def _split(batch: tuple) -> tuple[tuple, tuple] | None:
    """The batch cut in two along dim 0 (every tensor with the first tensor's leading size)."""
    leaves = [leaf for leaf in pytree.tree_leaves(batch) if isinstance(leaf, torch.Tensor) and leaf.dim() > 0]
    if not leaves or leaves[0].shape[0] < 2:
        return None
    n = leaves[0].shape[0]
    cut = n // 2

    def part(lo: int, hi: int):
        return pytree.tree_map(
            lambda v: v[lo:hi] if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n else v, batch)

    return part(0, cut), part(cut, n)


@dataclasses.dataclass(frozen=True)
class NoiseFloor:
    """A measurement and its spread under format-preserving perturbations."""

    metrics: dict[str, float]  # the unperturbed (eager) measurement
    runs: tuple[tuple[str, dict[str, float]], ...]  # (perturbation, its measurement)
    skipped: tuple[tuple[str, str], ...] = ()  # (perturbation, why it was not run)

    def spread(self, metric: str) -> float:
        """Largest minus smallest value of `metric` over the unperturbed and perturbed runs
        (0.0 when they all agree; inf when some are finite and some are not)."""
        values = [self.metrics[metric], *(run[metric] for _, run in self.runs)]
        if all(v == values[0] for v in values):
            return 0.0
        return max(values) - min(values) if all(math.isfinite(v) for v in values) else math.inf

    def range(self, metric: str) -> tuple[float, float]:
        """(smallest, largest) value of `metric` over the unperturbed and perturbed runs (error bars)."""
        values = [self.metrics[metric], *(run[metric] for _, run in self.runs)]
        return min(values), max(values)

    @property
    def spreads(self) -> dict[str, float]:
        return {metric: self.spread(metric) for metric in self.metrics}

    def to_dict(self) -> dict:
        return {"metrics": dict(self.metrics), "spread": self.spreads,
                "runs": [[label, dict(m)] for label, m in self.runs], "skipped": [list(s) for s in self.skipped]}

    @classmethod
    def from_dict(cls, data: dict) -> NoiseFloor:
        """The inverse of `to_dict` (the spreads are recomputed from the runs)."""
        return cls(dict(data["metrics"]), tuple((label, dict(m)) for label, m in data["runs"]),
                   tuple((source, why) for source, why in data.get("skipped", ())))


def significant(a: float, b: float, floor: float) -> bool:
    """Whether a and b differ by more than the noise floor (use the larger spread of the two).

    Equal values (infinities included) are never significant; a NaN is always reported as
    significant (it is never "within the noise")."""
    if a == b:
        return False
    if math.isnan(a) or math.isnan(b) or math.isnan(floor):
        return True
    return abs(a - b) > floor


def render(value: float, reference: float, floor: float, fmt: str = ".4g") -> str:
    """`value` formatted, with a trailing `~` when it is within `floor` of `reference`."""
    text = format(value, fmt)
    return text + WITHIN_FLOOR if not significant(value, reference, floor) else text


def check_arguments(noise: int, sources: Sequence[str]) -> None:
    """Refuse a noise count below 1 (or not an integer) and unknown sources."""
    if isinstance(noise, bool) or not isinstance(noise, int) or noise < 1:
        raise MXValueError(f"noise must be an integer >= 1 (the number of jittered repeats), got {noise!r}")
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        raise MXValueError(f"unknown noise source(s) {unknown}; valid: {', '.join(SOURCES)}")


def noise_floor_of(
    prepared: fx.GraphModule,
    evaluate: Callable[[torch.nn.Module], dict[str, float]],
    noise: int,
    sources: Sequence[str] = DEFAULT_SOURCES,
) -> NoiseFloor:
    """`noise_floor` for an evaluation that runs its own inputs (`evaluate(module) -> metrics`,
    e.g. a search's `eval_fn`): the jitters and "compiled" run as in `noise_floor`; "split" needs
    the batches, so it is listed in `skipped` with the reason, never silently dropped."""
    check_arguments(noise, sources)
    runs: list[tuple[str, dict]] = []
    skipped: list[tuple[str, str]] = []
    with torch.no_grad():
        metrics = evaluate(prepared)
        if "jitter" in sources:
            for seed in range(noise):
                runs.append((f"jitter seed {seed}", evaluate(jittered_copy(prepared, seed))))
        if "split" in sources:
            skipped.append(("split", "the evaluation function runs its own inputs: no batch to split"))
        if "compiled" in sources:
            runs.append(("compiled", evaluate(torch.compile(prepared))))
    return NoiseFloor(metrics, tuple(runs), tuple(skipped))


def noise_floor(
    prepared: fx.GraphModule,
    batches: Sequence[tuple],
    measure: Callable[[list[Any]], dict[str, float]],
    noise: int,
    sources: Sequence[str] = DEFAULT_SOURCES,
) -> NoiseFloor:
    """Measure `prepared` on `batches`, then again under perturbations that keep the format.

    Args:
        prepared: a module from `mxfx.prepare`.
        batches: tuples of positional inputs.
        measure: maps the list of the module's outputs (one per batch) to metrics.
        noise: the number of jitter runs (seeds 0..noise-1); "split" and "compiled" run once each.
        sources: which perturbations to run, among SOURCES.

    Returns:
        A NoiseFloor; a perturbation that cannot run (a batch of one cannot be split, the
        prepared module refuses the split's shapes) is listed in `skipped` with the reason.

    Raises:
        MXValueError: noise < 1, or an unknown source.
    """
    check_arguments(noise, sources)
    runs: list[tuple[str, dict]] = []
    skipped: list[tuple[str, str]] = []
    with torch.no_grad():
        metrics = measure([prepared(*batch) for batch in batches])
        if "jitter" in sources:
            for seed in range(noise):
                jittered = jittered_copy(prepared, seed)
                outputs = [jittered(*batch) for batch in batches]
                runs.append((f"jitter seed {seed}", measure(outputs)))
        if "split" in sources:
            try:
                outputs = []
                for batch in batches:
                    parts = _split(batch)
                    if parts is None:
                        raise MXValueError("a batch has a leading dimension below 2")
                    halves = [prepared(*part) for part in parts]
                    outputs.append(pytree.tree_map(lambda *xs: torch.cat(xs) if xs[0].dim() else xs[0], *halves))
                runs.append(("batch split", measure(outputs)))
            except (InputGuardError, MXValueError) as error:
                skipped.append(("split", str(error).splitlines()[0][:200]))
                log.info("noise floor: batch split not measured: %s", error)
        if "compiled" in sources:
            compiled = torch.compile(prepared)
            runs.append(("compiled", measure([compiled(*batch) for batch in batches])))
    return NoiseFloor(metrics, tuple(runs), tuple(skipped))
