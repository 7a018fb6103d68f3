"""The paper's claim on real images: TS-KD vs TA-KD vs scratch vs the teacher, N labelled in {10, 20, 40}.

Every cell is one ``run_trial(cfg, test=True)`` on the `mni152` dataset (axial slices of the MNI152 T1
template that ships with nilearn; grey / white matter labels) with the shipped `mni152.yaml` (64 px, the
pretrained LiteMedSAM teacher, frozen, its head trained on cached encoder features), ``data.labeled=N``
and, for seed s, ``seed=s`` and ``data.seed=s`` (the split, the labelled subset, model initialisation,
augmentation and the synthetic generator all change with the seed; ``--fixed-split`` keeps ``data.seed=0``
so that only training randomness varies). Variants:

    teacher          the fine-tuned teacher itself (the upper reference)
    scratch          the student on the N labels only
    ta_kd            task-agnostic KD (the frozen teacher's features, then the labels)
    ts_kd            task-specific KD, the default config
    scratch 52k      scratch with the 52k-parameter U-Net (8-64 channels)
    ts_kd 52k        ts_kd likewise
    ta_kd+synth      ta_kd with synthetic.ratio synthetic images per real transfer image (ddpm generator)
    ts_kd+synth      ts_kd likewise
    ts_kd searched   ts_kd with the values a search found (--searched best.yaml, or --search-trials K runs
                     one: `tskd-tune launch` at the smallest N, seed 0, selecting on val_dice)
    teacher lora1    the teacher with LoRA in LiteMedSAM's last block (its other 11 blocks cached; slow on CPU)
    ts_kd lora1      ts_kd from that teacher

Every method runs the same number of optimisation steps per epoch (see README), so cells compare at
equal student compute. Results go to benchmarks/results/kd_methods.json (and .png); each finished cell
is appended to WORK/cells.jsonl, so an interrupted run continues where it stopped. Teacher features
(one entry for every seed and N), teachers, teacher outputs and synthetic pools are shared across cells
through the trial cache.

    .venv/bin/python benchmarks/kd_methods.py                      # the grid of docs/BENCHMARKS.md
    .venv/bin/python benchmarks/kd_methods.py --quick              # smoke run: 32 px, tiny random ViT teacher
    .venv/bin/python benchmarks/kd_methods.py --variants teacher scratch ts_kd --n 10 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import (
    REPO,
    append_cell,
    launch,
    plot_path,
    provenance,
    read_cells,
    save_figure,
    spread,
    table,
    write_result,
)

from tskd_tune.config import load_config, parse_overrides, read_yaml

# The grid's sizing: the shipped mni152.yaml as it is (pretrained LiteMedSAM teacher, 64 px), with a small
# synthetic generator for the +synth variants (trained per split and seed, so it is sized for CPUs).
BASE = {
    "synthetic.image_size": 32,
    "synthetic.channels": [16, 32, 64],
    "synthetic.train_steps": 1000,
    "synthetic.pool_size": 128,
    "synthetic.sample_steps": 25,
}
# The smoke run cannot afford LiteMedSAM (75 GFLOP per image): a tiny, randomly initialised ViT stands in
# (its numbers say nothing about the method; they only show that every variant runs).
QUICK = {
    "data.image_size": 32,
    "teacher.model": "vit_small_patch16_224",
    "teacher.model_kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
    "teacher.decoder_channels": 16,
    "teacher.augment_views": 2,
    "teacher.epochs": 3,
    "student.epochs": 2,
    "student.channels": [8, 16, 32],
    "distill.pretrain_epochs": 1,
    "search.grace_period": 1,
    "synthetic.image_size": 16,
    "synthetic.channels": [8, 16],
    "synthetic.train_steps": 20,
    "synthetic.pool_size": 16,
    "synthetic.sample_steps": 4,
}
SMALL_STUDENT = {"student.channels": [8, 16, 32, 64]}
LORA1 = {
    "teacher.adapt": "lora",
    "teacher.lora.last_blocks": 1,
    "teacher.augment_views": 0,
    "teacher.epochs": 100,
}
ORDER = [
    "teacher",
    "scratch",
    "ta_kd",
    "ts_kd",
    "scratch 52k",
    "ts_kd 52k",
    "ta_kd+synth",
    "ts_kd+synth",
    "ts_kd searched",
    "teacher lora1",
    "ts_kd lora1",
]
# cells run group by group, so that an interrupted grid has its core comparison complete first
# ta_kd+synth and the LoRA variants are opt-in (--variants): they cost a third of the grid's time again
DEFAULT_VARIANTS = [
    "teacher",
    "scratch",
    "ta_kd",
    "ts_kd",
    "scratch 52k",
    "ts_kd 52k",
    "ts_kd+synth",
    "ts_kd searched",
]
GROUPS = [
    ["teacher", "scratch", "ta_kd", "ts_kd"],
    ["scratch 52k", "ts_kd 52k"],
    ["ts_kd+synth"],
    ["ts_kd searched"],
    ["ta_kd+synth"],
    ["teacher lora1", "ts_kd lora1"],
]


def variants(ratio: float, searched: bool) -> dict[str, dict | None]:
    """Variant label -> config overrides; the searched variant's (None here) are known once a search ran."""
    synth = {"synthetic.generator": "ddpm", "synthetic.ratio": ratio}
    out = {
        "teacher": {"distill.method": "teacher"},
        "scratch": {"distill.method": "scratch"},
        "ta_kd": {"distill.method": "ta_kd"},
        "ts_kd": {"distill.method": "ts_kd"},
        "scratch 52k": {"distill.method": "scratch"} | SMALL_STUDENT,
        "ts_kd 52k": {"distill.method": "ts_kd"} | SMALL_STUDENT,
        "teacher lora1": {"distill.method": "teacher"} | LORA1,
        "ts_kd lora1": {"distill.method": "ts_kd"} | LORA1,
    }
    if ratio > 0:
        out |= {
            "ta_kd+synth": {"distill.method": "ta_kd"} | synth,
            "ts_kd+synth": {"distill.method": "ts_kd"} | synth,
        }
    if searched:
        out["ts_kd searched"] = None
    return out


