"""An exact budget solver for mixed precision: a multiple-choice knapsack.

Each site picks exactly one candidate; minimize the sum of the chosen candidates' losses subject
to a total weight-bit cost <= a budget and, optionally, a total activation-bit cost <= a second
budget. Costs are exact rationals (`fractions.Fraction`): a site's cost is `numel * bits`, and MX
bits are `element bits + 8 / block_size` (OCP MX v1.0 §5: one 8-bit E8M0 scale per block), so
every cost is an integer once multiplied by the least common multiple of the denominators.

Dynamic programming over integer costs (the approach of AutoRound's AutoScheme; ModelOpt's
`auto_quantize` solves the same problem as an LP):

1. each site's cheapest candidate is its baseline: the DP runs over the *extra* cost above it, and
   the budget becomes the slack above the sum of the baselines;
2. the extra costs are divided by their greatest common divisor (on a transformer all weight
   matrices share a large common factor: SmolLM2's 210 linears reduce to a few thousand states);
3. if the state space still exceeds `max_states`, costs are rounded to the nearest multiple of a
   quantum and a repair step tightens the capacity until the exact cost of the answer fits
   (`Solution.exact` is False then, `Solution.quantum` says by how much costs were coarsened).

Ties are broken deterministically: the least total loss; among equal losses the least weight
cost, then the least activation cost; remaining ties go to the earlier candidate, deciding sites
from the last to the first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from fractions import Fraction

import torch

from mxfx.errors import MXValueError

Cost = int | Fraction

# Upper bound on DP states x sites (one byte of back-pointer each) before costs are coarsened.
MAX_CHOICE_BYTES = 20_000_000


@dataclasses.dataclass(frozen=True)
class Solution:
    """The solver's answer."""

    choice: tuple[int, ...]  # per site: index of the chosen candidate
    loss: float  # sum of the chosen losses
    weight_cost: Fraction  # exact total weight cost of the choice
    activation_cost: Fraction | None  # exact total activation cost (None without an act budget)
    exact: bool  # True: provably optimal; False: costs were coarsened (see quantum)
    quantum: tuple[Fraction, ...]  # the cost unit of the DP, per budget dimension


def _as_fraction(value) -> Fraction:
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MXValueError(f"costs and budgets must be finite, got {value}")
        return Fraction(repr(value))  # 6.3 means 63/10, not the binary float's value
    return Fraction(value)


