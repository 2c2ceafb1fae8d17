"""Measure the sparsity a compiled model actually reaches, per site, on real inputs.

    from countdown_fx.meter import SparsityMeter, metered

    meter = SparsityMeter()
    net = metered(model, options, meter)    # the countdown rewrite, run eagerly; every graph call inside `meter`
    net(input_ids)                          # called as it is, not under `with meter:` (metered enters it)
    print(meter.report())

Padded positions (an `attention_mask=` keyword of the call, [batch, seq]) are not counted, as in calibration.
Call `net` outside any active dispatch mode: under one, Dynamo does not compile, so the model would run
dense and eager and nothing would be counted (metered refuses that, with an error saying so).

Thresholds and predictors realise a sparsity that drifts from the calibration target with the text;
this counts, for every countdown op call, the neurons the op's own selection keeps.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from typing import Mapping

import torch
from torch.utils._python_dispatch import TorchDispatchMode, any_torch_dispatch_mode_on_stack

from .backend import eager_backend
from .kernels import ops, reference
from .passes.observe import real_token_rows


class SparsityMeter(TorchDispatchMode):
    """Counts kept and total neurons of every countdown op call made while it is active, by d_inter
    and overall (a prefill step under apply_to="decode", and a decode step of a batch size its
    calibration sends to the dense FFN (ops.DecodePlan), count as dense: they are)."""

    def __init__(self):
        super().__init__()
        self.kept = 0
        self.total = 0
        self.calls = defaultdict(int)  # "decode" / "prefill" -> number of op calls
        self.dense_calls = defaultdict(int)  # of those, calls that ran the dense FFN
        self.kept_by_step = defaultdict(int)  # "decode" / "prefill" -> neurons kept
        self.total_by_step = defaultdict(int)
        # a batched decode step reads every neuron some token of the step keeps: the union of their masks
        self.union_by_step = defaultdict(int)  # "decode" / "prefill" -> neurons in the union, summed over calls
        self.neurons_by_step = defaultdict(int)  # d_inter summed over calls
        # the attention mask of the model call being metered (metered sets it from the call's `attention_mask=`
        # keyword; observe.real_token_rows reads it): padded positions are left out of every count
        self.token_mask: torch.Tensor | None = None
        self.positions: torch.Tensor | None = None  # the call's cache_position, where it passes one

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in ops.COUNTDOWN_OPS:
            self._count(func, ops.bound_args(func, args, kwargs))
        return func(*args, **(kwargs or {}))

    def _count(self, func, a: dict) -> None:
        x, w_gate = a["x"], a["w_gate"]
        tokens, d_inter = x.numel() // x.shape[-1], w_gate.shape[0]
        # padding is not text: count the real tokens only, as calibration does
        real = real_token_rows(self.token_mask, x, self.positions)
        if real is not None:
            tokens = int(real.sum())
        step = "decode" if ops.is_decode_step(x) else "prefill"
        ffn = (x, w_gate, a["w_up"], a["b_gate"], a["b_up"], a["activation"])
        if (a["decode_only"] and step == "prefill") or ops.runs_dense(x, a.get("dense_min_tokens", 0)):
            mask = None  # the op runs the dense FFN here
            self.dense_calls[step] += 1
        elif func is torch.ops.countdown.predictor_ffn.default:
            mask = reference.selection_mask(*ffn, "coef", pred_v=a["pred_v"], pred_u=a["pred_u"], tau=a["tau"])
        elif func is torch.ops.countdown.topk_ffn.default:
            mask = reference.selection_mask(*ffn, a["score"], sparsity=a["sparsity"])
        else:
            mask = reference.selection_mask(*ffn, a["score"], threshold=a["threshold"])
        if mask is None:
            kept, union = tokens * d_inter, d_inter
        else:
            mask = mask.reshape(-1, d_inter) if real is None else mask.reshape(-1, d_inter)[real]
            kept, union = int(mask.sum()), int(mask.any(0).sum())
        self.calls[step] += 1
        self.kept += kept
        self.total += tokens * d_inter
        self.kept_by_step[step] += kept
        self.total_by_step[step] += tokens * d_inter
        self.union_by_step[step] += union
        self.neurons_by_step[step] += d_inter

    @property
    def sparsity(self) -> float:
        """Fraction of FFN neurons skipped over everything measured (nan before any call)."""
        return 1.0 - self.kept / self.total if self.total else float("nan")

    def step_sparsity(self, step: str) -> float:
        """Sparsity over "decode" (one token per sequence) or "prefill" calls only."""
        total = self.total_by_step[step]
        return 1.0 - self.kept_by_step[step] / total if total else float("nan")

    def step_union(self, step: str) -> float:
        """Mean fraction of neurons in the union of a call's token masks, over "decode" or "prefill" calls:
        what the decode kernels read (each kept neuron's rows once for all tokens of a step); for prefill
        and steps past the kernels' 16 tokens, which run the reference, only a statistic. nan before any call."""
        neurons = self.neurons_by_step[step]
        return self.union_by_step[step] / neurons if neurons else float("nan")

    def report(self) -> str:
        parts = [f"{step} {self.step_sparsity(step):.1%} ({self.calls[step]} op calls"
                 + (f", {self.dense_calls[step]} of them dense" if self.dense_calls[step] else "")
                 + f", union of a call's tokens {self.step_union(step):.1%} of neurons)"
                 for step in ("decode", "prefill") if self.calls[step]]
        if not parts:  # say why, since the likely cause is how the meter was used, not the model
            return ("no countdown op ran, so no sparsity was measured: run the model as "
                    "metered(model, options, meter)(inputs), not inside `with meter:` (metered enters the meter "
                    "around each compiled graph itself), and check that it has gated FFNs the rewrite recognises "
                    "(countdown_fx.find_sites lists them)")
        return f"realised FFN sparsity {self.sparsity:.1%} overall; " + ", ".join(parts)


def _refuse_active_dispatch_mode() -> None:
    """Dynamo does not compile while a dispatch mode (such as an entered SparsityMeter) is active: the model
    would silently run dense and eager, unmetered. Raise instead."""
    if any_torch_dispatch_mode_on_stack():
        raise RuntimeError(
            "a metered(...) model was called inside an active TorchDispatchMode (e.g. `with meter:`): Dynamo does "
            "not compile under one, so the countdown rewrite would not run (dense, eager) and nothing would be "
            "metered. Call it outside: net = metered(model, options, meter); net(inputs); meter.report() "
            "(metered enters `meter` around each compiled graph itself).")


def metered(model, options: Mapping | None, meter: SparsityMeter):
    """torch.compile(model) with the countdown rewrite, executed eagerly with every graph call inside
    `meter` (Inductor-compiled code cannot be metered from Python: use this to measure, the backend to run).
    `model` is a module or a function (e.g. a model's forward); the result is what torch.compile returns,
    refusing to run under an active dispatch mode (see _refuse_active_dispatch_mode)."""
    if not isinstance(meter, SparsityMeter):
        raise TypeError(f"metered(model, options, meter) needs a countdown_fx.SparsityMeter to count into, got "
                        f"{type(meter).__name__}: meter = SparsityMeter(); net = metered(model, options, meter)")
    rewrite = eager_backend(options)

    def backend(gm, example_inputs):
        forward = rewrite(gm, example_inputs)

        def run(*args):
            with meter:
                return forward(*args)

        return run

    def before_call(kwargs: dict) -> None:
        _refuse_active_dispatch_mode()
        meter.token_mask, meter.positions = kwargs.get("attention_mask"), kwargs.get("cache_position")

    compiled = torch.compile(model, backend=backend)
    if isinstance(compiled, torch.nn.Module):  # checked before its forward, where Dynamo would skip
        compiled.register_forward_pre_hook(lambda _module, _args, kwargs: before_call(kwargs), with_kwargs=True)
        return compiled

    @functools.wraps(model)
    def call(*args, **kwargs):
        before_call(kwargs)
        return compiled(*args, **kwargs)

    return call