def get_path(tree: dict, dotted: str):
    node = tree
    for key in dotted.split("."):
        node = node[key]
    return node


def searched_values(best_yaml: Path, space_file: Path) -> dict:
    """The searched paths' values in a search's ``best.yaml`` (only what the search chose)."""
    best = read_yaml(best_yaml)
    space = read_yaml(space_file).get("search", {}).get("space", {})
    return {path: get_path(best, path) for path in space if path != "distill.method"}


def run_search(args, base: dict, n: int, work: Path) -> tuple[Path, float]:
    """A small search (ASHA + TPE, concurrency 1) at N labels, seed 0; returns best.yaml and its wall time."""
    storage, name = work / "search", "kd-search"
    (work / "search-mlflow.db").unlink(missing_ok=True)  # a rerun must not find the old parent run
    # the grid has the reference cells already: the search runs without its own scratch/teacher references
    sets = base | {
        "data.labeled": n,
        "seed": 0,
        "data.seed": 0,
        "cache.dir": str(work / "cache"),
        "distill.method": "ts_kd",
        "search.baselines": [],
    }
    print(f"search: {args.search_trials} trials of ts_kd at N={n}, seed 0 ...", flush=True)
    _, wall = launch(
        args.space, name, storage, args.search_trials, 1, f"sqlite:///{work}/search-mlflow.db", sets
    )
    return storage / name / "best.yaml", wall


KEEP = (
    "test_dice",
    "test_hd95",
    "val_dice",
    "val_hd95",
    "teacher_val_dice",
    "teacher_val_hd95",
    "student_params",
    "teacher_params",
    "transfer_real",
    "transfer_synthetic",
    "synth_gate_passed",
    "teacher_cached",
    "teacher_features_cached",
    "teacher_features_s",
    "teacher_s",
    "transfer_s",
    "student_s",
    "synth_s",
    "total_s",
)


def run_cell(space: str, overrides: dict) -> dict:
    from tskd_tune.trial import run_trial

    cfg = load_config(space, overrides)
    t0 = time.perf_counter()
    result = run_trial(cfg, test=True)
    out = {k: result.get(k) for k in KEEP}
    out.update({k: v for k, v in result.items() if k.startswith("test_dice_")})
    out["wall_s"] = time.perf_counter() - t0
    return out


