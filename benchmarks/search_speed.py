"""Search speed on this machine, measured side by side in one run (a script, not a test).

1. The same seeded search (FIFO, concurrency 1) with the trial cache on vs --no-cache: wall-time ratio.
2. Orchestration overhead: `launch` wall time / the sum of standalone `tskd-tune trial` wall times for
   the same sampled configs, run one after another on a fresh cache (so both build the same teachers).
3. Time to first epoch: seconds from starting `launch` to the first trial's first report, split into
   the part before the trial started (data, Ray, worker start-up, MLflow) and the trial's own part
   (teacher, transfer set, first epoch).
4. Orchestration of a small scratch search (2 student epochs, concurrency 1, no reference trials):
   seconds from `launch` to the first trial's start, between trials per trial, and after the last trial
   (summary, test, report). Goals: <= 10 s to the first trial and <= 0.5 s per trial.

A timing benchmark: run it on a quiet machine.

    .venv/bin/python benchmarks/search_speed.py [--space search_spaces/demo.yaml] [--trials 4] [--set k=v ...]
    .venv/bin/python benchmarks/search_speed.py --quick

Prints a table and writes benchmarks/results/search_speed.json.
"""

from __future__ import annotations

import argparse
import shutil
import time

from _common import REPO, provenance, read_trials, run_cli, write_result

QUICK_SET = [
    "data.dataset=phantom",
    "data.image_size=32",
    "data.options={num_images: 80, size: 64}",
    "data.unlabeled=40",
    "synthetic.generator=none",
    "teacher.model=vit_small_patch16_224",
    "teacher.augment_views=0",
    "teacher.model_kwargs={img_size: 32, patch_size: 8, depth: 2, embed_dim: 64, num_heads: 2}",
    "teacher.epochs=2",
    "student.epochs=2",
    "student.channels=[8, 16, 32]",
    "search.grace_period=1",
    "search.baselines=[]",
]


