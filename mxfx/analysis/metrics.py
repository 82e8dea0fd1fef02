"""Output-comparison metrics: one accumulator for every sensitivity mode and for `mxfx.evaluate`.

`MetricAccumulator.add(reference, test)` takes one batch's high-precision tensor and its quantized
counterpart (same shape); `result()` aggregates over every batch added. All sums are in float64.
Definitions (N = elements, R = rows of the last axis, T = tokens, over all batches together):

- `mse`: sum((ref - test)^2) / N.
- `sqnr`: 10 * log10(sum(ref^2) / sum((ref - test)^2)) in dB, from the total energies over all
  batches (not an average of per-batch dB values); +inf when the two are identical.
- `rel_error`: sqrt(sum((ref - test)^2) / sum(ref^2)), the relative L2 error (the SQNR's linear form).
- `cosine`: the cosine similarity of each row of the last axis (one token's vector, one sample's
  features), averaged over all R rows of all batches (each row weighs the same); a 1-D tensor is
  one row. A row of zeros in both tensors counts as similarity 1 (identical), not 0.
- `kl`: KL(P_ref || P_test), P = softmax over the last (class / vocabulary) axis, computed per token
  (each row of the last axis is one token's distribution), summed over the vocabulary and averaged
  over all T tokens of all batches (each token weighs the same), in nats. Only where the compared
  tensor is logits (model outputs): `add(..., kl=False)` leaves it uncomputed, and `result()`
  reports it as None, never 0.

A metric that was never computed is None (rendered "-" in tables).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mxfx.errors import MXValueError

METRICS = ("sqnr", "mse", "cosine", "kl", "rel_error")
HIGHER_IS_BETTER = {"sqnr": True, "cosine": True, "mse": False, "kl": False, "rel_error": False}


class MetricAccumulator:
    """Sums over batches for the metrics in the module docstring."""

    def __init__(self, kl: bool = False) -> None:
        """Args: kl: compute the per-token KL divergence (the compared tensors are logits)."""
        self.kl_enabled = kl
        self.signal = 0.0  # sum(ref^2)
        self.noise = 0.0  # sum((ref - test)^2)
        self.count = 0  # elements
        self.cosine_sum = 0.0  # sum over rows of the per-row cosine
        self.rows = 0  # rows of the last axis
        self.kl_sum = 0.0  # sum over tokens of the per-token KL
        self.tokens = 0

    def add(self, reference: torch.Tensor, test: torch.Tensor) -> None:
        """Add one batch: `reference` (high precision) and `test` (quantized) of the same shape."""
        if reference.shape != test.shape:
            raise MXValueError(f"cannot compare tensors of shapes {tuple(reference.shape)} and {tuple(test.shape)}")
        ref = reference.detach().to(torch.float64)
        tst = test.detach().to(torch.float64)
        rows_ref = ref.reshape(-1, ref.shape[-1]) if ref.dim() else ref.reshape(1, 1)
        rows_tst = tst.reshape(rows_ref.shape)
        diff = rows_ref - rows_tst
        self.signal += rows_ref.square().sum().item()
        self.noise += diff.square().sum().item()
        self.count += rows_ref.numel()
        # Per-row cosine; identical rows count exactly 1 (also two all-zero rows, which
        # F.cosine_similarity would call 0), a zero row against a nonzero one 0.
        norms = rows_ref.norm(dim=-1) * rows_tst.norm(dim=-1)
        dots = (rows_ref * rows_tst).sum(-1)
        identical = diff.abs().amax(-1) == 0
        cosine = torch.where(identical, 1.0, torch.where(norms > 0, dots / norms.clamp_min(1e-300), 0.0))
        self.cosine_sum += cosine.sum().item()
        self.rows += rows_ref.shape[0]
        if self.kl_enabled:
            # sum_v P_ref(v) * (log P_ref(v) - log P_test(v)) per token, summed over tokens here.
            log_ref, log_tst = rows_ref.log_softmax(-1), rows_tst.log_softmax(-1)
            self.kl_sum += F.kl_div(log_tst, log_ref, log_target=True, reduction="sum").item()
            self.tokens += rows_ref.shape[0]

    def state(self) -> dict:
        """The running sums, JSON-serializable (floats round-trip exactly through `json`)."""
        return dict(vars(self))

    @classmethod
    def from_state(cls, state: dict) -> MetricAccumulator:
        """An accumulator continuing from `state()`: adding the remaining batches gives the same result
        bit for bit as one accumulator that saw every batch."""
        acc = cls()
        for key, value in state.items():
            if not hasattr(acc, key):
                raise MXValueError(f"not a MetricAccumulator state: unknown field {key!r}")
            setattr(acc, key, value)
        return acc

    def result(self) -> dict[str, float | None]:
        """{sqnr, mse, cosine, kl, rel_error} over every batch added; None for what was not computed."""
        if self.count == 0:
            return dict.fromkeys(METRICS)
        return {
            "sqnr": (10 * math.log10(self.signal / self.noise) if self.signal > 0 else -math.inf) if self.noise > 0 else math.inf,
            "mse": self.noise / self.count,
            "cosine": self.cosine_sum / self.rows,
            "kl": self.kl_sum / self.tokens if self.kl_enabled and self.tokens else None,
            "rel_error": math.sqrt(self.noise / self.signal) if self.signal > 0 else (0.0 if self.noise == 0 else math.inf),
        }
