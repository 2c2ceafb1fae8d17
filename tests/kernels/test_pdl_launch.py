"""CONFIG["pdl"] (programmatic dependent launch): the hook that gives the FFN kernels the launch attribute under
Inductor, and what the launcher and the backend do with the flag. (The kernels' waits compile into their TTIR:
test_kernel_writes.py analyses them with PDL on; GPU runs: test_triton_ffn.py, marked gpu.)"""

import warnings

import pytest

pytest.importorskip("triton")
from torch._inductor.runtime import triton_heuristics  # noqa: E402

from countdown_fx import CountDownConfig, backend  # noqa: E402
from countdown_fx.kernels import pdl_launch, triton_ffn  # noqa: E402


class _Autotuner:
    """Stands for Inductor's CachingAutotuner in the hook: only `fn` is read."""

    def __init__(self, fn):
        self.fn = fn


def test_only_our_kernels_built_with_pdl_get_the_attribute():
    for name in pdl_launch.KERNELS:
        assert pdl_launch.with_launch_pdl({"constants": {"PDL": True}}, getattr(triton_ffn, name))["launch_pdl"]
        assert "launch_pdl" not in pdl_launch.with_launch_pdl({"constants": {"PDL": False}}, getattr(triton_ffn, name))
    # an Inductor kernel (or anyone else's) with a constant of the same name is left alone
    assert "launch_pdl" not in pdl_launch.with_launch_pdl({"constants": {"PDL": True}}, _Autotuner)


def test_every_kernel_that_takes_pdl_is_listed():
    takes_pdl = {name for name in dir(triton_ffn) if name.endswith("_kernel")
                 and "PDL" in getattr(triton_ffn, name).arg_names}
    assert takes_pdl == pdl_launch.KERNELS


def test_this_torch_has_the_hook():
    """If a torch upgrade renames it, CONFIG["pdl"] would only warn and run without the attribute: fail here."""
    assert callable(getattr(triton_heuristics.CachingAutotuner, "_create_compile_meta", None))


def test_install_wraps_the_hook_once(monkeypatch):
    calls = []

    def original(self, cfg):
        calls.append(cfg)
        return {"constants": {"PDL": True}}

    monkeypatch.setattr(triton_heuristics.CachingAutotuner, "_create_compile_meta", original)
    monkeypatch.setattr(pdl_launch, "_installed", None)
    assert pdl_launch.install() and pdl_launch.install()
    hook = triton_heuristics.CachingAutotuner._create_compile_meta
    assert hook is not original and hook.__wrapped__ is original  # wrapped once, not twice
    assert hook(_Autotuner(triton_ffn._down_kernel), "cfg")["launch_pdl"] is True
    assert "launch_pdl" not in hook(_Autotuner(lambda: None), "cfg2")
    assert calls == ["cfg", "cfg2"]


def test_install_without_the_hook_warns_once_and_declines(monkeypatch):
    monkeypatch.delattr(triton_heuristics.CachingAutotuner, "_create_compile_meta")
    monkeypatch.setattr(pdl_launch, "_installed", None)
    with pytest.warns(UserWarning, match="no gain"):
        assert pdl_launch.install() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert pdl_launch.install() is False


def test_the_backend_compiles_in_process_only_with_pdl(monkeypatch):
    """Inductor's compile workers would build the kernels without the hook: with CONFIG["pdl"] the backend asks
    for in-process compiles, and only then."""
    config = CountDownConfig(sparsity=0.5)
    assert "compile_threads" not in backend.inductor_patches(config)
    monkeypatch.setitem(triton_ffn.CONFIG, "pdl", True)
    assert backend.inductor_patches(config)["compile_threads"] == 1
