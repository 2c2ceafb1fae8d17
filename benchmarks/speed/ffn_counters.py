"""Hardware counters of one decode FFN call: DRAM bytes each launch really moves against the bytes the ceiling
counts, and its occupancy (Nsight Compute, on the GPU machine).

    PYTHONPATH=. python3 benchmarks/speed/ffn_counters.py --out $OUT [--batches 1,2] [--sparsities 0.7,0.9]

ffn_decode.py --profile times each launch; this says why a launch is slower than its bytes: whether it reads
more than it must (moved / counted > 1: partial sectors, re-reads, the index lists), whether too few warps
are resident to keep the loads in flight (achieved occupancy, and what limits the theoretical one), and how
many waves its grid needs. For every case the script runs itself under `ncu` (one process per case) and
profiles exactly one FFN call after warm-up (cudaProfilerStart / Stop); ncu flushes the caches before each
kernel, so every weight byte comes from DRAM, as in a model whose 32 layers never fit in L2. Dense is the
same FFN compiled by Inductor (cuBLAS GEMVs), as ffn_decode.py's baseline. ncu runs with
`--clock-control none` (the clocks left as they are); its kernel times are isolated launches, without the
gaps of a CUDA graph, so read them next to ffn_decode.py's graph times, not instead of them.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import subprocess
import sys
import tempfile

METRICS = {  # ncu metric -> column
    "gpu__time_duration.sum": "µs",
    "dram__bytes_read.sum": "DRAM read MB",
    "dram__bytes_write.sum": "DRAM write MB",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "DRAM % of peak",
    "launch__grid_size": "grid",
    "launch__waves_per_multiprocessor": "waves",
    "launch__registers_per_thread": "regs",
    "sm__maximum_warps_per_active_cycle_pct": "theoretical occupancy %",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved occupancy %",
    "launch__occupancy_limit_registers": "blocks/SM by regs",
    "launch__occupancy_limit_shared_mem": "blocks/SM by smem",
}
# launch names, matched as prefixes of the kernel names ncu reports ("_lowrank": either h = x V launch)
KERNELS = ("_lowrank", "_coef_kernel", "_gather_kernel", "_down_kernel", "_reduce_kernel")


def parse_ncu_csv(text: str) -> list[dict]:
    """Rows of `ncu --csv --page raw` output (one per profiled kernel): kernel name and the METRICS as floats.
    Lines before the header (ncu's own messages, the program's prints) and the units row are skipped."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise ValueError("no ncu CSV table in the output (did ncu profile any kernel?)")
    rows = []
    for rec in csv.DictReader(io.StringIO("\n".join(lines[start:]))):
        if not (rec.get("ID") or "").strip().isdigit():  # the units row
            continue
        row = {"kernel": rec["Kernel Name"]}
        for metric in METRICS:
            value = (rec.get(metric) or "").replace(",", "").strip()
            row[metric] = float(value) if value and value != "n/a" else float("nan")
        rows.append(row)
    return rows


def launch_name(kernel: str) -> str:
    """Our launch a kernel name belongs to (KERNELS), or the name itself cut short (cuBLAS, Inductor)."""
    return next((k for k in KERNELS if kernel.startswith(k)), kernel[:40])


def table_rows(case: str, rows: list[dict], counted: dict) -> list[str]:
    """Markdown rows of one case: each launch, then the call's total (µs, bytes) against the counted bytes."""
    out = []
    for r in rows:
        name = launch_name(r["kernel"])
        want = counted.get(name)
        read = r["dram__bytes_read.sum"]
        cells = [f"{r['gpu__time_duration.sum'] / 1e3:.1f}", f"{read / 1e6:.2f}",
                 "-" if want is None else f"{want / 1e6:.2f}", "-" if not want else f"{read / want:.2f}",
                 f"{r['dram__bytes_write.sum'] / 1e6:.2f}",
                 f"{r['dram__throughput.avg.pct_of_peak_sustained_elapsed']:.0f}",
                 f"{r['launch__grid_size']:.0f}", f"{r['launch__waves_per_multiprocessor']:.2f}",
                 f"{r['launch__registers_per_thread']:.0f}",
                 f"{r['sm__maximum_warps_per_active_cycle_pct']:.0f}",
                 f"{r['sm__warps_active.avg.pct_of_peak_sustained_active']:.0f}",
                 f"{r['launch__occupancy_limit_registers']:.0f} / {r['launch__occupancy_limit_shared_mem']:.0f}"]
        out.append(f"| {case} | {name} | " + " | ".join(cells) + " |")
    us = sum(r["gpu__time_duration.sum"] for r in rows) / 1e3
    read = sum(r["dram__bytes_read.sum"] for r in rows)
    want = sum(counted.values())
    out.append(f"| {case} | **all launches** | {us:.1f} | {read / 1e6:.2f} | {want / 1e6:.2f} | "
               f"{read / want:.2f} | " + " | ".join(["-"] * 8) + " |")
    return out


HEADER = ("| case | launch | µs (ncu) | DRAM read MB | counted MB | read / counted | DRAM write MB | DRAM % of peak "
          "| grid | waves / SM | regs / thread | theoretical occupancy % | achieved occupancy % "
          "| blocks / SM limit: regs / smem |\n" + "|---" * 14 + "|")