def orchestration(work, common: list[str], trials: int) -> dict:
    """Part 4: a scratch search of 2 student epochs; what launch costs before, between and after its trials.

    The trials' spans are their MLflow child runs (millisecond start and end); each trial's own work is its
    ``total_s`` (run_trial, from data to saved outputs). Before: launch -> the first run's start. Between:
    (first start -> last end - the trials' own work) / trials, at concurrency 1 the per-trial cost of Ray
    Tune, the trainable and MLflow. After: the last run's end -> launch's exit (summary, test, report)."""
    import json

    from mlflow.tracking import MlflowClient

    start = time.time()
    wall, _ = run_cli(
        [
            "launch",
            "search_spaces/demo.yaml",
            "--name",
            "overhead",
            "--set",
            "distill.method=scratch",
            "--set",
            "student.epochs=2",
            "--set",
            "search.baselines=[]",
            "--set",
            f"cache.dir={work / 'cache-on'}",
            *common,
        ]
    )
    folder = work / "runs" / "overhead"
    rows = read_trials(folder)
    own = sum(json.loads(p.read_text())["total_s"] for p in folder.glob("t*_*/outputs/metrics.json"))
    uri = common[common.index("--tracking-uri") + 1]
    client = MlflowClient(uri)
    runs = [
        r
        for r in client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
        if r.data.tags.get("ray.trial_id") or r.data.tags.get("mlflow.parentRunId")
    ]
    runs = [r for r in runs if r.info.start_time / 1000 >= start - 1]  # this launch's trials
    first, last = min(r.info.start_time for r in runs) / 1000, max(r.info.end_time for r in runs) / 1000
    return {
        "overhead_search_wall_s": round(wall, 1),
        "launch_to_first_trial_start_s": round(first - start, 1),
        "trials_own_total_s": round(own, 1),
        "trials": len(rows),
        "between_trials_per_trial_s": round((last - first - own) / max(1, len(rows)), 2),
        "after_last_trial_s": round(start + wall - last, 1),
        # the figure of earlier runs: everything after the first trial's start but the trials' own work
        "orchestration_per_trial_s": round((wall - (first - start) - own) / max(1, len(rows)), 2),
        "overhead_goals": "launch to first trial start <= 10 s; orchestration <= 0.5 s per trial",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/demo.yaml")
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--work", default="runs/bench-search")
    ap.add_argument(
        "--set", dest="overrides", action="append", default=[], help="config override, as for launch"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: phantom at 32 px, 2 trials, tiny models")
    ap.add_argument(
        "--overhead-only",
        action="store_true",
        help="part 4 alone (a minute a run): written to search_speed_overhead.json",
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs of part 4 alone (their median is the figure)")
    args = ap.parse_args()
    if args.quick:
        args.trials = min(args.trials, 2)
        args.overrides = QUICK_SET + args.overrides
    work = (REPO / args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t_start = time.perf_counter()
    common = [
        "--set",
        "search.scheduler=fifo",
        "--set",
        f"search.num_samples={args.trials}",
        "--max-concurrent",
        "1",
        "--storage",
        str(work / "runs"),
        "--tracking-uri",
        f"sqlite:///{work}/mlflow.db",
    ]
    for item in args.overrides:
        common += ["--set", item]
    if args.overhead_only:
        runs = []
        for _ in range(args.repeat):
            shutil.rmtree(work / "runs" / "overhead", ignore_errors=True)
            runs.append(orchestration(work, common, args.trials))
        keys = [
            "launch_to_first_trial_start_s",
            "between_trials_per_trial_s",
            "after_last_trial_s",
            "orchestration_per_trial_s",
        ]
        median = {f"median_{k}": sorted(r[k] for r in runs)[len(runs) // 2] for k in keys}
        result = provenance() | {
            "space": args.space,
            "trials": args.trials,
            **median,
            "runs": runs,
            "note": "timing figures: valid only on a quiet machine",
        }
        return report(write_result("search_speed_overhead", result, args.quick), result)

    def launch(name: str, cache, *extra: str) -> tuple[float, float]:
        start = time.time()
        wall, _ = run_cli(
            ["launch", args.space, "--name", name, "--set", f"cache.dir={cache}", *common, *extra]
        )
        return wall, start

    on_wall, on_start = launch("cache-on", work / "cache-on")
    off_wall, _ = launch("cache-off", work / "cache-off", "--no-cache")

    # the same configs again, as standalone trials in launch order, on a fresh cache
    trial_dirs = sorted((work / "runs" / "cache-on").glob("t[0-9]*_*"), key=lambda p: p.stat().st_mtime)
    standalone = []
    for i, d in enumerate(trial_dirs):
        cfg = d / "outputs" / "config.yaml"
        text = cfg.read_text().replace(str(work / "cache-on"), str(work / "cache-standalone"))
        (work / f"trial{i}.yaml").write_text(text)
        standalone.append(
            run_cli(["trial", str(work / f"trial{i}.yaml"), "--out", str(work / f"trial{i}")])[0]
        )
    overhead = orchestration(work, common, args.trials)
    first = min(read_trials(work / "runs" / "cache-on"), key=lambda t: t["first_ts"])
    to_first = first["first_ts"] - on_start
    result = provenance() | {
        "space": args.space,
        "trials": args.trials,
        "overrides": args.overrides,
        "launch_wall_cache_on_s": round(on_wall, 1),
        "launch_wall_cache_off_s": round(off_wall, 1),
        "cache_off_over_on": round(off_wall / on_wall, 2),
        "standalone_trial_walls_s": [round(s, 1) for s in standalone],
        "launch_over_standalone_sum": round(on_wall / sum(standalone), 2),
        "launch_to_first_epoch_s": round(to_first, 1),
        "first_trial_own_s": round(first["first_iter_s"], 1),
        "before_first_trial_s": round(to_first - first["first_iter_s"], 1),
        **overhead,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "note": "timing figures (1 s resolution for the first-epoch split): valid only on a quiet machine",
    }
    report(write_result("search_speed", result, args.quick), result)


def report(out, result: dict) -> None:
    width = max(map(len, result))
    for k, v in result.items():
        if k != "machine":
            print(f"{k:<{width}}  {v}")
    print(f"written to {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
