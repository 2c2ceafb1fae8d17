"""CONFIG["pdl"] (programmatic dependent launch): the hook that gives the FFN kernels the launch attribute under
Inductor, and what the launcher and the backend do with the flag. (The kernels' waits compile into their TTIR:
test_kernel_writes.py analyses them with PDL on; GPU runs: test_ops.py, marked gpu.)"""

import warnings

import pytest
import torch

pytest.importorskip("triton")
from torch._inductor.runtime import triton_heuristics  # noqa: E402
from torch._inductor.runtime.hints import DeviceProperties  # noqa: E402

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


def test_inductors_renamed_copies_are_recognised():
    """torch._inductor.config.triton.unique_user_kernel_names renames a user kernel's copy `_coef_kernel_0`."""
    def _coef_kernel_3():
        pass

    def _coef_kernel_extra():
        pass

    assert pdl_launch.kernel_name(_coef_kernel_3) == "_coef_kernel"
    assert pdl_launch.kernel_name(triton_ffn._coef_kernel) == "_coef_kernel"
    assert pdl_launch.kernel_name(_coef_kernel_extra) not in pdl_launch.KERNELS


def _compile_options(kernel, pdl: bool) -> dict:
    """The triton compile options Inductor's CachingAutotuner makes for `kernel` as a user kernel on an H100."""
    device = DeviceProperties("cuda", 0, 132, 90, 9, 65536, 2048, 1024, 32)
    meta = {"signature": {n: "*fp32" if n.endswith("_ptr") else "constexpr" if n.isupper() else "i32"
                          for n in kernel.arg_names},
            "device": device, "constants": {"HAS_BD": False, "BLOCK_D": 64, "SPLIT_TILE": 4, "UPCAST": False,
                                            "PDL": pdl}, "configs": []}
    tuner = triton_heuristics.user_autotune(configs=[], triton_meta=meta, filename=__file__, inductor_meta={},
                                            custom_kernel=True)(kernel)
    cfg = tuner.configs[0]
    return tuner._create_compile_options(cfg, tuner._create_compile_meta(cfg))


def test_the_hook_reaches_inductors_compile_options():
    """Through Inductor's own path for a user kernel: the wrapped compile meta turns into triton's launch_pdl."""
    assert pdl_launch.install()
    assert _compile_options(triton_ffn._reduce_kernel, pdl=True)["launch_pdl"] is True
    assert _compile_options(triton_ffn._reduce_kernel, pdl=False)["launch_pdl"] is False


@pytest.mark.parametrize("hip,capability,want", [(None, (9, 0), True), (None, (10, 0), True), (None, (8, 0), False),
                                                 ("6.2", (9, 4), False)])
def test_pdl_needs_an_nvidia_gpu_of_compute_capability_9(monkeypatch, hip, capability, want):
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "some GPU")
    monkeypatch.setattr(pdl_launch, "_unsupported_warned", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pdl_launch.supported(torch.device("cuda", 0)) is want
        assert pdl_launch.supported(torch.device("cuda", 0)) is want
    assert len(caught) == (0 if want else 1)  # said once


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
    """Inductor's compile workers would build the kernels without the hook, and a cached graph may have been
    compiled without PDL: with CONFIG["pdl"] the backend asks for in-process compiles and no FX graph cache
    (which also bypasses AOTAutograd's), and only then."""
    config = CountDownConfig(sparsity=0.5)
    assert not {"compile_threads", "fx_graph_cache"} & set(backend.inductor_patches(config))
    monkeypatch.setitem(triton_ffn.CONFIG, "pdl", True)
    patches = backend.inductor_patches(config)
    assert patches["compile_threads"] == 1 and patches["fx_graph_cache"] is False


def test_traceable_matches_what_torchs_analysis_reads(monkeypatch):
    """pdl_launch.traceable() says whether torch's TTIR analysis can read the kernels' PDL wait: where it
    cannot, the analysis takes every tensor argument as written (triton <= 3.6); where it can, a kernel built
    with PDL is seen to write only its output, as without PDL."""
    from torch._higher_order_ops import triton_kernel_wrap

    class _HopperTarget:
        def get_current_target(self):
            from triton.backends.compiler import GPUTarget

            return GPUTarget("cuda", 90, 32)

        def get_current_device(self):
            return 0

    monkeypatch.setattr(triton_ffn.triton.runtime.driver, "_active", _HopperTarget())
    part, y = torch.randn(3, 2, 64), torch.empty(2, 64, dtype=torch.bfloat16)
    tensors = {"part_ptr": part, "bd_ptr": part, "y_ptr": y}
    table = triton_kernel_wrap.kernel_side_table
    for pdl in (False, True):
        constants = {"M": 2, "D": 64, "n_split": 3, "stride_ym": 64, "HAS_BD": False, "BLOCK_D": 64,
                     "SPLIT_TILE": 4, "UPCAST": False, "PDL": pdl}
        written = triton_kernel_wrap.get_mutated_tensors(table.add_kernel(triton_ffn._reduce_kernel),
                                                         table.add_constant_args(constants), tensors, {})
        read_right = sorted(written) == ["y_ptr"]
        assert read_right is (not pdl or pdl_launch.traceable()), (pdl, written)


@pytest.mark.parametrize("traceable", [True, False])
def test_pdl_is_off_where_torch_could_not_read_the_kernels(monkeypatch, traceable):
    """Under tracing with a triton whose wait torch cannot analyse, PDL is off (one warning), since CUDA graphs
    would be skipped; eager launches keep it; CPU tensors and an unrequested PDL never have it."""
    monkeypatch.setattr(pdl_launch, "supported", lambda device: True)
    monkeypatch.setattr(pdl_launch, "traceable", lambda: traceable)
    monkeypatch.setattr(pdl_launch, "_untraceable_warned", False)
    cuda = torch.device("cuda", 0)
    assert pdl_launch.enabled(True, cuda, traced=False)
    assert not pdl_launch.enabled(False, cuda, traced=True)
    assert not pdl_launch.enabled(True, torch.device("cpu"), traced=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert pdl_launch.enabled(True, cuda, traced=True) is traceable
        assert pdl_launch.enabled(True, cuda, traced=True) is traceable
    assert len(caught) == (0 if traceable else 1)  # said once
