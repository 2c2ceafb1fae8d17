"""examples/export_aoti.py reports what a sparsified exported program holds: ops and state, counted apart."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch.export import Dim

import countdown_fx
from tiny_models import GptFastFeedForward, Stack

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "export_aoti.py"


def _example():
    spec = importlib.util.spec_from_file_location("export_aoti_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_example_counts_one_op_per_site_and_the_state_apart():
    """Two FFN sites: two countdown ops whatever the method; the state is one threshold per site for
    M-CountDown, a predictor (V^T, U) and tau per site for D-CountDown."""
    example = _example()
    torch.manual_seed(0)
    model = Stack(GptFastFeedForward).eval()  # 2 gated FFN sites
    batches = [torch.randn(4, 16, 32) for _ in range(3)]
    configs = {"m-countdown": {"threshold": 2},
               "d-countdown": {"pred_v_t": 2, "pred_u": 2, "tau": 2}}
    for method, state in configs.items():
        config = countdown_fx.CountDownConfig(method=method, sparsity=0.7, regime="prac", apply_to="all",
                                              **({"predictor_steps": 3, "predictor_batch_tokens": 32}
                                                 if method == "d-countdown" else {}))
        cal = countdown_fx.calibrate(model, batches, config, progress=False)
        ep = torch.export.export(model, (torch.randn(2, 1, 32),), dynamic_shapes=({0: Dim.DYNAMIC},))
        ep = countdown_fx.sparsify(ep, cal)
        op_calls, buffers = example.countdown_contents(ep)
        op_name = {"m-countdown": "countdown::threshold_ffn", "d-countdown": "countdown::predictor_ffn"}[method]
        assert op_calls == {op_name: 2} and buffers == state
        line = example.describe_countdown(ep)
        assert line.startswith(f"2 countdown ops (2 {op_name}) and {sum(state.values())} countdown state buffers")
