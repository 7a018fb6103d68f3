"""Staged vs joint search: compute (CPU-seconds of all trials) and wall time to reach the joint search's
best val Dice, and the best test Dice each finds, over several sampler seeds.

The space is ``search_spaces/mni152_lora.yaml``: LoRA in the last 1 or 2 blocks of the pretrained
LiteMedSAM teacher (rank, alpha, lr) plus temperature, KD and supervised weights and the student's lr. A
joint search proposes all eight knobs per trial, so every trial fine-tunes a teacher of its own; a staged
search fine-tunes ``--teacher-trials`` teachers first and then distils the best ``--top-teachers`` into
``--student-trials`` students. Every search runs at concurrency 1 on its own trial cache, so it pays for
each of its teachers; the encoder features of the frozen blocks (the same for every search, both frozen
depths) are computed once, before the first search, into a folder every cache links to, and are not
counted. A trial's compute is the ``cpu_s`` it reported last (its process's CPU time, all threads, also
for a trial ASHA stopped). Staged searches reach the target only with a student trial; their teacher
trials count in their compute all the same.

Compute is a quality-of-search figure as long as the trials' CPU time does not depend on the load
(it is CPU time, not wall time); the wall times are load-sensitive.

    .venv/bin/python benchmarks/staged_search.py [--seeds 0 1 2] [--joint-trials 6] [--set k=v ...]
    .venv/bin/python benchmarks/staged_search.py --quick

Seeds can run side by side (one process each, its own ``--work`` and ``--out``), then be merged:

    .venv/bin/python benchmarks/staged_search.py --seeds 0 --work runs/bench-staged-s0 --out staged_s0 &
    ...
    .venv/bin/python benchmarks/staged_search.py --merge staged_s0 staged_s1 staged_s2 --out staged_search
"""

from __future__ import annotations

import argparse
import json
import shutil
import time