def aggregate(cells: list[dict], labels: list[str], ns: list[int]) -> tuple[list[dict], list[dict]]:
    """Per (variant, N): spread of test Dice / HD95 over seeds; and paired ts_kd-vs-others differences."""
    summary = []
    for label in labels:
        for n in ns:
            rows = [c for c in cells if c["variant"] == label and c["n"] == n]
            if not rows:
                continue
            d, h = spread([r["test_dice"] for r in rows]), spread([r["test_hd95"] for r in rows])
            summary.append(
                {
                    "variant": label,
                    "n": n,
                    "seeds": d["n"],
                    "test_dice": d["mean"],
                    "dice_std": d["std"],
                    "dice_min": d["min"],
                    "dice_max": d["max"],
                    "test_hd95": h["mean"],
                    "hd95_std": h["std"],
                    "val_dice": spread([r["val_dice"] for r in rows])["mean"],
                }
            )
            for key in sorted(k for k in rows[0] if k.startswith("test_dice_")):  # per class
                summary[-1][key.removeprefix("test_")] = spread([r.get(key) for r in rows])["mean"]
    paired = []
    by_key = {(c["variant"], c["n"], c["seed"]): c for c in cells}
    pairs = {
        "ts_kd": ("scratch", "ta_kd", "teacher"),
        "ts_kd+synth": ("ts_kd", "scratch", "teacher"),
        "ts_kd searched": ("ts_kd", "scratch", "teacher"),
        "ts_kd 52k": ("scratch 52k", "ts_kd", "teacher"),
        "ts_kd lora1": ("teacher lora1", "ts_kd", "scratch"),
        "teacher lora1": ("teacher",),
    }
    for ours, others in pairs.items():
        for other in others:
            if other == ours:
                continue
            for n in ns:
                diffs = [
                    by_key[(ours, n, s)]["test_dice"] - by_key[(other, n, s)]["test_dice"]
                    for (v, nn, s) in by_key
                    if v == ours and nn == n and (other, n, s) in by_key
                ]
                if diffs:
                    sp = spread(diffs)
                    paired.append(
                        {
                            "ours": ours,
                            "vs": other,
                            "n": n,
                            "seeds": sp["n"],
                            "dice_diff": sp["mean"],
                            "diff_std": sp["std"],
                            "wins": sum(x > 0 for x in diffs),
                        }
                    )
    return summary, paired


