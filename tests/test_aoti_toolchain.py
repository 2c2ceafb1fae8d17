"""countdown_fx.aoti: a compiler that would make AOTInductor packages crash at load is named before packaging."""

import stat

import pytest
import torch

from countdown_fx import aoti


def _fake_compiler(tmp_path, prints: str):
    path = tmp_path / "fake-g++"
    path.write_text(f"#!/bin/sh\necho '{prints}'\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


def test_a_compiler_without_shared_libstdcxx_is_refused_with_the_fix(tmp_path):
    fake = _fake_compiler(tmp_path, "libstdc++.so")  # what a GCC that finds no shared library prints
    with torch._inductor.config.patch({"cpp.cxx": (None, fake)}):
        assert aoti.inductor_cxx() == fake
        with pytest.raises(RuntimeError, match=r"(?s)finds no shared libstdc\+\+.*CXX=/usr/bin/g\+\+"):
            aoti.check_toolchain()


def test_a_compiler_with_shared_libstdcxx_passes(tmp_path):
    fake = _fake_compiler(tmp_path, "/usr/lib/gcc/x86_64-linux-gnu/12/libstdc++.so")
    assert aoti.toolchain_problem(fake) is None


def test_the_machines_own_compiler_passes():
    """CI packages AOTI programs on CPU (tests/test_aoti.py): its compiler must pass the check too."""
    assert aoti.inductor_cxx() is not None
    aoti.check_toolchain()