def run_case(method: str, B: int, s: float) -> None:
    """The child under ncu: warm up, then one profiled FFN call; prints the bytes the ceiling counts."""
    import torch

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import ffn_decode as fd

    torch.cuda.init()
    L = fd.Layer(*fd.SHAPES["llama-3.1-8b"])
    if method == "dense":
        dense_c = torch.compile(fd.dense_ffn, dynamic=False)
        xs = [L.tokens(B) for _ in range(fd.ROT)]

        def call(i):
            return dense_c(xs[i], L.w_gate, L.w_up, L.w_down)
        counted = {"all": L.bytes("dense", 1)}
    else:
        _, _, name, mode, xs, thr, _, side = next(c for c in fd.planned_cases(L, [B], [s]) if c[2] == method)
        call = fd.run_sparse(L, xs, thr, mode, {"sparse_side": side})
        union = (L.scores(xs[0], name) > thr).any(0).float().mean().item()  # of the profiled call's tokens
        counted = fd.kernel_bytes(L, name, side, union)
        print(f"COUNTDOWN_CASE side={side} union={union:.3f}", flush=True)
    for i in range(1, fd.ROT):  # warm-up: compiles, first launches
        call(i)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    call(0)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print("COUNTDOWN_COUNTED " + ",".join(f"{k}={v:.0f}" for k, v in counted.items()), flush=True)


def parse_child(stdout: str) -> tuple[dict, str]:
    """The counted bytes per launch and the case's side / union, from the child's own lines."""
    counted, info = {}, ""
    for line in stdout.splitlines():
        if line.startswith("COUNTDOWN_COUNTED "):
            counted = {k: float(v) for k, v in (kv.split("=") for kv in line.split()[1].split(","))}
        elif line.startswith("COUNTDOWN_CASE "):
            info = line.split(" ", 1)[1]
    return counted, info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".", help="folder for speed_ffn_counters.md and ncu_raw.log (every case's CSV)")
    ap.add_argument("--batches", default="1,2", help="comma-separated decode batch sizes")
    ap.add_argument("--sparsities", default="0.7,0.9", help="comma-separated target sparsities")
    ap.add_argument("--methods", default="dense,m,d", help="dense, m (M-CountDown), d (D-CountDown)")
    ap.add_argument("--commit", default=None, help="commit named in the header (default: git rev-parse)")
    ap.add_argument("--ncu", default="ncu", help="the Nsight Compute command")
    ap.add_argument("--case", default=None, help=argparse.SUPPRESS)  # the child: method,B,s
    args = ap.parse_args()
    if args.case:
        method, B, s = args.case.split(",")
        run_case(method, int(B), float(s))
        return

    import torch
    import triton

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from ffn_decode import git_commit

    os.makedirs(args.out, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix="ffn_counters_")
    commit = args.commit or git_commit()
    cmd = "PYTHONPATH=. python3 " + " ".join(sys.argv)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    lines = ["# Hardware counters of one decode FFN call (Llama-3.1-8B shape, bf16)", "",
             f"- device: {device}; torch {torch.__version__}; triton {triton.__version__}; commit {commit}; "
             f"command: `{cmd}`",
             f"- `{args.ncu} --clock-control none --profile-from-start off --csv --page raw` over one call after "
             "warm-up, caches flushed before each kernel (ncu's default); µs: ncu's kernel duration (isolated "
             "launches, no CUDA-graph gaps)",
             "- counted MB: the weight bytes the bytes ceiling counts for the launch (ffn_decode.kernel_bytes: the "
             "union of this call's tokens' masks); read / counted > 1: bytes read beyond them (activations, "
             "index lists, partial sectors, re-reads)",
             "- occupancy: achieved = sm__warps_active / peak while the SM is active; theoretical = what the "
             "launch's registers, shared memory and block size allow; blocks / SM limit from registers and "
             "from shared memory", "", HEADER]
    sparsities = [float(x) for x in args.sparsities.split(",")]
    for B in (int(b) for b in args.batches.split(",")):
        for s in sparsities:
            for method in args.methods.split(","):
                if method == "dense" and s != sparsities[0]:
                    continue  # dense once per batch
                case = f"{method.upper()} B={B}" + ("" if method == "dense" else f" s={s}")
                log = os.path.join(scratch, f"ncu_{method}_b{B}_s{s}.csv")
                proc = subprocess.run(
                    [args.ncu, "--clock-control", "none", "--profile-from-start", "off", "--csv", "--page", "raw",
                     "--metrics", ",".join(METRICS), "--log-file", log,
                     sys.executable, os.path.abspath(__file__), "--case", f"{method},{B},{s}"],
                    capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
                if proc.returncode != 0:
                    print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
                    raise SystemExit(f"{case}: ncu exited with {proc.returncode}")
                counted, info = parse_child(proc.stdout)
                with open(log) as f:  # ncu writes its table to the log file; some versions to stdout
                    text = f.read()
                text = text if '"ID"' in text else proc.stdout
                with open(os.path.join(args.out, "ncu_raw.log"), "a") as f:  # one file: the device returns few
                    f.write(f"## {case}\n{text}\n")
                rows = parse_ncu_csv(text)
                if info:
                    case += f" ({info})"
                lines += table_rows(case, rows, counted)
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "speed_ffn_counters.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