from _common import (
    REPO,
    RESULTS,
    command_line,
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

SPACE = "search_spaces/mni152_lora.yaml"
# Sized for 2 CPU cores: short teachers and students (the shipped space trains 20 and 40 epochs).
DEFAULT_SET = {
    "teacher.epochs": 8,
    "student.epochs": 16,
    "search.grace_period": 4,
    "search.startup_trials": 3,
}
# The smoke run cannot afford LiteMedSAM: a tiny, randomly initialised ViT with 4 blocks stands in.
QUICK_SET = {
    "data.image_size": 32,
    "teacher.model": "vit_small_patch16_224",
    "teacher.model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 2},
    "teacher.random_init": True,
    "teacher.decoder_channels": 16,
    "teacher.epochs": 2,
    "student.epochs": 2,
    "student.channels": [8, 16, 32],
    "search.grace_period": 1,
    "search.startup_trials": 1,
}
SHARED = ("data", "features", "onnx")
"""Cache folders every search links to: data and encoder features, the same whatever a trial proposes."""


def fresh_cache(work, name: str):
    """A fresh trial cache for one search whose data and feature folders are the shared ones."""
    cache = work / name / "cache"
    shutil.rmtree(work / name, ignore_errors=True)
    cache.mkdir(parents=True)
    for folder in SHARED:
        (work / "shared" / folder).mkdir(parents=True, exist_ok=True)
        (cache / folder).symlink_to(work / "shared" / folder, target_is_directory=True)
    return cache


def prefill(space: str, sets: dict, work) -> float:
    """Compute the encoder features of every frozen depth the space proposes, once: a 1-trial search whose
    only trial is a 1-epoch teacher (its fill covers every depth; the trial itself is thrown away)."""
    cache = fresh_cache(work, "prefill")
    over = sets | {
        "cache.dir": str(cache),
        "search.strategy": "joint",
        "distill.method": "teacher",
        "teacher.epochs": 1,
        "search.grace_period": 1,
    }
    return launch(space, "prefill", work / "runs", 1, 1, f"sqlite:///{work / 'prefill'}/mlflow.db", over)[1]


def run_search(space: str, strategy: str, seed: int, args, sets: dict, work) -> dict:
    """One search with ``strategy`` and sampler seed ``seed`` on a fresh trial cache; its trials (teacher
    stage first) in completion order, each with its compute, and the search's summary."""
    name = f"{strategy}-s{seed}"
    cache = fresh_cache(work, name)
    trials = args.joint_trials if strategy == "joint" else args.student_trials
    over = sets | {
        "search.strategy": strategy,
        "search.seed": seed,
        "cache.dir": str(cache),
        "search.teacher_trials": args.teacher_trials,
        "search.top_teachers": args.top_teachers,
    }
    t0, wall = launch(space, name, work / "runs", trials, 1, f"sqlite:///{work / name}/mlflow.db", over)
    folder = work / "runs" / name
    stages = [("teacher", folder / "teacher_stage")] if strategy == "staged" else []
    done = []
    for stage, path in [*stages, ("student", folder)]:
        stage_trials = [t | {"stage": stage} for t in read_trials(path)]
        done += sorted(stage_trials, key=lambda t: (t["last_ts"], t["index"]))
    summary = json.loads((folder / "summary.json").read_text())
    return {
        "strategy": strategy,
        "seed": seed,
        "start": t0,
        "wall_s": wall,
        "trials": done,
        "best_val_dice": summary.get("best_val_dice"),
        "test_dice": summary.get("test_dice"),
    }


def _student(trial: dict) -> bool:
    """Only a student trial's val Dice counts toward a target (a teacher trial's is the teacher's)."""
    return trial["stage"] == "student"


def to_target(search: dict, target: float) -> dict:
    """Compute (CPU-s), trials and seconds since launch until a student trial's val Dice reached ``target``."""
    trials = search["trials"]
    for k, (t, (cpu, best)) in enumerate(zip(trials, running_best(trials, _student), strict=True), 1):
        if best is not None and best >= target:
            return {
                "trials_to_target": k,
                "cpu_to_target_s": cpu,
                "time_to_target_s": t["last_ts"] - search["start"],
            }
    return {"trials_to_target": None, "cpu_to_target_s": None, "time_to_target_s": None}


def near_targets(detail: dict[str, list[dict]], seeds: list[int], fractions: list[float]) -> list[dict]:
    """Compute of each strategy to reach ``fraction`` x the joint search's best val Dice, per seed and
    fraction, and staged / joint; from a result's ``trials_detail`` (a new run's or a saved one)."""
    rows = []
    for seed in seeds:
        joint, staged = ({"trials": detail[f"{k}-s{seed}"]} for k in ("joint", "staged"))
        best = max(t["metric"] for t in joint["trials"] if t["metric"] is not None)
        for f in fractions:
            j, s = (to_target(x | {"start": 0.0}, f * best)["cpu_to_target_s"] for x in (joint, staged))
            rows.append(
                {
                    "seed": seed,
                    "fraction": f,
                    "target": f * best,
                    "joint_cpu_s": j,
                    "staged_cpu_s": s,
                    "staged_over_joint": s / j if s is not None else None,
                }
            )
    return rows


def plot(searches: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    colours = {"joint": "tab:orange", "staged": "tab:blue"}
    styles = ["-", "--", ":", "-."]
    for s in searches:
        pts = running_best(s["trials"], _student)
        xs, ys = [0.0] + [c / 60 for c, _ in pts], [None] + [b for _, b in pts]
        ax.step(
            xs,
            [y if y is not None else float("nan") for y in ys],
            where="post",
            color=colours[s["strategy"]],
            linestyle=styles[s["seed"] % len(styles)],
            label=f"{s['strategy']}, seed {s['seed']}",
        )
    ax.set_xlabel("compute so far (CPU-minutes of all trials; a staged search's teachers first)")
    ax.set_ylabel("best student val Dice so far")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=SPACE)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--joint-trials", type=int, default=6)
    ap.add_argument("--teacher-trials", type=int, default=3)
    ap.add_argument("--top-teachers", type=int, default=2)
    ap.add_argument("--student-trials", type=int, default=6)
    ap.add_argument("--work", default="runs/bench-staged")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override k=v")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: tiny random ViT teacher, 2 trials, 1 seed"
    )
    ap.add_argument(
        "--fractions",
        type=float,
        nargs="+",
        default=[1.0, 0.99, 0.98],
        help="targets: these fractions of the joint search's best val Dice",
    )
    ap.add_argument(
        "--out", default="staged_search", help="result name in benchmarks/results (NAME.json, NAME.png)"
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        metavar="NAME",
        help="no searches: merge these results (each a run of other --seeds, e.g. run side by side) into --out",
    )
    ap.add_argument(
        "--reanalyse",
        action="store_true",
        help="no searches: add the --fractions table to benchmarks/results/staged_search.json",
    )
    args = ap.parse_args()
    from tskd_tune.config import parse_overrides

    if args.reanalyse:
        result = json.loads((RESULTS / f"{args.out}{'.quick' if args.quick else ''}.json").read_text())
        near = near_targets(result["trials_detail"], result["seeds"], args.fractions)
        print(table(near))
        result["near_targets"] = near
        result["near_targets_command"] = command_line()
        path = write_result(args.out, result, args.quick)
        print(f"\nadded to {path.relative_to(REPO)}")
        return

    if args.quick:
        args.seeds, args.joint_trials, args.teacher_trials, args.student_trials = args.seeds[:1], 2, 2, 2
        args.top_teachers = min(args.top_teachers, 2)
        args.work = args.work if args.work != "runs/bench-staged" else "runs/bench-staged-quick"
    sets = (QUICK_SET if args.quick else DEFAULT_SET) | parse_overrides(args.overrides)
    if args.merge:
        suffix = ".quick" if args.quick else ""
        parts = [json.loads((RESULTS / f"{name}{suffix}.json").read_text()) for name in args.merge]
        missing = [name for name, part in zip(args.merge, parts, strict=True) if "raw_searches" not in part]
        if missing:
            raise SystemExit(
                f"--merge: {', '.join(missing)} has no raw_searches (written before --merge existed)"
            )
        searches = [s for part in parts for s in part["raw_searches"]]
        args.seeds = sorted({s["seed"] for s in searches})
        prefill_s = max(part["prefill_s"] for part in parts)
        sets = parts[0]["overrides"]
        for key in ("space", "joint_trials", "teacher_trials", "top_teachers", "student_trials"):
            setattr(args, key, parts[0][key])
        t_wall = max(part["wall_s"] for part in parts)
    else:
        work = (REPO / args.work).resolve()
        work.mkdir(parents=True, exist_ok=True)
        t_start = time.perf_counter()
        print("encoder features of every frozen depth, once ...", flush=True)
        prefill_s = prefill(args.space, sets, work)
        searches = []
        for seed in args.seeds:
            for strategy in ("joint", "staged"):
                print(f"{strategy}, sampler seed {seed} ...", flush=True)
                searches.append(run_search(args.space, strategy, seed, args, sets, work))
        t_wall = time.perf_counter() - t_start
    analyse(searches, args, sets, prefill_s, t_wall)


