"""Streaming reducers that turn per-token neuron scores into one number per site, in bounded memory.

Why streaming: calibration data can be millions of tokens x tens of thousands of neurons per layer; the
scores are reduced batch by batch and never stored.

  MeanKth          the CountDown rule: mean over tokens of each token's k-th smallest score (exact).
  StreamingQuantile  a pooled quantile of all values seen (the CATS rule; also picks the predictor's tau),
                   from a fine fixed histogram: relative error about 0.1% of the value, documented below.
  SelectionCounts  realised sparsity of a keep-mask, and its precision / recall against the oracle mask.
"""

from __future__ import annotations

import math

import torch


def drop_count(d_inter: int, sparsity: float) -> int:
    """Neurons dropped per token by the oracle at sparsity s (the complement of reference.keep_count)."""
    from ..kernels.reference import keep_count

    return d_inter - keep_count(d_inter, sparsity)


class MeanKth:
    """Mean over tokens of each token's k-th smallest score; k = dropped neurons per token.

    Keeping `score > threshold` then drops, on an average token, the k neurons the oracle drops. With
    k = 0 (sparsity rounds to nothing dropped) the threshold is -inf: every neuron is kept.
    """

    def __init__(self, d_inter: int, sparsity: float):
        self.k = drop_count(d_inter, sparsity)
        self.total = 0.0
        self.tokens = 0

    def update(self, scores: torch.Tensor) -> None:
        if scores.shape[0] == 0 or self.k == 0:
            self.tokens += scores.shape[0]
            return
        kth = torch.kthvalue(scores.float(), self.k, dim=-1).values
        self.total += float(kth.double().sum())
        self.tokens += scores.shape[0]

    def value(self) -> float:
        if self.k == 0:
            return -math.inf
        if self.tokens == 0:
            raise ValueError("MeanKth.value(): no tokens were seen")
        return self.total / self.tokens


class StreamingQuantile:
    """A pooled quantile of every value seen, from a histogram of asinh(value * SCALE).

    asinh is monotonic, handles signs and zero, and is logarithmic for |value| >> 1 / SCALE, so fixed bins
    give a fixed *relative* resolution: BINS bins over [-LIMIT, LIMIT] are 0.0011 wide, i.e. the quantile is
    found within about 0.11% of its value (linear interpolation inside the bin does better on smooth data)
    for |value| between ~1e-6 and ~1e8; values outside are clamped into the edge bins. Memory: BINS
    float64 counts (512 KiB), whatever the number of values.
    """

    SCALE = 2.0**24
    LIMIT = 36.0
    BINS = 1 << 16

    def __init__(self, device: torch.device | str = "cpu"):
        self.counts = torch.zeros(self.BINS, dtype=torch.float64, device=device)
        self.width = 2 * self.LIMIT / self.BINS

    def update(self, values: torch.Tensor) -> None:
        if values.numel() == 0:
            return
        # fp32 is enough here (t has ~4e-6 absolute precision against 1.1e-3 wide bins) and 3x faster than fp64;
        # chunks of at most 2**24 values keep histc's fp32 counts exact
        for part in values.detach().reshape(-1).split(1 << 24):
            t = torch.asinh(part.float() * self.SCALE).clamp_(-self.LIMIT, self.LIMIT)
            self.counts += torch.histc(t, bins=self.BINS, min=-self.LIMIT, max=self.LIMIT).to(self.counts)

    @property
    def count(self) -> int:
        return int(self.counts.sum().item())

    def quantile(self, q: float) -> float:
        """The value v with a fraction q of all values below it (q in [0, 1])."""
        total = float(self.counts.sum())
        if total == 0:
            raise ValueError("StreamingQuantile.quantile(): no values were seen")
        if q <= 0:
            return -math.inf
        target = q * total
        cum = torch.cumsum(self.counts, 0)
        i = int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype, device=cum.device)).item())
        i = min(i, self.BINS - 1)
        before = float(cum[i - 1]) if i > 0 else 0.0
        inside = float(self.counts[i])
        frac = (target - before) / inside if inside > 0 else 1.0
        t = -self.LIMIT + (i + min(max(frac, 0.0), 1.0)) * self.width
        return math.sinh(t) / self.SCALE


UNION_BATCHES = (2, 4, 8, 16)  # decode batch sizes whose expected union of masks calibration reports


class SelectionCounts:
    """Counts for one site's keep-mask: realised sparsity, precision / recall vs the oracle mask, and the
    union of the masks of random groups of B tokens: the fraction of neurons a decode step of B tokens
    must read (the kernels read each row of the union once for the whole batch)."""

    def __init__(self, seed: int = 0):
        self.tokens = 0
        self.neurons = 0  # tokens * d_inter
        self.kept = 0
        self.oracle_kept = 0
        self.both = 0
        self.union_sum = {b: 0.0 for b in UNION_BATCHES}  # sum over groups of the group's union fraction
        self.union_groups = {b: 0 for b in UNION_BATCHES}
        self._generator = torch.Generator().manual_seed(seed)

    def update(self, kept: torch.Tensor, oracle: torch.Tensor) -> None:
        """kept, oracle: [tokens, d_inter] booleans."""
        self.tokens += kept.shape[0]
        self.neurons += kept.numel()
        self.kept += int(kept.sum())
        self.oracle_kept += int(oracle.sum())
        self.both += int((kept & oracle).sum())
        order = torch.randperm(kept.shape[0], generator=self._generator).to(kept.device)
        for b in UNION_BATCHES:  # groups of b tokens drawn at random (mixing the batch's sequences)
            groups = kept.shape[0] // b
            if groups:
                union = kept[order[:groups * b]].reshape(groups, b, -1).any(1)
                self.union_sum[b] += float(union.float().mean(1).sum())
                self.union_groups[b] += groups

    def summary(self) -> dict:
        return {
            "tokens": self.tokens,
            "realised_sparsity": 1.0 - self.kept / self.neurons if self.neurons else float("nan"),
            "precision": self.both / self.kept if self.kept else float("nan"),
            "recall": self.both / self.oracle_kept if self.oracle_kept else float("nan"),
            "union_by_batch": {str(b): self.union_sum[b] / self.union_groups[b]
                               for b in UNION_BATCHES if self.union_groups[b]},
        }
