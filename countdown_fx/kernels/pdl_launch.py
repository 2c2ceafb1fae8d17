"""Programmatic dependent launch for the FFN kernels compiled by Inductor (opt-in: triton_ffn.CONFIG["pdl"]).

With PDL a launch may start while the one before it finishes; each kernel then waits for its predecessor's
writes in its own first lines (triton_ffn._pdl_start). A chain of small launches in a CUDA graph loses
1.3-1.4 us less per boundary that way (benchmarks/speed/NOTES.md, "PDL"), and a decode FFN call is 3-5 such
launches. Inductor passes the launch attribute only to its own kernels (config.triton.enable_pdl): a user
kernel from `wrap_triton` is compiled without it (torch 2.11-2.13, `define_user_defined_triton_kernel`), and
`wrap_triton` reads a `launch_pdl=` keyword as a kernel argument. So this module wraps Inductor's
`CachingAutotuner._create_compile_meta`: a kernel of triton_ffn compiled with the constexpr PDL=True gets
`launch_pdl=True`; every other kernel is left as it was. Without the attribute the kernels' waits are no-ops, so
the outputs are right whether or not the wrapper is in place; only the speed differs. The wrapper runs where
Inductor compiles: in this process when the countdown backend compiles with CONFIG["pdl"] (it sets
compile_threads=1 and turns the FX graph cache off, whose entries do not record the setting), not in a compile
worker, an AOTInductor C++ wrapper or a subprocess compile mode: there the kernels run without the attribute.
"""

from __future__ import annotations

import functools
import re
import warnings

import torch

# the kernels of triton_ffn that take the PDL constexpr
KERNELS = frozenset({"_coef_kernel", "_gather_kernel", "_lowrank_kernel", "_lowrank_no_dot_kernel",
                     "_down_kernel", "_reduce_kernel"})

_installed: bool | None = None  # None: not tried yet; then whether the wrapper is in place


_unsupported_warned = False


def supported(device: torch.device) -> bool:
    """PDL needs NVIDIA compute capability 9.0 or later (Hopper); elsewhere CONFIG["pdl"] is off, said once."""
    global _unsupported_warned
    ok = torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9
    if not ok and not _unsupported_warned:
        _unsupported_warned = True
        warnings.warn(f"countdown: CONFIG['pdl'] asks for programmatic dependent launch, which needs an NVIDIA GPU of "
                      f"compute capability 9.0 or later; {torch.cuda.get_device_name(device)} runs without it.",
                      stacklevel=3)
    return ok


def traceable() -> bool:
    """Whether torch's TTIR analysis (which finds what a wrap_triton kernel writes) can read this triton's
    `gdc_wait`. Triton up to 3.6 writes it as an inline-asm op with side effects, which the analysis cannot
    read: it then takes every tensor argument as written, the weights included, and Inductor skips CUDA graphs
    for the whole graph ("mutated inputs"), which costs far more than PDL saves. Later triton has a
    grid_dependency_wait op of its own, which the analysis passes over."""
    try:
        from triton.language.semantic import TritonSemantic
    except ImportError:
        return False
    return hasattr(TritonSemantic, "grid_dependency_wait")


_untraceable_warned = False


def enabled(requested: bool, device: torch.device, traced: bool) -> bool:
    """Whether a launch of the FFN kernels on `device` uses PDL: asked for (CONFIG["pdl"]), on an NVIDIA GPU of
    compute capability 9.0+, and, where the launch goes through wrap_triton (`traced`: under torch.compile or
    torch.export), with a triton whose wait torch can analyse; otherwise off, each reason said once."""
    global _untraceable_warned
    if not requested or device.type != "cuda" or not supported(device):
        return False
    if traced and not traceable():
        if not _untraceable_warned:
            _untraceable_warned = True
            import triton

            warnings.warn(f"countdown: CONFIG['pdl'] is off under torch.compile with triton {triton.__version__}: "
                          "its gdc_wait is an inline-asm op that torch's kernel analysis cannot read, so every "
                          "kernel argument would count as written and CUDA graphs would be skipped. Eager calls "
                          "keep PDL; a triton with a grid_dependency_wait op (after 3.6) lifts this.", stacklevel=3)
        return False
    return True


def kernel_name(fn) -> str:
    """The Python name of a triton JITFunction (or of a plain function), without the `_<n>` suffix that
    Inductor's unique_user_kernel_names adds to a user kernel's copy."""
    name = getattr(getattr(fn, "fn", fn), "__name__", "")
    return name if name in KERNELS else re.sub(r"_\d+$", "", name)


def with_launch_pdl(compile_meta: dict, fn) -> dict:
    """compile_meta with launch_pdl=True when `fn` is one of our kernels compiled with PDL=True."""
    if kernel_name(fn) in KERNELS and compile_meta.get("constants", {}).get("PDL") is True:
        compile_meta["launch_pdl"] = True
    return compile_meta


def install() -> bool:
    """Wrap Inductor's compile-options hook once per process; False (with one warning) where this torch has no
    such hook, and the kernels then run without the attribute."""
    global _installed
    if _installed is not None:
        return _installed
    try:
        from torch._inductor.runtime.triton_heuristics import CachingAutotuner
    except ImportError:
        CachingAutotuner = None
    original = getattr(CachingAutotuner, "_create_compile_meta", None)
    if original is None:
        warnings.warn("countdown: CONFIG['pdl'] asks for programmatic dependent launch, but this torch's Inductor has "
                      "no CachingAutotuner._create_compile_meta to give the kernels the launch attribute: they run "
                      "without it (same outputs, no gain).", stacklevel=3)
        _installed = False  # warn once; the kernels' waits are no-ops without the attribute
        return False

    @functools.wraps(original)
    def create_compile_meta(self, cfg):
        return with_launch_pdl(original(self, cfg), self.fn)

    CachingAutotuner._create_compile_meta = create_compile_meta
    _installed = True
    return True
