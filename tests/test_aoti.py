"""torch.export -> sparsify -> AOTInductor package -> load -> run, against eager."""

import pytest
import torch
from torch.export import Dim

import countdown_fx
from countdown_fx.aoti import compile_and_package
from countdown_fx import CountDownConfig
from tiny_models import GptFastFeedForward, Stack


def _package_and_run(model, x, config, tmp_path, other_x, via_disk=False):
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: Dim.DYNAMIC},))
    sparse = countdown_fx.sparsify(ep, config)  # under grad mode, as at top level
    if x.is_cuda and getattr(config, "regime", "prac") == "prac":  # the kernels read W_down^T stored once
        assert sum(name.endswith("__w_down_t") for name in sparse.state_dict) == len(model.blocks)
    if via_disk:  # the packaging step often runs on a program another process saved
        torch.export.save(sparse, tmp_path / "sparse.pt2")
        sparse = torch.export.load(tmp_path / "sparse.pt2")
    # checks the compiler first (one that would make the package segfault at load fails with the fix)
    path = compile_and_package(sparse, package_path=str(tmp_path / "model.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    with torch.no_grad():
        return loaded(other_x), sparse.module()(other_x)


def test_aoti_package_runs_the_countdown_op_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = Stack(GptFastFeedForward).eval()
    x, other = torch.randn(2, 1, 32), torch.randn(5, 1, 32)  # decode-shaped, dynamic batch
    got, want = _package_and_run(model, x, CountDownConfig(method="m-countdown", sparsity=0.7), tmp_path, other)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - model(other)).abs().max() > 1e-3  # really sparse


@pytest.mark.parametrize("method", ["m-countdown", "d-countdown"])
def test_aoti_package_of_a_saved_calibrated_program_on_cpu(tmp_path, method):
    from countdown_fx.calibration import calibrate

    torch.manual_seed(0)
    model = Stack(GptFastFeedForward).eval()
    batches = [torch.randn(4, 16, 32) for _ in range(3)]
    cal = calibrate(model, batches, CountDownConfig(method=method, sparsity=0.7, regime="prac"), progress=False)
    x, other = torch.randn(2, 1, 32), torch.randn(5, 1, 32)
    got, want = _package_and_run(model, x, cal, tmp_path, other, via_disk=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got - model(other)).abs().max() > 1e-3


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["m-countdown", "d-countdown"])
def test_aoti_package_runs_the_triton_kernels_on_gpu(tmp_path, method):
    from countdown_fx.calibration import calibrate

    torch.manual_seed(0)
    model = Stack(GptFastFeedForward, dim=256, hidden=704).eval().cuda().to(torch.bfloat16)
    batches = [torch.randn(4, 16, 256, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    cal = calibrate(model, batches, CountDownConfig(method=method, sparsity=0.7, regime="prac"), progress=False)
    # a contiguous example: export guards on the example's strides, and a strided one makes torch's loaded
    # package misbehave (tests/test_aoti.py history; reproduces without countdown)
    x, other = batches[0][:, :1].contiguous(), torch.randn(3, 1, 256, device="cuda", dtype=torch.bfloat16)
    got, want = _package_and_run(model, x, cal, tmp_path, other)
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_compile_and_package_keeps_inductors_pdl_off_around_countdown_ops(monkeypatch):
    """As the backend: Inductor's own PDL off where the program holds countdown ops (said once where the user had
    it on), other programs untouched, the user's inductor_configs win; the toolchain is checked first."""
    import warnings

    import countdown_fx.aoti as aoti
    from countdown_fx import backend

    calls = []
    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package",
                        lambda program, package_path=None, inductor_configs=None: calls.append(inductor_configs) or "p")
    monkeypatch.setattr(backend, "_inductor_pdl_warned", False)

    class NoFFN(torch.nn.Module):
        def forward(self, x):
            return torch.tanh(x) * 2

    torch.manual_seed(0)
    x = torch.randn(2, 1, 32)
    sparse = countdown_fx.sparsify(torch.export.export(Stack(GptFastFeedForward).eval(), (x,)),
                                   CountDownConfig(sparsity=0.5))
    plain = torch.export.export(NoFFN(), (x,))
    with torch._inductor.config.patch({"triton.enable_pdl": True}), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert compile_and_package(sparse) == "p"
        compile_and_package(sparse, inductor_configs={"max_autotune": False})
        compile_and_package(plain)
        compile_and_package(sparse, inductor_configs={"triton.enable_pdl": True})
    assert calls == [{"triton.enable_pdl": False}, {"triton.enable_pdl": False, "max_autotune": False}, {},
                     {"triton.enable_pdl": True}]
    assert len([w for w in caught if "TORCHINDUCTOR_ENABLE_PDL" in str(w.message)]) == 1  # said once

    monkeypatch.setattr(aoti, "toolchain_problem", lambda cxx=None: "no shared libstdc++ (test)")
    with pytest.raises(RuntimeError, match="no shared libstdc"):
        compile_and_package(sparse)
    with pytest.raises(TypeError, match="ExportedProgram"):
        compile_and_package(sparse.module())
    assert len(calls) == 4  # neither reached Inductor
