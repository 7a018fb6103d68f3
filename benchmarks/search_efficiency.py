"""Search efficiency: TPE + ASHA vs random search + FIFO, trials (and wall time) to reach 95% of the best
`val_dice`, over several sampler seeds.

Each arm runs the same space with the same number of trials at concurrency 1 (so completion order is
creation order), every search on its own fresh cache (each pays for its own teachers). The target is
``--threshold`` x the best `val_dice` any search of the run found; per search we count the trials
completed, and the seconds since `launch` started, until one of them reached it (an ASHA-stopped
trial counts with the last `val_dice` it reported, which is what the searcher saw). Also reported:
epochs trained in all (what ASHA saves) and the search's wall time.

Trials-to-target is a quality-of-search figure (insensitive to machine load); the wall times are not.

    .venv/bin/python benchmarks/search_efficiency.py [--trials 12] [--seeds 0 1 2] [--set k=v ...]
    .venv/bin/python benchmarks/search_efficiency.py --quick
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from _common import (
    REPO,
    plot_path,
    provenance,
    read_trials,
    run_cli,
    save_figure,
    spread,
    table,
    write_result,
)

ARMS = {"tpe+asha": ("tpe", "asha"), "random+fifo": ("random", "fifo")}
# the kd_methods sizing (mni152 at 64 px, ts_kd, N=10) with shorter students, so a trial takes ~30 s
DEFAULT_SET = {
    "data.image_size": 64,
    "teacher.model_kwargs": {"img_size": 64, "patch_size": 8, "depth": 4},
    "student.epochs": 12,
    "search.grace_period": 3,
    "distill.method": "ts_kd",
}
QUICK_SET = {
    "data.image_size": 32,
    "teacher.model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
    "teacher.decoder_channels": 16,
    "teacher.epochs": 2,
    "student.channels": [8, 16, 32],
    "student.epochs": 3,
    "search.grace_period": 1,
    "distill.method": "ts_kd",
}


def run_search(space: str, arm: str, seed: int, trials: int, sets: dict, work) -> dict:
    """One search of ``arm`` with sampler seed ``seed`` on a fresh cache; its trials and wall time."""
    algorithm, scheduler = ARMS[arm]
    name = f"{arm.replace('+', '-')}-s{seed}"
    shutil.rmtree(work / name, ignore_errors=True)
    (work / name).mkdir(parents=True)  # its cache and MLflow store: fresh for every run
    over = sets | {"search.algorithm": algorithm, "search.scheduler": scheduler, "search.seed": seed,
                   "cache.dir": str(work / name / "cache")}  # fmt: skip
    cli = ["launch", space, "--name", name, "--storage", str(work / "runs"), "--num-samples", str(trials),
           "--max-concurrent", "1", "--tracking-uri", f"sqlite:///{work / name}/mlflow.db"]  # fmt: skip
    for k, v in over.items():
        cli += ["--set", f"{k}={json.dumps(v)}"]
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    t0 = time.time()
    wall, _ = run_cli(cli)
    return {
        "arm": arm,
        "seed": seed,
        "start": t0,
        "wall_s": wall,
        "trials": read_trials(work / "runs" / name),
    }


def to_target(search: dict, target: float) -> dict:
    """Trials completed (in completion order) and seconds since launch until the running best >= target."""
    done = sorted(search["trials"], key=lambda t: (t["last_ts"], t["index"]))
    best = float("-inf")
    for k, t in enumerate(done, 1):
        if t["metric"] is not None:
            best = max(best, t["metric"])
        if best >= target:
            return {"trials_to_target": k, "time_to_target_s": t["last_ts"] - search["start"]}
    return {"trials_to_target": None, "time_to_target_s": None}


def plot(searches: list[dict], target: float, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    colours = {"tpe+asha": "tab:blue", "random+fifo": "tab:orange"}
    labelled = set()
    for s in searches:
        done = sorted(s["trials"], key=lambda t: (t["last_ts"], t["index"]))
        best, ys = float("-inf"), []
        for t in done:
            best = max(best, t["metric"] if t["metric"] is not None else best)
            ys.append(best)
        label = None if s["arm"] in labelled else s["arm"]
        labelled.add(s["arm"])
        ax.step(range(1, len(ys) + 1), ys, where="post", color=colours.get(s["arm"]), alpha=0.8, label=label)
    ax.axhline(target, color="grey", linestyle=":", label="target")
    ax.set_xlabel("trials completed")
    ax.set_ylabel("best val Dice so far")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/mni152.yaml")
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--work", default="runs/bench-search-efficiency")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override k=v")
    ap.add_argument("--quick", action="store_true", help="smoke run: 32 px, 3 trials, 1 seed")
    args = ap.parse_args()
    from tskd_tune.config import parse_overrides

    if args.quick:
        args.trials, args.seeds = min(args.trials, 3), args.seeds[:1]
    sets = (QUICK_SET if args.quick else DEFAULT_SET) | parse_overrides(args.overrides)
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    searches = []
    for seed in args.seeds:
        for arm in args.arms:
            print(f"{arm}, sampler seed {seed}: {args.trials} trials ...", flush=True)
            searches.append(run_search(args.space, arm, seed, args.trials, sets, work))
    best = max(t["metric"] for s in searches for t in s["trials"] if t["metric"] is not None)
    target = args.threshold * best
    rows = []
    for s in searches:
        s |= to_target(s, target)
        rows.append({"arm": s["arm"], "seed": s["seed"], "trials_to_target": s["trials_to_target"],
                     "time_to_target_s": s["time_to_target_s"], "best_val_dice": max(t["metric"] or 0 for t in s["trials"]),
                     "epochs_total": sum(t["epochs"] for t in s["trials"]), "wall_s": s["wall_s"]})  # fmt: skip
    summary = []
    for arm in args.arms:
        mine = [r for r in rows if r["arm"] == arm]
        row = {
            "arm": arm,
            "searches": len(mine),
            "reached": sum(r["trials_to_target"] is not None for r in mine),
        }
        for key in ("trials_to_target", "time_to_target_s", "best_val_dice", "epochs_total", "wall_s"):
            sp = spread([r[key] for r in mine])
            row |= {key: sp["mean"], key + "_std": sp["std"]}
        summary.append(row)
    print(f"\ntarget: {args.threshold} x best val_dice {best:.4f} = {target:.4f}\n")
    print(table(rows))
    print()
    print(table(summary, ["arm", "searches", "reached", "trials_to_target", "trials_to_target_std", "time_to_target_s",
                          "best_val_dice", "epochs_total", "wall_s"]))  # fmt: skip
    result = provenance() | {
        "space": args.space, "overrides": sets, "trials": args.trials, "seeds": args.seeds, "concurrency": 1,
        "threshold": args.threshold, "best_val_dice": best, "target": target,
        "wall_s": round(time.perf_counter() - t_start, 1), "summary": summary, "searches": rows,
        "trials_detail": {f"{s['arm']}-s{s['seed']}": s["trials"] for s in searches},
        "note": "trials_to_target: quality of search (load-insensitive); *_s: wall times (load-sensitive)",
    }  # fmt: skip
    out = write_result("search_efficiency", result, args.quick)
    png = plot_path("search_efficiency", args.quick)
    plot(searches, target, png)
    print(f"\nwritten to {out.relative_to(REPO)} and {png.relative_to(REPO)}")


if __name__ == "__main__":
    main()
