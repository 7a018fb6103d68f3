"""Soak: a 100-trial search of tiny trials at concurrency 2 (`make test-soak`, minutes; not in CI).

Each trial's last Ray result carries its worker's resident memory, open descriptors and threads
(``trainable.process_stats``); the trials' MLflow runs give their start and end (milliseconds). Compared
between the first ten and the last ten trials: memory grows by at most 10%, descriptors and threads do not
grow, the orchestration between a worker's consecutive trials stays flat; and MLflow holds exactly one
child run per trial, each with one val Dice per epoch. The figures go to ``runs/soak/soak.json`` (and
docs/BENCHMARKS.md, "Soak")."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_raw

pytestmark = pytest.mark.soak
TRIALS, EPOCHS = 100, 2


def final_results(search: Path) -> list[dict]:
    rows = []
    for f in search.glob("t[0-9]*_*/result.json"):
        lines = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        rows.append(lines[-1] | {"index": int(f.parent.name[1:].split("_")[0])})
    return sorted(rows, key=lambda r: r["index"])


def test_a_100_trial_search_leaks_nothing(tmp_path):
    from mlflow.tracking import MlflowClient

    raw = tiny_raw(tmp_path, student={"epochs": EPOCHS}, teacher={"epochs": 1}, resources={"threads": 1})
    raw["search"] = {
        "num_samples": TRIALS,
        "max_concurrent": 2,
        "scheduler": "fifo",
        "algorithm": "random",
        "baselines": [],
        "space": {"distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0}},
    }
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "soak"}
    space = tmp_path / "soak.yaml"
    space.write_text(yaml.safe_dump(raw))
    t0 = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tskd_tune",
            "launch",
            str(space),
            "--storage",
            str(tmp_path / "runs"),
            "--name",
            "soak",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=3600,
    )
    wall = time.time() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    search = tmp_path / "runs" / "soak"
    rows = final_results(search)
    assert len(rows) == TRIALS and all(r["epoch"] == EPOCHS for r in rows)

    client = MlflowClient(raw["tracking"]["uri"])
    exp = client.get_experiment_by_name("soak")
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    kids = {r.data.tags["ray.trial_id"]: r for r in runs if "ray.trial_id" in r.data.tags}
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    steps = {tid: len(client.get_metric_history(r.info.run_id, "val_dice")) for tid, r in kids.items()}
    assert len(parents) == 1 and set(kids) == {r["trial_id"] for r in rows}
    assert all(n == EPOCHS for n in steps.values()) and all(
        r.info.status == "FINISHED" for r in kids.values()
    )

    # per worker (Ray reuses a worker process trial after trial): the gap between one trial's run ending and
    # the next one's starting on the same worker, in the search's order
    by_pid: dict[int, list] = {}
    for r in rows:
        run = kids[r["trial_id"]].info
        by_pid.setdefault(r["pid"], []).append((run.start_time / 1000, run.end_time / 1000, r["index"]))
    gaps = {}
    for spans in by_pid.values():
        spans.sort()
        for (_, end, _), (start, _, index) in zip(spans, spans[1:], strict=False):
            gaps[index] = start - end
    first, last = rows[:10], rows[-10:]

    def mean(key, part):
        return statistics.mean(r[key] for r in part)

    def gap(part):
        return statistics.median(gaps[r["index"]] for r in part if r["index"] in gaps)

    figures = {
        "command": "make test-soak",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "trials": TRIALS,
        "concurrency": 2,
        "epochs": EPOCHS,
        "wall_s": round(wall, 1),
        "workers": len(by_pid),
        "rss_mb_first10": round(mean("worker_rss_mb", first), 1),
        "rss_mb_last10": round(mean("worker_rss_mb", last), 1),
        "fds_first10": mean("worker_fds", first),
        "fds_last10": mean("worker_fds", last),
        "threads_first10": mean("worker_threads", first),
        "threads_last10": mean("worker_threads", last),
        "gap_s_first10": round(gap(first), 3),
        "gap_s_last10": round(gap(last), 3),
        "mlflow_child_runs": len(kids),
        "mlflow_val_dice_points": sum(steps.values()),
    }
    (tmp_path / "soak.json").write_text(json.dumps(figures, indent=1))
    out = Path("runs") / "soak"
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(figures, indent=1))
    print("\nsoak:", json.dumps(figures))
    assert figures["rss_mb_last10"] <= 1.10 * figures["rss_mb_first10"]
    assert figures["fds_last10"] <= figures["fds_first10"] + 2  # a socket more or less, not a growth
    assert figures["threads_last10"] <= figures["threads_first10"] + 2
    assert figures["gap_s_last10"] <= max(2 * figures["gap_s_first10"], figures["gap_s_first10"] + 0.5)
