"""AOTInductor packaging of a sparsified program: `compile_and_package` checks the toolchain first, and keeps
Inductor's own programmatic dependent launch off around the countdown kernels, as the torch.compile backend does.

The toolchain check: a C++ compiler that links libstdc++ statically into the
package makes the package crash (segfault) when it is loaded, with no message pointing at the cause.

Seen on a GPU image whose `CXX` names a GCC wrapper that cannot find a shared libstdc++: the package's
`wrapper.so` then carries its own copy of the C++ standard library next to the one Python has loaded, and a
trivial `x * 2 + 1` package crashes in `std::regex` at load (CPU and CUDA alike). Inductor picks the
compiler from `CXX` (else `g++`), so pointing `CXX` at a compiler with a shared libstdc++ fixes it.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

import torch


def inductor_cxx() -> str | None:
    """The C++ compiler Inductor would use for an AOTInductor package, or None if it finds none."""
    from torch._inductor import cpp_builder

    try:
        return cpp_builder.get_cpp_compiler()
    except Exception:  # noqa: BLE001 - no compiler: Inductor reports that itself, with its own message
        return None


def toolchain_problem(cxx: str | None = None) -> str | None:
    """Why AOTInductor packages built with `cxx` (default: Inductor's choice) would crash at load, or None.

    A compiler that knows a shared libstdc++ prints its absolute path for `-print-file-name=libstdc++.so`;
    one that does not echoes the bare name, and its links pull in the static library."""
    cxx = cxx or inductor_cxx()
    if cxx is None:
        return None
    try:
        found = subprocess.run([cxx, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                               timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # not a GCC/Clang-style driver: nothing to say
    if os.path.isabs(found):
        return None
    return (f"the C++ compiler Inductor uses for AOTInductor ({cxx}; from $CXX, else g++) finds no shared "
            f"libstdc++ (`{cxx} -print-file-name=libstdc++.so` printed {found!r}), so packages link libstdc++ "
            "statically and crash (segfault) when loaded. Set CXX to a compiler with a shared libstdc++, "
            "e.g. `CXX=/usr/bin/g++`, and clear Inductor's cache (TORCHINDUCTOR_CACHE_DIR) of packages built "
            "before.")


def check_toolchain(cxx: str | None = None) -> None:
    """Raise a RuntimeError naming the problem and its fix instead of a segfault at package load."""
    problem = toolchain_problem(cxx)
    if problem:
        raise RuntimeError(problem)


def compile_and_package(program: torch.export.ExportedProgram, package_path: str | None = None,
                        inductor_configs: dict[str, Any] | None = None) -> str:
    """torch._inductor.aoti_compile_and_package for a program from countdown_fx.sparsify; returns the package path.

    Before compiling: check_toolchain() (a clear error instead of a package that segfaults at load). Where the
    program holds countdown ops, Inductor's own PDL (TORCHINDUCTOR_ENABLE_PDL=1) is off, with the backend's one
    warning: next to the countdown kernels it cost up to 7.5% of decode speed on some machines and gained up to 3%
    on others (backend.inductor_pdl_patch).
    `inductor_configs` win, as the backend's inductor_options do: {"triton.enable_pdl": True} keeps it."""
    from .backend import has_countdown_ops, inductor_pdl_patch

    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"compile_and_package takes a torch.export.ExportedProgram (from torch.export.export, then "
                        f"countdown_fx.sparsify), not {type(program).__name__}")
    check_toolchain()
    user = dict(inductor_configs or {})
    configs = inductor_pdl_patch(user) if has_countdown_ops(program.graph_module) else {}
    configs.update(user)
    return torch._inductor.aoti_compile_and_package(program, package_path=package_path, inductor_configs=configs)
