"""benchmarks/kd_methods.py: a probe with its own cells file keeps its results beside them, never over the grid's."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GRID = REPO / "benchmarks" / "results" / "kd_methods.json"


def test_a_probe_writes_beside_its_cells_not_over_the_grid(tmp_path):
    before = GRID.read_bytes() if GRID.is_file() else None
    cells = tmp_path / "probe.cells.jsonl"
    probe = shlex.split(
        "--report-only --n 10 --seeds 0 1 --variants scratch ts_kd --set distill.temperature=1"
    )
    script = REPO / "benchmarks" / "kd_methods.py"
    run = subprocess.run(
        [sys.executable, str(script), *probe, "--cells", str(cells)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads((tmp_path / "probe.json").read_text())
    # no finished cells: every planned cell is listed as missing, with the probe's override recorded
    assert {(m["variant"], m["seed"]) for m in result["missing"]} == {
        (v, s) for v in ("scratch", "ts_kd") for s in (0, 1)
    }
    assert result["base_overrides"]["distill.temperature"] == 1
    # every result records how fast this machine was, so walls from two sessions can be compared
    reference = result["machine"]["reference"]
    assert reference["matmul_gflops_1thread"] > 0 and reference["seconds"] >= 0.5
    assert (GRID.read_bytes() if GRID.is_file() else None) == before
