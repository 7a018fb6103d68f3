"""Search speed on this machine, measured side by side in one run (a script, not a test).

1. The same seeded search (FIFO, concurrency 1) with the trial cache on vs --no-cache: wall-time ratio.
2. Orchestration overhead: `launch` wall time / the sum of standalone `tskd-tune trial` wall times for
   the same sampled configs, run one after another on a fresh cache (so both build the same teachers).

    .venv/bin/python benchmarks/search_speed.py [--space search_spaces/demo.yaml] [--trials 4] [--set k=v ...]

Prints a table and writes benchmarks/results/search_speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/demo.yaml")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--work", default="runs/bench-search")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config override, as for launch"
    )
    args = ap.parse_args()
    work = (REPO / args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cli = [sys.executable, "-m", "tskd_tune"]
    common = ["--set", "search.scheduler=fifo", "--set", f"search.num_samples={args.trials}", "--max-concurrent", "1",
              "--storage", str(work / "runs"), "--tracking-uri", f"sqlite:///{work}/mlflow.db"]  # fmt: skip
    for item in args.overrides:
        common += ["--set", item]

    def launch(name: str, cache: Path, *extra: str) -> float:
        return timed(
            [*cli, "launch", args.space, "--name", name, "--set", f"cache.dir={cache}", *common, *extra]
        )

    walls = {
        "cache_on": launch("cache-on", work / "cache-on"),
        "cache_off": launch("cache-off", work / "cache-off", "--no-cache"),
    }

    # the same configs again, as standalone trials in launch order, on a fresh cache
    trial_dirs = sorted((work / "runs" / "cache-on").glob("_trainable_*"), key=lambda p: p.stat().st_mtime)
    standalone = []
    for i, d in enumerate(trial_dirs):
        cfg = d / "outputs" / "config.yaml"
        text = cfg.read_text().replace(str(work / "cache-on"), str(work / "cache-standalone"))
        (work / f"trial{i}.yaml").write_text(text)
        standalone.append(
            timed([*cli, "trial", str(work / f"trial{i}.yaml"), "--out", str(work / f"trial{i}")])
        )
    result = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {__import__('os').cpu_count()} cores",
        "space": args.space,
        "trials": args.trials,
        "overrides": args.overrides,
        "launch_wall_cache_on_s": round(walls["cache_on"], 1),
        "launch_wall_cache_off_s": round(walls["cache_off"], 1),
        "cache_off_over_on": round(walls["cache_off"] / walls["cache_on"], 2),
        "standalone_trial_walls_s": [round(s, 1) for s in standalone],
        "launch_over_standalone_sum": round(walls["cache_on"] / sum(standalone), 2),
    }
    out = REPO / "benchmarks" / "results" / "search_speed.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    print(f"written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
