"""Registers and spills of the FMA gather launch for sm_90, without a GPU (triton compiles to PTX on CPU; the
wheel's ptxas assembles it). Used to explain timings that a device run leaves open (NOTES.md).

    PYTHONPATH=. python3 benchmarks/speed/ptx_registers.py

Prints one line per variant of `_gather_kernel` for D-CountDown (bf16, 2-row groups, 2048 columns): 2 or 4 warps,
tokens 1 and 2, gate and up in one loop (FUSED) or two.
"""

import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from countdown_fx.kernels import triton_ffn

POINTERS = {"x_ptr": "*bf16", "wg_ptr": "*bf16", "wu_ptr": "*bf16", "bg_ptr": "*bf16", "bu_ptr": "*bf16",
            "dv_ptr": "*fp32", "thr_ptr": "*fp32", "a_ptr": "*bf16", "idx_ptr": "*i32", "cnt_ptr": "*i32",
            "flat_ptr": "*i32"}


def ptxas_report(kernel, constants: dict, num_warps: int) -> str:
    """ptxas -v's 'Used N registers' and spill lines for `kernel` specialised with `constants` (other
    arguments: the POINTERS types, else i32)."""
    names = kernel.arg_names
    signature = {n: POINTERS.get(n, "constexpr" if n in constants else "i32") for n in names}
    src = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(n),): v for n, v in constants.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps, "num_stages": 1})
    ptx = compiled.asm["ptx"]
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        for _ in range(2):  # the bundled ptxas may accept only an older PTX version: retry with the one it names
            with open(path, "w") as f:
                f.write(ptx)
            out = subprocess.run([ptxas, "-v", "-arch=sm_90a", path, "-o", os.path.join(d, "k.o")],
                                 capture_output=True, text=True)
            wanted = re.search(r"current version is '(\d+\.\d+)'", out.stderr)
            if not wanted:
                break
            ptx = re.sub(r"\.version \d+\.\d+", f".version {wanted.group(1)}", ptx)
    lines = [ln.split("info    :")[-1].strip() for ln in out.stderr.splitlines() if "registers" in ln or "spill" in ln]
    return " | ".join(lines) or out.stderr.strip()[-300:]


def main():
    for warps in (2, 4):  # 2: the default (CONFIG["gather_no_dot"]); 4: half the columns per thread
        for tokens in (1, 2):
            for fused in (False, True):
                constants = dict(MODE=triton_ffn.MODE_PRED, ACT=0, HAS_BG=False, HAS_BU=False, BLOCK_B=tokens,
                                 BLOCK_RG=2, BLOCK_K=2048, BLOCK_N=16, NB_P2=1024, NO_DOT=True, FUSED=fused,
                                 PREC="tf32", UPCAST=False)
                report = ptxas_report(triton_ffn._gather_kernel, constants, warps)
                print(f"gather FMA, {warps} warps, {tokens} token(s), fused={fused}: {report}")


if __name__ == "__main__":
    main()
