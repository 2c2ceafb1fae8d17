"""benchmarks/speed/decode_e2e.py --tiny on CPU: the table it writes carries, for every sparse row, the
decode sparsity and union the meter counted (not a timing test: speed is only measured on the GPU)."""

import os
import re
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _table_rows(table: str, variants: str) -> list[list[str]]:
    """The cells of the markdown table's rows whose first cell matches the regex `variants`."""
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if re.match(rf"\| ({variants}) \|", line)]


def test_decode_e2e_tiny_reports_the_sparsity_decode_reached(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "speed", "decode_e2e.py"), "--tiny", "--variants",
         "dense,dense+ipdl,m0.7,m0.7+atomic,m0.7+ipdl", "--batches", "1,2", "--prompts", "2", "--out", str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "speed_decode_e2e.md").read_text()
    variants = ("dense", "dense+ipdl", "m0.7", "m0.7+atomic", "m0.7+ipdl")
    rows = {(cells[0], int(cells[1])): cells for cells in _table_rows(table, "|".join(map(re.escape, variants)))}
    assert set(rows) == {(v, b) for v in variants for b in (1, 2)}
    for batch in (1, 2):
        sparsity, union = rows[("m0.7", batch)][4], rows[("m0.7", batch)][5]
        mean = float(sparsity.split()[0])
        assert abs(mean - 0.7) < 0.05, sparsity  # M's thresholds hold their target on these random tokens
        assert re.fullmatch(r"\d\.\d\d \(\d\.\d\d-\d\.\d\d\)", union), union  # mean (range) over 2 prompts
    assert float(rows[("m0.7", 1)][5].split()[0]) <= float(rows[("m0.7", 2)][5].split()[0])  # 2 tokens read more
    assert rows[("dense", 1)][4] == "-"
    # a kernel preset ("+atomic") runs the plain variant's calibration, so its meter row is the plain one's
    assert all(rows[(v, b)][2:6] == rows[("m0.7", b)][2:6] for v in ("m0.7+atomic", "m0.7+ipdl") for b in (1, 2))
    for batch in (1, 2):  # speed-ups are against the faster of the two dense rows
        dense_speedups = sorted(float(rows[(v, batch)][7].rstrip("x")) for v in ("dense", "dense+ipdl"))
        assert dense_speedups[1] == 1.0 and dense_speedups[0] <= 1.0, dense_speedups
        assert rows[("dense+ipdl", batch)][2:6] == ["-"] * 4


def test_decode_e2e_refuses_an_unknown_preset(tmp_path):
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "speed", "decode_e2e.py"), "--tiny", "--variants",
         "dense,m0.7+atomc", "--out", str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and "unknown variant preset(s) ['atomc']" in proc.stderr, proc.stderr[-2000:]


def test_decode_tp_tiny_reports_each_ranks_decode_sparsity(tmp_path):
    """benchmarks/speed/decode_tp.py --tiny on 2 gloo processes: every sparse row carries the sparsity and union
    the meter counted on each rank's shards (mean over ranks and prompts, with its range)."""
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         os.path.join(ROOT, "benchmarks", "speed", "decode_tp.py"), "--tiny", "--variants", "dense,m0.7",
         "--batches", "1", "--prompts", "2", "--out", str(tmp_path)],
        env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "speed_decode_tp2.md").read_text()
    rows = {cells[0]: cells for cells in _table_rows(table, r"dense|m0\.7")}
    assert set(rows) == {"dense", "m0.7"}
    assert rows["dense"][2:4] == ["-", "-"]
    sparsity, union = rows["m0.7"][2], rows["m0.7"][3]
    assert re.fullmatch(r"\d\.\d\d \(\d\.\d\d-\d\.\d\d\)", sparsity), sparsity  # 2 ranks x 2 prompts
    assert abs(float(sparsity.split()[0]) - 0.7) < 0.05, sparsity  # each shard's threshold holds its target
    assert abs(float(union.split()[0]) - 0.3) < 0.05, union  # one token: union = 1 - sparsity
