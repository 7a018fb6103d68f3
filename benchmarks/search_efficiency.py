"""Search efficiency: TPE + ASHA (or Hyperband) vs random search + FIFO vs random + FIFO with twice the budget,
over several sampler seeds: compute to reach random + FIFO's final best, and the best val Dice at equal compute.

The space is ``search_spaces/mni152.yaml`` (pretrained LiteMedSAM teacher, frozen, its head trained once:
every trial of every search finds it, its features and its outputs on the transfer set in one shared cache
that a first 1-trial search fills; that is not counted), searched over temperature, KD and supervised
weights and the student's lr. Per sampler seed:

1. random + FIFO with ``2 x --trials`` trials. Its first ``--trials`` trials are the random + FIFO arm:
   at concurrency 1 Optuna's RandomSampler proposes the same sequence whatever the budget.
2. ASHA's grace period from the data (issue 15, item 2): over every random + FIFO trial of every seed,
   the Spearman rank correlation between each epoch's val Dice and the final one; the grace period is
   the first epoch from which it stays at or above ``--trust`` (0.6, the level ``launch`` warns below).
3. TPE + ASHA (``--scheduler hyperband``: TPE + Hyperband) with ``--trials`` trials, that grace period,
   ``--startup-trials`` random start-up trials.

A trial's compute is the ``cpu_s`` it reported last (its process's CPU time, all threads; an ASHA-stopped
trial counts what it spent until it stopped), and its score the last val Dice it reported (what the
searcher saw). Compute and scores do not depend on the load; the wall times do.

    .venv/bin/python benchmarks/search_efficiency.py [--trials 10] [--seeds 0 1 2 3 4] [--set k=v ...]
    .venv/bin/python benchmarks/search_efficiency.py --space search_spaces/mni152_hard.yaml \
        --scheduler hyperband --out search_efficiency_hard --work runs/bench-search-hard   # issue 22's hard space
    .venv/bin/python benchmarks/search_efficiency.py --quick
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import time

from _common import (
    REPO,
    launch,
    plot_path,
    provenance,
    read_trials,
    running_best,
    save_figure,
    summarise,
    table,
    write_result,
)

RANDOM_ARMS = ("random+fifo", "random+fifo 2x")
# the shipped mni152 space with 20-epoch students (it trains 120), so a trial takes about half a minute
# (search.grace_period: a placeholder for the FIFO searches; the TPE arm gets the one from the data)
DEFAULT_SET = {
    "teacher.adapt": "head",  # the frozen teacher the figures were measured with (mni152.yaml ships LoRA since)
    "student.epochs": 20,
    "search.grace_period": 1,
    "search.max_concurrent": 1,
    "search.baselines": [],
}
QUICK_SET = {
    "data.image_size": 32,
    "teacher.model": "vit_small_patch16_224",
    "teacher.model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
    "teacher.random_init": True,
    "teacher.decoder_channels": 16,
    "teacher.augment_views": 0,
    "teacher.epochs": 2,
    "student.channels": [8, 16, 32],
    "student.epochs": 4,
    "search.grace_period": 1,
    "search.max_concurrent": 1,
    "search.baselines": [],
}


def run_search(space: str, name: str, trials: int, sets: dict, work) -> dict:
    """One search (``sets`` say which sampler, scheduler and seed) on the shared cache; its trials in
    completion order and its wall time."""
    start, wall = launch(
        space,
        name,
        work / "runs",
        trials,
        1,
        f"sqlite:///{work / 'mlflow.db'}",
        sets | {"cache.dir": str(work / "cache")},
    )
    done = sorted(read_trials(work / "runs" / name), key=lambda t: (t["last_ts"], t["index"]))
    return {"name": name, "start": start, "wall_s": wall, "trials": done}


def to_target(trials: list[dict], target: float) -> float | None:
    """Compute (CPU-s) until the running best reached ``target`` (None: never)."""
    return next(
        (cpu for cpu, best in running_best(trials) if best is not None and best >= target - 1e-12), None
    )


def best_within(trials: list[dict], cpu_limit: float) -> float | None:
    """The best score among the trials that finished within ``cpu_limit`` CPU-seconds of compute."""
    bests = [best for cpu, best in running_best(trials) if cpu <= cpu_limit + 1e-9 and best is not None]
    return bests[-1] if bests else None


def plot(searches: dict, path, tpe: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = {tpe: "tab:blue", "random+fifo 2x": "tab:orange"}
    labelled = set()
    for (arm, _seed), s in sorted(searches.items()):
        if arm not in colours:  # random + FIFO is the first half of the 2x curve
            continue
        pts = running_best(s["trials"])
        xs, ys = [0.0] + [c / 60 for c, _ in pts], [math.nan] + [math.nan if b is None else b for _, b in pts]
        ax.step(xs, ys, where="post", color=colours[arm], alpha=0.75, label=None if arm in labelled else arm)
        labelled.add(arm)
    ax.set_xlabel("compute so far (CPU-minutes of all trials)")
    ax.set_ylabel("best val Dice so far")
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/mni152.yaml")
    ap.add_argument(
        "--trials", type=int, default=10, help="budget of TPE + ASHA and random + FIFO (2x: twice it)"
    )
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--startup-trials", type=int, default=4, help="TPE's random start-up trials")
    ap.add_argument("--trust", type=float, default=0.6, help="rank correlation the grace period needs")
    ap.add_argument("--work", default="runs/bench-search-efficiency")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override k=v")
    ap.add_argument(
        "--scheduler", choices=["asha", "hyperband"], default="asha", help="the TPE arm's scheduler"
    )
    ap.add_argument("--out", default="search_efficiency", help="name of the results' .json and .png")
    ap.add_argument("--quick", action="store_true", help="smoke run: 32 px, tiny models, 3 trials, 1 seed")
    args = ap.parse_args()
    tpe = f"tpe+{args.scheduler}"
    arms = (tpe, *RANDOM_ARMS)
    from tskd_tune.config import apply_values, load_config, parse_overrides
    from tskd_tune.fidelity import grace_from_data, histories

    if args.quick:
        args.trials, args.seeds, args.startup_trials = min(args.trials, 3), args.seeds[:1], 1
        args.work = (
            args.work if args.work != "runs/bench-search-efficiency" else "runs/bench-search-efficiency-quick"
        )
    sets = (QUICK_SET if args.quick else DEFAULT_SET) | parse_overrides(args.overrides)
    max_t = apply_values(load_config(args.space), sets).student.epochs
    work = (REPO / args.work).resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t_start = time.perf_counter()
    print("the shared cache: encoder features, the teacher, its outputs (one 1-trial search) ...", flush=True)
    run_search(args.space, "prefill", 1, sets | {"search.scheduler": "fifo"}, work)
    searches = {}
    for seed in args.seeds:
        print(f"random + FIFO, sampler seed {seed}: {2 * args.trials} trials ...", flush=True)
        two = run_search(
            args.space,
            f"random-fifo-s{seed}",
            2 * args.trials,
            sets | {"search.algorithm": "random", "search.scheduler": "fifo", "search.seed": seed},
            work,
        )
        searches["random+fifo 2x", seed] = two
        first = sorted(two["trials"], key=lambda t: t["index"])[: args.trials]
        searches["random+fifo", seed] = two | {
            "trials": sorted(first, key=lambda t: (t["last_ts"], t["index"]))
        }
    curves = [
        c
        for seed in args.seeds
        for c in histories(work / "runs" / f"random-fifo-s{seed}", "val_dice").values()
    ]
    grace, corr = grace_from_data(curves, max_t, args.trust)
    if grace is None:
        sys.exit(f"no grace period: the rank correlation stays below {args.trust} up to epoch {max_t - 1}")
    print(
        f"grace period from the data: epoch {grace} (pooled rank correlation >= {args.trust} from there on)"
    )
    for seed in args.seeds:
        print(
            f"TPE + {args.scheduler}, sampler seed {seed}: {args.trials} trials, grace {grace} ...",
            flush=True,
        )
        searches[tpe, seed] = run_search(
            args.space,
            f"tpe-{args.scheduler}-s{seed}",
            args.trials,
            sets
            | {
                "search.algorithm": "tpe",
                "search.scheduler": args.scheduler,
                "search.seed": seed,
                "search.grace_period": grace,
                "search.startup_trials": args.startup_trials,
            },
            work,
        )
    rows = []
    for seed in args.seeds:
        target = max(t["metric"] for t in searches["random+fifo", seed]["trials"] if t["metric"] is not None)
        equal = sum(t["cpu_s"] or 0 for t in searches[tpe, seed]["trials"])  # the TPE arm's whole compute
        for arm in arms:
            s = searches[arm, seed]
            cpu_total, best = running_best(s["trials"])[-1]
            rows.append(
                {
                    "arm": arm,
                    "seed": seed,
                    "trials": len(s["trials"]),
                    "target": target,
                    "cpu_to_target_s": to_target(s["trials"], target),
                    "best_at_equal_cpu": best_within(s["trials"], equal),
                    "best_val_dice": best,
                    "cpu_total_s": cpu_total,
                    "epochs_total": sum(t["epochs"] for t in s["trials"]),
                    "wall_s": s["wall_s"] if arm != "random+fifo" else None,
                }
            )
    summary = summarise(
        rows,
        "arm",
        arms,
        ["cpu_to_target_s", "best_at_equal_cpu", "best_val_dice", "cpu_total_s", "epochs_total", "wall_s"],
    )
    ratios = []
    for seed in args.seeds:
        tpe_row, rnd = (
            next(r for r in rows if r["seed"] == seed and r["arm"] == a) for a in (tpe, "random+fifo")
        )
        ratios.append(
            None
            if tpe_row["cpu_to_target_s"] is None
            else tpe_row["cpu_to_target_s"] / rnd["cpu_to_target_s"]
        )
    print("\npooled rank correlation of each epoch's val Dice with the final one (random + FIFO trials):")
    print(" ".join(f"{c['epoch']}:{c['spearman']:.2f}" for c in corr))
    print()
    print(table(rows))
    print()
    print(
        table(
            summary,
            [
                "arm",
                "searches",
                "reached",
                "cpu_to_target_s",
                "best_at_equal_cpu",
                "best_val_dice",
                "best_val_dice_std",
                "cpu_total_s",
                "epochs_total",
                "wall_s",
            ],
        )
    )
    print(
        f"\nTPE + {args.scheduler} / random + FIFO compute to random + FIFO's final best, per seed:",
        ", ".join("not reached" if r is None else f"{r:.2f}" for r in ratios),
    )
    result = provenance() | {
        "space": args.space,
        "overrides": sets,
        "trials": args.trials,
        "seeds": args.seeds,
        "concurrency": 1,
        "startup_trials": args.startup_trials,
        "tpe_scheduler": args.scheduler,
        "trust": args.trust,
        "grace_period": grace,
        "rank_correlation": corr,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "summary": summary,
        "searches": rows,
        "tpe_over_random_cpu_to_target": ratios,
        "trials_detail": {
            f"{arm}-s{seed}": s["trials"] for (arm, seed), s in searches.items() if arm != "random+fifo"
        },
        "note": "cpu_*: CPU-seconds of the trials and scores: load-insensitive; wall_s: load-sensitive",
    }
    out = write_result(args.out, result, args.quick)
    png = plot_path(args.out, args.quick)
    plot(searches, png, tpe)
    print(f"\nwritten to {out.relative_to(REPO)} and {png.relative_to(REPO)}")


if __name__ == "__main__":
    main()