def plot(summary: list[dict], labels: list[str], path: Path, title: str) -> None:
    """Test Dice and HD95 against N per variant (mean, std over seeds as bars), and each class's Dice."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = sorted(
        {k for r in summary for k in r if k.startswith("dice_")} - {"dice_std", "dice_min", "dice_max"}
    )
    panels = [
        ("test_dice", "dice_std", "test Dice (mean over classes)"),
        ("test_hd95", "hd95_std", "test HD95 (px, lower is better)"),
    ]
    panels += [(c, None, f"test Dice, {c.removeprefix('dice_').replace('_', ' ')} (mean)") for c in classes]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2))
    for i, label in enumerate(labels):
        rows = [r for r in summary if r["variant"] == label]
        # a small horizontal offset per variant, so that error bars do not overlap
        x = [r["n"] * (1 + 0.015 * (i - len(labels) / 2)) for r in rows]
        style = {"marker": "o", "capsize": 3, "label": label, "linestyle": "--" if "synth" in label else "-"}
        for ax, (key, err, _) in zip(axes, panels, strict=True):
            ax.errorbar(x, [r.get(key) for r in rows], yerr=[r[err] for r in rows] if err else None, **style)
    for ax, (_, _, ylabel) in zip(axes, panels, strict=True):
        ax.set_xscale("log")
        ns = sorted({r["n"] for r in summary})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.minorticks_off()
        ax.set_xlabel("labelled images N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/mni152.yaml")
    ap.add_argument("--n", type=int, nargs="+", default=[10, 20, 40], help="labelled images per cell")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, help=f"subset of {ORDER}")
    ap.add_argument("--synthetic-ratio", type=float, default=1.0, help="for the +synth variants (0: none)")
    ap.add_argument("--fixed-split", action="store_true", help="data.seed=0 for every seed")
    ap.add_argument("--searched", type=Path, help="best.yaml of a search: its searched values form a variant")
    ap.add_argument(
        "--search-trials", type=int, default=6, help="trials of the search behind `ts_kd searched`"
    )
    ap.add_argument("--work", default="runs/bench-kd", help="cache and finished cells (kept between runs)")
    ap.add_argument("--fresh", action="store_true", help="forget finished cells (the cache is kept)")
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="tables, JSON and plot from the finished cells of the grid; run none",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 32 px, tiny models, N=10, seed 0")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override k=v")
    args = ap.parse_args()
    if args.quick:
        args.n = args.n if args.n != [10, 20, 40] else [10]
        args.seeds = args.seeds if args.seeds != [0, 1, 2] else [0]
        args.work = args.work if args.work != "runs/bench-kd" else "runs/bench-kd-quick"
        args.search_trials = min(args.search_trials, 2)
    base = (QUICK if args.quick else BASE) | parse_overrides(args.overrides)
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cells_file = work / "cells.jsonl"
    if args.fresh:
        cells_file.unlink(missing_ok=True)
    t_start = time.perf_counter()

    search_info: dict = {}
    search_file = work / "search_info.json"  # a finished search is not run again when the grid resumes

    def searched_config() -> dict:
        """The searched values, found (or read) the first time a cell needs them."""
        if not search_info:
            if args.searched:
                best, wall = args.searched, None
            elif search_file.is_file():
                search_info.update(json.loads(search_file.read_text()))
                return search_info["values"]
            else:
                best, wall = run_search(args, base, min(args.n), work)
            values = searched_values(best, REPO / args.space)
            search_info.update(
                best_yaml=str(best), values=values, trials=args.search_trials or None, wall_s=wall
            )
            if not args.searched:
                search_file.write_text(json.dumps(search_info, indent=2))
            print(f"searched values: {values}", flush=True)
        return search_info["values"]

    want_search = "ts_kd searched" in args.variants and bool(args.searched or args.search_trials)
    all_variants = variants(args.synthetic_ratio, want_search)
    labels = [v for v in ORDER if v in all_variants and v in args.variants]

    done = read_cells(cells_file)
    plan = [
        (s, n, label)
        for group in GROUPS
        for s in args.seeds
        for n in args.n
        for label in group
        if label in labels
    ]
    cells, walls = [], []
    for i, (s, n, label) in enumerate(plan, 1):
        variant = all_variants[label]
        if variant is None:  # the searched variant
            variant = {"distill.method": "ts_kd"} | searched_config()
        over = (
            base
            | variant
            | {
                "data.labeled": n,
                "seed": s,
                "data.seed": 0 if args.fixed_split else s,
                "cache.dir": str(work / "cache"),
            }
        )
        cid = json.dumps([args.space, over], sort_keys=True)
        if cid in done:
            cells.append(done[cid])
            continue
        if args.report_only:
            continue
        cell = {"id": cid, "variant": label, "n": n, "seed": s} | run_cell(args.space, over)
        append_cell(cells_file, cell)
        cells.append(cell)
        walls.append(cell["wall_s"])
        eta = sum(walls) / len(walls) * (len(plan) - i)
        print(
            f"[{i}/{len(plan)}] {label:<15} N={n:<3} seed={s}  test Dice {cell['test_dice']:.3f}  HD95 "
            f"{cell['test_hd95']:.2f}  ({cell['wall_s']:.0f} s; about {eta / 60:.0f} min left)",
            flush=True,
        )

    if want_search:
        searched_config()
    summary, paired = aggregate(cells, labels, args.n)
    print("\ntest Dice and HD95 (px), mean and std over seeds; per-class Dice: mean\n")
    per_class = sorted(
        {
            k
            for r in summary
            for k in r
            if k.startswith("dice_") and k not in ("dice_std", "dice_min", "dice_max")
        }
    )
    print(
        table(
            summary,
            [
                "variant",
                "n",
                "seeds",
                "test_dice",
                "dice_std",
                "dice_min",
                "dice_max",
                *per_class,
                "test_hd95",
                "hd95_std",
            ],
        )
    )
    print("\npaired differences in test Dice (ours - other, per seed; wins = seeds where ours is higher)\n")
    print(table(paired))
    teacher_name = base.get("teacher.model") or load_config(args.space).teacher.model
    result = provenance() | {
        "space": args.space,
        "base_overrides": base,
        "ns": args.n,
        "seeds": args.seeds,
        "fixed_split": args.fixed_split,
        "synthetic_ratio": args.synthetic_ratio,
        "teacher_model": teacher_name,
        "search": search_info or None,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "cell_wall_s_total": round(sum(c["wall_s"] for c in cells), 1),
        "summary": summary,
        "paired": paired,
        "cells": [{k: v for k, v in c.items() if k != "id"} for c in cells],
    }
    out = write_result("kd_methods", result, args.quick)
    png = plot_path("kd_methods", args.quick)
    size = base.get("data.image_size") or load_config(args.space).data.image_size
    plot(
        summary,
        labels,
        png,
        f"mni152 ({size} px), teacher {teacher_name}, {len(args.seeds)} seed(s); error bars: std over seeds",
    )
    print(f"\nwritten to {out.relative_to(REPO)} and {png.relative_to(REPO)}")


if __name__ == "__main__":
    sys.exit(main())
