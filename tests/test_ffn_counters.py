"""benchmarks/speed/ffn_counters.py reads Nsight Compute's CSV (only the GPU machine has ncu): its parsing
and table, on an ncu-shaped CSV with random values."""

import os
import random
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks", "speed"))
import ffn_counters as fc  # noqa: E402


def _ncu_csv(kernels: list[str], values: list[dict]) -> str:
    """What `ncu --csv --page raw` writes: its messages, a header, a units row, one row per kernel (values with
    thousands separators, as ncu prints large counts)."""
    fixed = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream", "Block Size",
             "Grid Size", "Device", "CC"]
    metrics = list(fc.METRICS)
    quote = lambda cells: ",".join(f'"{c}"' for c in cells)  # noqa: E731
    lines = ["==PROF== Connected to process 4242 (/usr/bin/python3.12)", "==PROF== Profiling \"_coef_kernel\"",
             quote(fixed + metrics), quote([""] * len(fixed) + ["unit"] * len(metrics))]
    for i, (name, vals) in enumerate(zip(kernels, values)):
        lines.append(quote([str(i), "4242", "python3", "127.0.0.1", name, "1", "7", "(128, 1, 1)", "(448, 1, 1)",
                            "0", "9.0"] + [f"{vals[m]:,.3f}" for m in metrics]))
    return "\n".join(lines) + "\n"


def _values(rng) -> dict:
    return {m: rng.uniform(1, 1e8) for m in fc.METRICS}


def test_parse_reads_every_kernel_and_metric():
    rng = random.Random(0)
    kernels = ["_lowrank_no_dot_kernel", "_coef_kernel", "_gather_kernel", "_down_kernel"]
    values = [_values(rng) for _ in kernels]
    rows = fc.parse_ncu_csv(_ncu_csv(kernels, values))
    assert [r["kernel"] for r in rows] == kernels  # the messages and the units row skipped
    for row, vals in zip(rows, values):
        for metric, want in vals.items():
            assert row[metric] == pytest.approx(want, rel=1e-9, abs=1e-3)


def test_parse_without_a_table_says_so():
    with pytest.raises(ValueError, match="no ncu CSV table"):
        fc.parse_ncu_csv("==PROF== Connected to process 1\n==WARNING== No kernels were profiled.\n")


def test_table_compares_each_launch_and_the_call_with_the_counted_bytes():
    rng = random.Random(1)
    kernels = ["_coef_kernel", "_gather_kernel", "_down_kernel"]
    values = [_values(rng) for _ in kernels]
    rows = fc.parse_ncu_csv(_ncu_csv(kernels, values))
    counted = {"_coef_kernel": rng.uniform(1e7, 1e8), "_gather_kernel": rng.uniform(1e6, 1e7),
               "_down_kernel": rng.uniform(1e6, 1e7)}
    lines = fc.table_rows("M B=1 s=0.7", rows, counted)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    assert len(cells) == 4 and all(len(c) == len(fc.HEADER.splitlines()[0].strip("|").split("|")) for c in cells)
    for cell, name, vals in zip(cells, kernels, values):
        assert cell[1] == name
        assert float(cell[3]) == pytest.approx(vals["dram__bytes_read.sum"] / 1e6, abs=0.01)
        assert float(cell[5]) == pytest.approx(vals["dram__bytes_read.sum"] / counted[name], rel=0.01, abs=0.01)
    total = cells[-1]
    assert total[1] == "**all launches**"
    assert float(total[2]) == pytest.approx(sum(v["gpu__time_duration.sum"] for v in values) / 1e3, abs=0.1)
    read = sum(v["dram__bytes_read.sum"] for v in values)
    assert float(total[5]) == pytest.approx(read / sum(counted.values()), rel=0.01, abs=0.01)


def test_launch_names_and_the_childs_lines():
    assert fc.launch_name("_lowrank_no_dot_kernel") == "_lowrank"
    assert fc.launch_name("_reduce_kernel_0") == "_reduce_kernel"
    cublas = "void gemv2T_kernel_val<int, int, __nv_bfloat16, __nv_bfloat16, float, 128, 16, 4, 4>"
    assert fc.launch_name(cublas) == cublas[:40]  # not ours: its name, cut short
    counted, info = fc.parse_child("noise\nCOUNTDOWN_CASE side=gather union=0.301\n"
                                   "COUNTDOWN_COUNTED _coef_kernel=117440512,_down_kernel=35232154\n")
    assert counted == {"_coef_kernel": 117440512.0, "_down_kernel": 35232154.0}
    assert info == "side=gather union=0.301"


def test_main_runs_each_case_under_ncu_and_writes_one_table(tmp_path):
    """The parent with a stand-in for ncu (which writes a CSV for two kernels and the child's lines): one ncu run
    per case (dense once per batch), every case's rows in speed_ffn_counters.md and the raw CSVs in one log."""
    import subprocess

    fake = tmp_path / "ncu"
    calls = tmp_path / "calls"
    rng = random.Random(2)
    csv_text = _ncu_csv(["_coef_kernel", "_down_kernel"], [_values(rng), _values(rng)])
    fake.write_text(
        "#!" + sys.executable + "\nimport sys\n"
        f"open({str(calls)!r}, 'a').write(sys.argv[-1] + '\\n')\n"
        "log = sys.argv[sys.argv.index('--log-file') + 1]\n"
        f"open(log, 'w').write({csv_text!r})\n"
        "print('COUNTDOWN_CASE side=gather union=0.300')\n"
        "print('COUNTDOWN_COUNTED _coef_kernel=1000000,_down_kernel=2000000')\n")
    fake.chmod(0o755)
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "speed", "ffn_counters.py")
    proc = subprocess.run([sys.executable, script, "--ncu", str(fake), "--batches", "1,2", "--sparsities", "0.7,0.9",
                           "--commit", "abc1234", "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert calls.read_text().split() == [f"{m},{b},{s}" for b in (1, 2) for s in (0.7, 0.9)
                                         for m in ("dense", "m", "d") if m != "dense" or s == 0.7]
    table = (tmp_path / "out" / "speed_ffn_counters.md").read_text()
    assert "commit abc1234" in table
    totals = [line for line in table.splitlines() if "**all launches**" in line]
    assert len(totals) == 10
    assert table.count("| M B=2 s=0.9 (side=gather union=0.300) | _down_kernel |") == 1
    assert (tmp_path / "out" / "ncu_raw.log").read_text().count('"ID"') == 10
