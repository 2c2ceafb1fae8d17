"""Every kernel launch writes only buffers the launcher made, never x, a weight, a bias or calibration state.

torch.export and AOTInductor decide what a user Triton kernel writes by analysing its TTIR (walking back
from each store's address). A false "write" to an input makes the exported program treat that input as
mutated: the AOTInductor package then returns it as an extra output. That analysis needs no GPU, so it
runs here on CPU, on TTIR generated for an H100 target, for every mode and both sparse sides.
"""

import os
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
from torch._higher_order_ops import triton_kernel_wrap  # noqa: E402

from countdown_fx.kernels import pdl_launch, triton_ffn  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from ffn_cases import deterministic, make_case  # noqa: E402

MODES = {"gate": triton_ffn.MODE_GATE, "up": triton_ffn.MODE_UP, "coef": triton_ffn.MODE_COEF,
         "pred": triton_ffn.MODE_PRED}


class _HopperTarget:
    """The driver triton asks for the compile target: TTIR for sm_90 needs no GPU."""

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0


def _launches(monkeypatch, case, mode, side, no_dot_tokens, sum_splits="reduce", pdl=False):
    """Run the launcher with wrap_triton replaced by a recorder: (kernel, arguments by name) per launch."""
    launches = []

    def record(kernel):
        class Grid:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    launches.append((kernel, {**dict(zip(kernel.arg_names, args)), **kwargs}))
                return launch
        return Grid()

    monkeypatch.setattr(triton_ffn, "wrap_triton", record)
    c = case
    triton_ffn.sparse_ffn(c["x"], c["w_gate"], c["w_up"], c["w_down_t"], c["b_gate"], c["b_up"], c["b_down"],
                          "silu", MODES[mode], c["thr"], c.get("pred_v"), c.get("pred_u"),
                          config={"sparse_side": side, "sum_splits": sum_splits, "pdl": pdl,
                                  "lowrank": {"K_CHUNK": 32, "BLOCK_K": 32},  # h = x V: 2 chunks
                                  "gather_no_dot": {"max_tokens": no_dot_tokens},
                                  "coef_no_dot_pred": {"max_tokens": no_dot_tokens},
                                  "lowrank_no_dot": {"max_tokens": no_dot_tokens}})
    return launches


def _arguments_of(launches, kernel_name: str) -> dict:
    """The arguments of the (first) launch of the kernel named `kernel_name`."""
    return next(arguments for kernel, arguments in launches if kernel.fn.__name__ == kernel_name)


def _written(kernel, arguments) -> list[str]:
    tensors = {k: v for k, v in arguments.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in arguments.items() if not isinstance(v, torch.Tensor)
                 and k not in ("num_warps", "num_stages")}
    table = triton_kernel_wrap.kernel_side_table
    return triton_kernel_wrap.get_mutated_tensors(table.add_kernel(kernel), table.add_constant_args(constants),
                                                  tensors, {})


@pytest.mark.parametrize("pdl", [False, True], ids=["plain", "pdl"])
@pytest.mark.parametrize("sum_splits", ["reduce", "atomic"])
@pytest.mark.parametrize("M,no_dot_tokens", [(3, 0), (1, 2), (3, 4)], ids=["dot", "fma-1", "fma-3"])
@pytest.mark.parametrize("side", ["masked", "gather"])
@pytest.mark.parametrize("mode", list(MODES))
def test_kernels_write_only_their_own_buffers(monkeypatch, mode, side, M, no_dot_tokens, sum_splits, pdl):
    """no_dot_tokens: the FMA paths' max_tokens (CONFIG "gather_no_dot", "coef_no_dot_pred", "lowrank_no_dot"),
    so the analysis sees both the tl.dot and the FMA launches; sum_splits: the down launch's shares summed
    by a reduce launch or by atomics (no output reduce launch then); pdl: the kernels as CONFIG["pdl"] builds
    them on a GPU (their first lines wait for the previous launch), analysed as such (on CPU the launcher
    turns PDL off: the interpreter runs no PTX)."""
    if pdl and not pdl_launch.traceable():
        pytest.skip(f"triton {triton.__version__}: its PDL wait is unreadable here, so the launcher turns PDL off "
                    "under tracing (test_pdl_launch.py)")
    case = make_case(M, 64, 96, torch.bfloat16, "cpu", mode, bias=True, sparsity=0.7, rank=16)
    inputs = {name: t for name, t in case.items() if isinstance(t, torch.Tensor)}
    input_storages = {t.untyped_storage().data_ptr(): name for name, t in inputs.items()}
    # set_active / reset_active would leave triton without a driver on a machine with no GPU: patch the
    # slot itself, which monkeypatch puts back
    monkeypatch.setattr(triton.runtime.driver, "_active", _HopperTarget())
    launches = _launches(monkeypatch, case, mode, side, no_dot_tokens, sum_splits)
    names = [k.fn.__name__ for k, _ in launches]
    assert len(launches) >= 2
    # h = x V: one FMA launch over V's columns (V stored transposed, a few tokens), or chunks of d_model
    # summed by a reduce launch of their own
    fma_h = mode == "pred" and M <= no_dot_tokens
    assert names.count("_lowrank_no_dot_kernel") == fma_h
    assert names.count("_reduce_kernel") == (sum_splits == "reduce") + (mode == "pred" and not fma_h)
    assert _arguments_of(launches, "_down_kernel")["ATOMIC"] == (sum_splits == "atomic")
    assert names.count("_gather_kernel") == (side == "gather" and mode != "coef")
    for kernel, arguments in launches:
        assert arguments["PDL"] is False and "launch_pdl" not in arguments  # CPU tensors: no PDL
        arguments = {**arguments, "PDL": pdl}
        written = _written(kernel, arguments)
        assert written, f"{kernel.fn.__name__}: the analysis found no output at all"
        for name in written:
            storage = arguments[name].untyped_storage().data_ptr()
            assert storage not in input_storages, (
                f"{kernel.fn.__name__} is seen to write its argument {name}, which is the input "
                f"{input_storages[storage]!r}: an exported program would treat that input as mutated")


def test_deterministic_algorithms_take_the_reduce_launch(monkeypatch):
    """torch.use_deterministic_algorithms(True) is the way to a bitwise-repeatable output: the down launch's
    shares are then summed by the fixed-order reduce launch whatever CONFIG["sum_splits"] says."""
    monkeypatch.setattr(triton.runtime.driver, "_active", _HopperTarget())
    case = make_case(1, 64, 96, torch.bfloat16, "cpu", "up", sparsity=0.7)
    with deterministic():
        launches = _launches(monkeypatch, case, "up", "gather", 2, sum_splits="atomic")
    assert [k.fn.__name__ for k, _ in launches].count("_reduce_kernel") == 1
    assert not _arguments_of(launches, "_down_kernel")["ATOMIC"]
