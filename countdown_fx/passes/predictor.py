"""D-CountDown's per-site low-rank predictor of the oracle mask, trained streaming from the live model.

    logits = (x V) U^T      V [d_model, r], U [d_inter, r]; no bias, no nonlinearity (the paper's form)

Why streaming: the authors stored hundreds of GB of (x, a) traces. Here each calibration batch's dense
activations arrive from the observer, become (x, oracle mask) pairs, and are consumed by AdamW steps at
once; the only state kept between batches is the predictor, its optimizer and a buffer of fewer than
`batch_tokens` leftover tokens.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F

from ..kernels import reference

# The predictor may cost at most this fraction of the site's FFN weights (3 * d_model * d_inter).
RANK_BUDGET = 0.05
MAX_RANK = 512


def default_rank(d_model: int, d_inter: int, budget: float = RANK_BUDGET, cap: int = MAX_RANK) -> int:
    """min(cap, the largest r with r * (d_model + d_inter) <= budget * 3 * d_model * d_inter), at least 1."""
    return max(1, min(cap, int(budget * 3 * d_model * d_inter // (d_model + d_inter))))


def predictor_fraction(rank: int, d_model: int, d_inter: int) -> float:
    """Predictor weights as a fraction of the FFN's weights: r (d_model + d_inter) / (3 d_model d_inter)."""
    return rank * (d_model + d_inter) / (3 * d_model * d_inter)


def oracle_mask(act_g: torch.Tensor, u: torch.Tensor, sparsity: float) -> torch.Tensor:
    """D-CountDown's target: per token, the top (1 - s) neurons by |act(g) * u| (reference.topk_mask)."""
    keep = reference.keep_count(act_g.shape[-1], sparsity)
    return reference.topk_mask(reference.score("coef", act_g, u), keep)


class PredictorTrainer:
    """Trains one site's predictor with BCE against oracle masks fed batch by batch.

    `feed(x, mask)` shuffles the new tokens (seeded), runs one AdamW step per full minibatch of
    `batch_tokens`, and keeps the remainder for the next call. The learning rate decays on a cosine from
    `lr` to lr/10 over `steps`; `done` turns True after `steps` steps and later feeds are ignored.
    """

    def __init__(self, key: str, d_model: int, d_inter: int, rank: int, *, steps: int, lr: float,
                 batch_tokens: int, seed: int, device: torch.device | str = "cpu"):
        self.key, self.rank, self.steps, self.batch_tokens = key, rank, steps, batch_tokens
        # Seeded per site from the config seed and the site key, so results do not depend on site order.
        self.gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
        v = torch.randn(d_model, rank, generator=self.gen) / math.sqrt(d_model)
        u = torch.randn(d_inter, rank, generator=self.gen) / math.sqrt(rank)
        self.pred_v = v.to(device).requires_grad_(True)
        self.pred_u = u.to(device).requires_grad_(True)
        self.opt = torch.optim.AdamW([self.pred_v, self.pred_u], lr=lr, weight_decay=0.01)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda i: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(i, steps) / steps)))
        self.step_count = 0
        self.losses: list[float] = []
        self._x: torch.Tensor | None = None
        self._m: torch.Tensor | None = None

    @property
    def done(self) -> bool:
        return self.step_count >= self.steps

    def feed(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        if self.done or x.shape[0] == 0:
            return
        perm = torch.randperm(x.shape[0], generator=self.gen).to(x.device)
        x, mask = x.detach().float()[perm], mask[perm]
        if self._x is not None:
            x, mask = torch.cat([self._x, x]), torch.cat([self._m, mask])
        n = self.batch_tokens
        start = 0
        while x.shape[0] - start >= n and not self.done:
            self._step(x[start:start + n], mask[start:start + n])
            start += n
        self._x, self._m = (x[start:], mask[start:]) if not self.done and start < x.shape[0] else (None, None)

    def _step(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        with torch.enable_grad():
            logits = reference.predictor_logits(x, self.pred_v, self.pred_u)
            loss = F.binary_cross_entropy_with_logits(logits, mask.float())
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.sched.step()
        self.step_count += 1
        self.losses.append(float(loss.detach()))

    def state(self) -> dict[str, torch.Tensor]:
        """The trained weights, detached fp32 on CPU: {"pred_v": [d_model, r], "pred_u": [d_inter, r]}."""
        return {"pred_v": self.pred_v.detach().float().cpu().contiguous(),
                "pred_u": self.pred_u.detach().float().cpu().contiguous()}