def analyse(searches: list[dict], args, sets: dict, prefill_s: float, t_wall: float) -> None:
    """The tables, the result file ``--out`` and its plot, from the searches of every seed."""
    rows = []
    for seed in args.seeds:
        joint, staged = (
            next(s for s in searches if s["seed"] == seed and s["strategy"] == k) for k in ("joint", "staged")
        )
        target = max(t["metric"] for t in joint["trials"] if t["metric"] is not None)
        for s in (joint, staged):
            s |= to_target(s, target)
            rows.append(
                {
                    "strategy": s["strategy"],
                    "seed": seed,
                    "target": target,
                    "teachers_trained": sum(t["stage"] == "teacher" for t in s["trials"])
                    if s is staged
                    else len(s["trials"]),
                    "cpu_to_target_s": s["cpu_to_target_s"],
                    "cpu_total_s": sum(t["cpu_s"] or 0 for t in s["trials"]),
                    "time_to_target_s": s["time_to_target_s"],
                    "wall_s": s["wall_s"],
                    "best_val_dice": s["best_val_dice"],
                    "test_dice": s["test_dice"],
                }
            )
    summary = summarise(
        rows,
        "strategy",
        ("joint", "staged"),
        ["cpu_to_target_s", "cpu_total_s", "time_to_target_s", "wall_s", "best_val_dice", "test_dice"],
    )
    ratios = []
    for seed in args.seeds:
        j, s = (
            next(r for r in rows if r["seed"] == seed and r["strategy"] == k) for k in ("joint", "staged")
        )
        ratios.append(
            s["cpu_to_target_s"] / j["cpu_to_target_s"] if s["cpu_to_target_s"] is not None else None
        )
    print(f"\nprefill (encoder features of both frozen depths, not counted): {prefill_s:.0f} s\n")
    print(table(rows))
    print()
    print(
        table(
            summary,
            [
                "strategy",
                "searches",
                "reached",
                "cpu_to_target_s",
                "cpu_total_s",
                "time_to_target_s",
                "wall_s",
                "best_val_dice",
                "test_dice",
                "test_dice_std",
            ],
        )
    )
    print(
        "\nstaged / joint compute to the joint's best, per seed:",
        ", ".join("not reached" if r is None else f"{r:.2f}" for r in ratios),
    )
    detail = {f"{s['strategy']}-s{s['seed']}": s["trials"] for s in searches}
    near = near_targets(detail, args.seeds, args.fractions)
    print(table(near))
    result = provenance() | {
        "space": args.space,
        "overrides": sets,
        "seeds": args.seeds,
        "concurrency": 1,
        "joint_trials": args.joint_trials,
        "teacher_trials": args.teacher_trials,
        "top_teachers": args.top_teachers,
        "student_trials": args.student_trials,
        "prefill_s": round(prefill_s, 1),
        "wall_s": round(t_wall, 1),
        "summary": summary,
        "searches": rows,
        "staged_over_joint_cpu_to_target": ratios,
        "near_targets": near,
        "trials_detail": detail,
        "raw_searches": searches,
        "note": "cpu_*: CPU-seconds of the trials (load-insensitive); time_*/wall_s: wall times (load-sensitive)",
    }
    out = write_result(args.out, result, args.quick)
    png = plot_path(args.out, args.quick)
    plot(searches, png)
    print(f"\nwritten to {out.relative_to(REPO)} and {png.relative_to(REPO)}")


if __name__ == "__main__":
    main()
