"""Measure the sparsity a compiled model actually reaches, per site, on real inputs.

    with SparsityMeter() as meter:
        metered(model, options)(input_ids)      # the countdown rewrite, run eagerly under the meter
    print(meter.report())

Thresholds and predictors realise a sparsity that drifts from the calibration target with the text;
this counts, for every countdown op call, the neurons the op's own selection keeps.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .backend import eager_backend
from .kernels import ops, reference


class SparsityMeter(TorchDispatchMode):
    """Counts kept and total neurons of every countdown op call made while it is active, by d_inter
    and overall (a prefill step under apply_to="decode" counts as dense: it is)."""

    def __init__(self):
        super().__init__()
        self.kept = 0
        self.total = 0
        self.calls = defaultdict(int)  # "decode" / "prefill" -> number of op calls
        self.kept_by_step = defaultdict(int)  # "decode" / "prefill" -> neurons kept
        self.total_by_step = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in ops.COUNTDOWN_OPS:
            self._count(func, args)
        return func(*args, **(kwargs or {}))

    def _count(self, func, args) -> None:
        x, w_gate, w_up, _, b_gate, b_up, _, act = args[: ops.N_FFN_TENSORS + 1]
        decode_only = args[-1]
        tokens, d_inter = x.numel() // x.shape[-1], w_gate.shape[0]
        step = "decode" if ops.is_decode_step(x) else "prefill"
        if decode_only and step == "prefill":
            kept = tokens * d_inter
        elif func is torch.ops.countdown.topk_ffn.default:
            kept = tokens * reference.keep_count(d_inter, args[9])
        elif func is torch.ops.countdown.predictor_ffn.default:
            kept = int(reference.selection_mask(x, w_gate, w_up, b_gate, b_up, act, "coef", pred_v=args[8],
                                                pred_u=args[9], tau=args[10]).sum())
        else:
            kept = int(reference.selection_mask(x, w_gate, w_up, b_gate, b_up, act, args[8], threshold=args[9]).sum())
        self.calls[step] += 1
        self.kept += kept
        self.total += tokens * d_inter
        self.kept_by_step[step] += kept
        self.total_by_step[step] += tokens * d_inter

    @property
    def sparsity(self) -> float:
        """Fraction of FFN neurons skipped over everything measured (nan before any call)."""
        return 1.0 - self.kept / self.total if self.total else float("nan")

    def step_sparsity(self, step: str) -> float:
        """Sparsity over "decode" (one token per sequence) or "prefill" calls only."""
        total = self.total_by_step[step]
        return 1.0 - self.kept_by_step[step] / total if total else float("nan")

    def report(self) -> str:
        parts = [f"{step} {self.step_sparsity(step):.1%} ({self.calls[step]} op calls)"
                 for step in ("decode", "prefill") if self.calls[step]]
        return f"realised FFN sparsity {self.sparsity:.1%} overall; " + ", ".join(parts or ["no countdown op ran"])


def metered(model: torch.nn.Module, options: Mapping | None, meter: SparsityMeter) -> torch.nn.Module:
    """torch.compile(model) with the countdown rewrite, executed eagerly with every graph call inside
    `meter` (Inductor-compiled code cannot be metered from Python: use this to measure, the backend to run)."""
    rewrite = eager_backend(options)

    def backend(gm, example_inputs):
        forward = rewrite(gm, example_inputs)

        def run(*args):
            with meter:
                return forward(*args)

        return run

    return torch.compile(model, backend=backend)