def _integer_costs(costs: list[list[Fraction]], budget: Fraction) -> tuple[list[list[int]], int, Fraction]:
    """Extra cost above each site's cheapest candidate as integers, the slack, and the unit used."""
    denominators = [c.denominator for row in costs for c in row] + [budget.denominator]
    scale = math.lcm(*denominators)
    base = [min(row) for row in costs]
    extra = [[int((c - b) * scale) for c in row] for row, b in zip(costs, base)]
    slack = (budget - sum(base)) * scale
    unit = math.gcd(*(e for row in extra for e in row)) or 1
    extra = [[e // unit for e in row] for row in extra]
    capacity = math.floor(slack / unit)  # costs are multiples of unit: flooring the slack is exact
    return extra, capacity, Fraction(unit, scale)


def _coarsen(extra: list[list[int]], capacity: int, limit: int) -> tuple[list[list[int]], int, int]:
    """Round costs to the nearest multiple of a quantum so that the capacity is <= limit."""
    quantum = max(1, math.ceil((capacity + 1) / max(limit, 1)))
    if quantum == 1:
        return extra, capacity, 1
    return [[(e + quantum // 2) // quantum for e in row] for row in extra], capacity // quantum, quantum


def _dp(losses: list[list[float]], wcost: list[list[int]], acost: list[list[int]], wcap: int,
        acap: int) -> tuple | None:
    """Min-loss assignment with sum(wcost) <= wcap and sum(acost) <= acap; None if infeasible.

    float64 tables (torch, which mxfx needs anyway; numpy is not a dependency): the adds are the
    same IEEE double adds in any library. Candidates are compared in order with a strict `<`, so
    ties go to the earliest candidate."""
    n = len(wcost)
    dp = torch.full((wcap + 1, acap + 1), math.inf, dtype=torch.float64)
    dp[0, 0] = 0.0
    choices = []
    for i in range(n):
        best = torch.full_like(dp, math.inf)
        pick = torch.zeros(dp.shape, dtype=torch.uint8)
        for k, (dw, da) in enumerate(zip(wcost[i], acost[i])):
            if dw <= wcap and da <= acap:
                option = torch.full_like(dp, math.inf)
                option[dw:, da:] = dp[: wcap + 1 - dw, : acap + 1 - da] + losses[i][k]
                better = option < best
                best = torch.where(better, option, best)
                pick[better] = k
        dp = best
        choices.append(pick)
    if not torch.isfinite(dp).any():
        return None
    w, a = divmod(int(torch.argmin(dp)), acap + 1)  # row-major: least loss, then least weight, then act cost
    picked = []
    for i in range(n - 1, -1, -1):
        k = int(choices[i][w, a])
        picked.append(k)
        w, a = w - wcost[i][k], a - acost[i][k]
    return tuple(reversed(picked))


def solve(
    losses: Sequence[Sequence[float]],
    weight_costs: Sequence[Sequence[Cost]],
    weight_budget: Cost,
    activation_costs: Sequence[Sequence[Cost]] | None = None,
    activation_budget: Cost | None = None,
    *,
    weight_total: Cost = 1,
    activation_total: Cost = 1,
    max_choice_bytes: int = MAX_CHOICE_BYTES,
) -> Solution:
    """Pick one candidate per site minimizing the summed loss within the budget(s).

    Args:
        losses: losses[i][k] of candidate k at site i (finite or +inf for "never").
        weight_costs: total weight cost of each candidate (e.g. numel * bits per element).
        weight_budget: the limit on the summed weight cost.
        activation_costs: the same for activations (with `activation_budget`), or None.
        activation_budget: the limit on the summed activation cost, or None (no limit).
        weight_total, activation_total: divisors that turn costs into averages in messages
            (the numel totals); they do not change the answer.
        max_choice_bytes: memory for back-pointers (sites x states) before costs are coarsened.

    Returns:
        A Solution (exact unless the state space had to be coarsened).

    Raises:
        MXValueError: mismatched shapes, NaN losses, or an infeasible budget (the message names
            the least achievable average).
    """
    n = len(losses)
    if n == 0:
        raise MXValueError("nothing to solve: no sites")
    if len(weight_costs) != n or any(len(w) != len(row) or not row for w, row in zip(weight_costs, losses)):
        raise MXValueError("losses and weight_costs must have one non-empty row per site, of equal lengths")
    if (activation_costs is None) != (activation_budget is None):
        raise MXValueError("activation_costs and activation_budget go together")
    if max(len(row) for row in losses) > 255:
        raise MXValueError("at most 255 candidates per site")
    width = max(len(row) for row in losses)
    table = [[float(v) for v in row] + [math.inf] * (width - len(row)) for row in losses]
    if any(math.isnan(v) for row in table for v in row):
        raise MXValueError("a loss is NaN; the sensitivity measurement failed for some candidate")
    wcosts = [[_as_fraction(c) for c in row] for row in weight_costs]
    wbudget = _as_fraction(weight_budget)
    wminimum = sum(min(row) for row in wcosts)
    if wminimum > wbudget:
        least = wminimum / _as_fraction(weight_total)
        raise MXValueError(f"the weight budget {float(wbudget / _as_fraction(weight_total)):.4g} bits is below the narrowest "
                           f"candidates' minimum of {float(least):.4g} bits per element; raise it to at least {float(least):.4g}")
    wextra, wcap, wunit = _integer_costs(wcosts, wbudget)
    if activation_costs is not None:
        if len(activation_costs) != n or any(len(a) != len(row) for a, row in zip(activation_costs, losses)):
            raise MXValueError("activation_costs must have the shape of losses")
        acosts = [[_as_fraction(c) for c in row] for row in activation_costs]
        abudget = _as_fraction(activation_budget)
        aminimum = sum(min(row) for row in acosts)
        if aminimum > abudget:
            least = aminimum / _as_fraction(activation_total)
            raise MXValueError(f"the activation budget {float(abudget / _as_fraction(activation_total)):.4g} bits is below the "
                               f"narrowest candidates' minimum of {float(least):.4g} bits per element; raise it to at least "
                               f"{float(least):.4g}")
        aextra, acap, aunit = _integer_costs(acosts, abudget)
    else:
        acosts, aextra, acap, aunit = None, [[0] * len(row) for row in losses], 0, Fraction(1)
    states = max_choice_bytes // n
    exact = (wcap + 1) * (acap + 1) <= states
    wq = aq = 1
    if not exact:
        if acap == 0:
            wlimit, alimit = states - 1, 0
        else:  # split the state budget between the dimensions, keeping a small one exact
            alimit = min(acap, max(1, math.isqrt(states)) - 1)
            wlimit = states // (alimit + 1) - 1
        wextra, wcap, wq = _coarsen(wextra, wcap, wlimit)
        aextra, acap, aq = _coarsen(aextra, acap, alimit)
    exact_w = [[int((c - min(row)) / wunit) for c in row] for row in wcosts]
    exact_a = None if acosts is None else [[int((c - min(row)) / aunit) for c in row] for row in acosts]
    wslack = math.floor((wbudget - wminimum) / wunit)
    aslack = None if acosts is None else math.floor((abudget - sum(min(r) for r in acosts)) / aunit)
    for _ in range(64):  # repair: tighten the coarsened capacity until the exact costs fit
        picked = _dp(table, wextra, aextra, wcap, acap)
        if picked is None:
            break
        wover = sum(exact_w[i][k] for i, k in enumerate(picked)) - wslack
        aover = 0 if exact_a is None else sum(exact_a[i][k] for i, k in enumerate(picked)) - aslack
        if wover <= 0 and aover <= 0:
            return Solution(
                choice=picked,
                loss=float(sum(table[i][k] for i, k in enumerate(picked))),
                weight_cost=sum((wcosts[i][k] for i, k in enumerate(picked)), Fraction(0)),
                activation_cost=None if acosts is None else sum((acosts[i][k] for i, k in enumerate(picked)), Fraction(0)),
                exact=exact,
                quantum=(wunit * wq,) + (() if acosts is None else (aunit * aq,)),
            )
        wcap -= max(0, math.ceil(wover / wq))
        acap -= max(0, math.ceil(aover / aq))
        if wcap < 0 or acap < 0:
            break
    raise MXValueError("the weight and activation budgets cannot be met together: the candidates that fit one exceed "
                       "the other; raise either budget")
