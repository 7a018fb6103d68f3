"""The paper's claim on real images: TS-KD vs TA-KD vs MAE vs scratch vs the teacher, both students, N in {10, 40}.

Issue 20's grid. Every cell is one ``run_trial(cfg, test=True)`` on the `mni152` dataset (axial slices of the
MNI152 T1 template that ships with nilearn; grey / white matter) with the shipped `mni152.yaml` (64 px, the
LiteMedSAM teacher with LoRA in its last 2 blocks), ``data.labeled=N`` and, for seed s, ``seed=s`` and
``data.seed=s`` (split, labelled subset, initialisation, augmentation and generator all change with the
seed; ``--fixed-split`` keeps ``data.seed=0``). Variants:

    teacher            the fine-tuned teacher itself (the upper reference)
    scratch            the U-Net 16-128 student on the N labels only
    ta_kd              task-agnostic KD: the frozen encoder's features, then the labels
    ts_kd              task-specific KD from the teacher (the shipped config)
    ts_kd+synth        ts_kd with one synthetic image per real transfer image (the shipped ddpm generator)
    scratch vit, ta_kd vit, mae vit, ts_kd vit, ts_kd+synth vit
                       the same with the ViT-Tiny student (patch 8, lr 1e-3); mae: its encoder pretrained by
                       masked-image modelling on the transfer set, then the labels
  opt-in (--variants):
    teacher frozen     the teacher mni152.yaml shipped before: the encoder frozen, the conv head alone trains
    ts_kd frozen       ts_kd from that teacher
    scratch 52k, ts_kd 52k   the 52k-parameter U-Net (8-64 channels)
    ts_kd searched     ts_kd with the values a search found (--searched best.yaml, or --search-trials K runs
                       one: `tskd-tune launch` at the smallest N, seed 0, selecting on val_dice)

Every method runs the same optimisation steps per epoch (see README), so cells compare at equal compute.

A cell is identified by the resolved config it runs, reduced to what its method reads (the method registry
says which teacher a method uses: none, the frozen encoder or the fine-tuned one; the synthetic section only
counts for a method that draws from the pool), without where or how fast it runs (cache, threads, search,
tracking). Finished cells go to benchmarks/results/kd_methods.cells.jsonl (committed, so a fresh clone
resumes the grid; the caches are not). ``--adopt FILE`` takes the finished cells of another benchmark's cells
file (teacher_heads.py's format) whose config is the same as a cell of this grid, recording where they came
from, instead of running them again. Results: benchmarks/results/kd_methods.json and .png, with every
planned cell that has not run listed under ``missing`` (with ``--cells NAME.cells.jsonl``, a probe's own grid:
NAME.json and NAME.png beside it).

    .venv/bin/python benchmarks/kd_methods.py                      # the grid (a GPU's worth; resumable)
    .venv/bin/python benchmarks/kd_methods.py --n 10 --variants scratch ts_kd --seeds 0
    .venv/bin/python benchmarks/kd_methods.py --adopt benchmarks/results/teacher_heads.cells.jsonl --report-only
    .venv/bin/python benchmarks/kd_methods.py --quick              # smoke run: 32 px, tiny random ViT teacher
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from _common import (
    REPO,
    RESULTS,
    append_cell,
    launch,
    paired_row,
    plot_path,
    provenance,
    read_cells,
    save_figure,
    spread,
    table,
    trial_cell,
    write_result,
)
from teacher_heads import FROZEN as HEADS_FROZEN

from tskd_tune.config import load_config, parse_overrides, read_yaml

BASE: dict = {}  # the shipped mni152.yaml as it is
# The smoke run cannot afford LiteMedSAM: a tiny, randomly initialised ViT stands in (its numbers say nothing
# about the method; they only show that every variant runs).
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
QUICK_VIT = {"student.model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}
VIT = {"student.model": "vit_tiny", "student.lr": 1e-3}
SYNTH = {"synthetic.generator": "ddpm", "synthetic.ratio": 1.0}
FROZEN = {"teacher.adapt": "head"}
SMALL_STUDENT = {"student.channels": [8, 16, 32, 64]}
VARIANTS: dict[str, dict | None] = {
    "teacher": {"distill.method": "teacher"},
    "scratch": {"distill.method": "scratch"},
    "ta_kd": {"distill.method": "ta_kd"},
    "ts_kd": {"distill.method": "ts_kd"},
    "ts_kd+synth": {"distill.method": "ts_kd"} | SYNTH,
    "scratch vit": {"distill.method": "scratch"} | VIT,
    "ta_kd vit": {"distill.method": "ta_kd"} | VIT,
    "mae vit": {"distill.method": "mae"} | VIT,
    "ts_kd vit": {"distill.method": "ts_kd"} | VIT,
    "ts_kd+synth vit": {"distill.method": "ts_kd"} | VIT | SYNTH,
    "teacher frozen": {"distill.method": "teacher"} | FROZEN,
    "ts_kd frozen": {"distill.method": "ts_kd"} | FROZEN,
    "scratch 52k": {"distill.method": "scratch"} | SMALL_STUDENT,
    "ts_kd 52k": {"distill.method": "ts_kd"} | SMALL_STUDENT,
    "ts_kd searched": None,  # known once a search ran
}
DEFAULT_VARIANTS = list(VARIANTS)[:10]
# run in this order within a seed, so that an interrupted grid has its core comparison complete first
GROUPS = [
    ["teacher", "scratch", "ta_kd", "ts_kd"],
    ["scratch vit", "ta_kd vit", "mae vit", "ts_kd vit"],
    ["ts_kd+synth", "ts_kd+synth vit"],
    ["teacher frozen", "ts_kd frozen", "scratch 52k", "ts_kd 52k", "ts_kd searched"],
]
# paired comparisons (ours, other) and issue 20's targets for them: the least difference in test Dice, per N
PAIRS = {
    ("teacher", "scratch"): {10: 0.08, 40: 0.05},
    ("ts_kd", "scratch"): {10: 0.05, 40: 0.03},
    ("ts_kd", "ta_kd"): {10: 0.03},
    ("ts_kd", "teacher"): {},
    ("ts_kd vit", "scratch vit"): {10: 0.15},
    ("ts_kd vit", "mae vit"): {10: 0.05},
    ("ts_kd vit", "ta_kd vit"): {10: 0.05},
    ("ts_kd vit", "teacher"): {},
    ("ts_kd+synth", "ts_kd"): {},
    ("ts_kd+synth vit", "ts_kd vit"): {},
    ("ta_kd", "scratch"): {},
    ("ta_kd vit", "scratch vit"): {},
    ("mae vit", "scratch vit"): {},
    ("teacher", "teacher frozen"): {},
    ("ts_kd", "ts_kd frozen"): {},
    ("ts_kd 52k", "scratch 52k"): {},
    ("ts_kd searched", "ts_kd"): {},
}
STUDENT_OF = {"ts_kd": "teacher", "ts_kd vit": "teacher"}  # every student within 5% of its teacher
# what changes where or how fast a cell runs, not its result
MACHINE_SECTIONS = ("cache", "resources", "search", "tracking", "name")
ENCODER_KEYS = ("model", "checkpoint", "model_kwargs", "random_init")


def identity(cfg) -> str:
    """A cell's identity: a hash of its resolved config, reduced to what its method reads."""
    import tskd_tune.methods  # noqa: F401 - registers the methods
    from tskd_tune.methods.registry import get_method

    spec = get_method(cfg.distill.method)
    d = cfg.model_dump(mode="json")
    for key in MACHINE_SECTIONS:
        d.pop(key, None)
    if spec.teacher is None:
        d.pop("teacher")
    elif spec.teacher == "frozen":
        d["teacher"] = {k: d["teacher"][k] for k in ENCODER_KEYS}
    if not spec.transfer or cfg.synthetic.generator == "none":
        d.pop("synthetic")
    elif d["synthetic"]["image_size"] is None:  # None means the data's size: one config, one identity
        d["synthetic"]["image_size"] = d["data"]["image_size"]
    if spec.student is False:
        d.pop("student")
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    """One cell: ``run_trial(test=True)``, the metrics of KEEP and per class, and its wall time."""
    return trial_cell(space, overrides, KEEP)


def adoptable(space: str, files: list[Path]) -> dict[str, dict]:
    """Finished cells of other benchmarks, by the identity their config has under ``space`` today: a cells
    file of teacher_heads.py (id = [label, n, seed, overrides]; its cells ran the frozen encoder unless
    their overrides say otherwise), or synth_ratio.py's results JSON (its cells ran the space's own teacher
    with the generator settings it records and the variant's)."""
    out = {}
    for path in files:
        cells = _synth_ratio_cells(path) if path.suffix == ".json" else _teacher_heads_cells(path)
        rel = path.resolve().relative_to(REPO) if path.resolve().is_relative_to(REPO) else path
        for label, n, seed, over, cell in cells:
            cfg = load_config(space, over | {"data.labeled": n, "seed": seed, "data.seed": seed})
            out.setdefault(identity(cfg), cell | {"adopted_from": str(rel), "source_variant": label})
    return out


def _teacher_heads_cells(path: Path):
    for cell in read_cells(path).values():
        label, n, seed, over = json.loads(cell["id"])
        yield label, n, seed, HEADS_FROZEN | over, cell


def _synth_ratio_cells(path: Path):
    from synth_ratio import variants

    res = json.loads(path.read_text())
    base = {k: v for k, v in res["generator"].items() if k.split(".")[0] not in MACHINE_SECTIONS}
    for cell in res["cells"]:
        label = cell["variant"]  # "ratio R[ filtered][ unsnapped]"
        over = variants([float(label.split()[1])], snap=not label.endswith("unsnapped"))[label]
        yield label, cell["n"], cell["seed"], base | over, cell


def aggregate(cells: list[dict], labels: list[str], ns: list[int]) -> tuple[list[dict], list[dict]]:
    """Per (variant, N): spread of test Dice / HD95 over seeds; and the paired differences of PAIRS."""
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
    by_key = {(c["variant"], c["n"], c["seed"]): c for c in cells}
    paired = []
    for (ours, other), targets in PAIRS.items():
        for n in ns:
            row = paired_row(by_key, ours, other, n)
            if row is None:
                continue
            if n in targets:
                row["target"] = targets[n]
                row["met"] = row["dice_diff"] >= targets[n]
            elif STUDENT_OF.get(ours) == other:
                row["target"] = "within 5% on every seed"
                row["met"] = row["ratio_min"] >= 0.95
            paired.append(row)
    return summary, paired


def plot(summary: list[dict], labels: list[str], path: Path, title: str) -> None:
    """Test Dice per variant, one panel per N: the mean over seeds as a bar, each seed as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["n"] for r in summary})
    shown_by_n = {
        n: [v for v in labels if any(r["variant"] == v and r["n"] == n for r in summary)] for n in ns
    }
    widths = [max(3, len(shown_by_n[n])) for n in ns]
    fig, axes = plt.subplots(
        1,
        len(ns),
        figsize=(max(8.0, 0.62 * sum(widths) + 1.6 * len(ns)), 5.0),  # wide enough for the title
        squeeze=False,
        gridspec_kw={"width_ratios": widths},
        sharey=True,
    )
    for ax, n in zip(axes[0], ns, strict=True):
        rows = {r["variant"]: r for r in summary if r["n"] == n}
        shown = shown_by_n[n]
        colours = [
            "tab:purple" if v.startswith("teacher") else "tab:orange" if "vit" in v else "tab:blue"
            for v in shown
        ]
        ax.bar(
            range(len(shown)),
            [rows[v]["test_dice"] for v in shown],
            color=colours,
            alpha=0.55,
            yerr=[rows[v]["dice_std"] for v in shown],
            capsize=3,
        )
        for i, v in enumerate(shown):
            ax.plot([i, i], [rows[v]["dice_min"], rows[v]["dice_max"]], "k.", markersize=4)
            ax.text(i, 0.41, f"{rows[v]['test_dice']:.3f}\n({rows[v]['seeds']})", ha="center", fontsize=6.5)
        ax.set_xticks(range(len(shown)), shown, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0.4, 0.95)
        ax.set_title(f"N = {n} labelled slices", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test Dice (mean over classes)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default="search_spaces/mni152.yaml")
    ap.add_argument("--n", type=int, nargs="+", default=[10, 40], help="labelled images per cell")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    ap.add_argument("--fixed-split", action="store_true", help="data.seed=0 for every seed")
    ap.add_argument("--searched", type=Path, help="best.yaml of a search: its searched values form a variant")
    ap.add_argument(
        "--search-trials", type=int, default=6, help="trials of the search behind `ts_kd searched`"
    )
    ap.add_argument(
        "--adopt",
        type=Path,
        nargs="+",
        default=[],
        help="finished cells of other benchmarks: teacher_heads.cells.jsonl, synth_ratio.json",
    )
    ap.add_argument(
        "--cells",
        type=Path,
        help="finished cells (default: benchmarks/results/kd_methods.cells.jsonl); given, the results go "
        "beside them (NAME.cells.jsonl: NAME.json, NAME.png), not over the grid's",
    )
    ap.add_argument("--work", default="runs/bench-kd", help="the trial cache (kept between runs)")
    ap.add_argument(
        "--threads", type=int, help="CPU threads per cell (resources.threads; not in a cell's identity)"
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="tables, JSON and plot from the finished (and adopted) cells; run none",
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 32 px, tiny models, N=10, seed 0")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override k=v")
    args = ap.parse_args()
    if args.quick:
        args.n = args.n if args.n != [10, 40] else [10]
        args.seeds = args.seeds if args.seeds != [0, 1, 2] else [0]
        args.work = args.work if args.work != "runs/bench-kd" else "runs/bench-kd-quick"
        args.search_trials = min(args.search_trials, 2)
    base = (QUICK if args.quick else BASE) | parse_overrides(args.overrides)
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    default_cells = work / "cells.jsonl" if args.quick else RESULTS / "kd_methods.cells.jsonl"
    cells_file = args.cells or default_cells
    machine = {"cache.dir": str(work / "cache")} | (
        {"resources.threads": args.threads} if args.threads else {}
    )
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

    labels = [v for g in GROUPS for v in g if v in args.variants]
    done = {c["config_id"]: c for c in read_cells(cells_file).values()}
    adopt = adoptable(args.space, args.adopt) if args.adopt else {}
    plan = [
        (s, n, label)
        for s in args.seeds
        for n in args.n
        for group in GROUPS
        for label in group
        if label in labels
    ]
    cells, missing, walls = [], [], []
    for i, (s, n, label) in enumerate(plan, 1):
        variant = VARIANTS[label]
        if variant is None:  # the searched variant
            if args.report_only and not (args.searched or search_file.is_file()):
                missing.append({"variant": label, "n": n, "seed": s})
                continue
            variant = {"distill.method": "ts_kd"} | searched_config()
        over = base | variant | {"data.labeled": n, "seed": s, "data.seed": 0 if args.fixed_split else s}
        if args.quick and over.get("student.model") == "vit_tiny":
            over |= QUICK_VIT
        cid = identity(load_config(args.space, over))
        if cid not in done and cid in adopt:
            cell = {k: v for k, v in adopt[cid].items() if k != "id"}
            done[cid] = cell = {"id": cid, "config_id": cid} | cell | {"variant": label, "n": n, "seed": s}
            append_cell(cells_file, cell)
            print(f"[{i}/{len(plan)}] {label:<15} N={n:<3} seed={s}  adopted from {cell['adopted_from']}")
        if cid in done:
            cells.append(done[cid] | {"variant": label, "n": n, "seed": s})
            continue
        if args.report_only:
            missing.append({"variant": label, "n": n, "seed": s})
            continue
        cell = {"id": cid, "config_id": cid, "variant": label, "n": n, "seed": s, "overrides": over}
        cell |= run_cell(args.space, over | machine)
        append_cell(cells_file, cell)
        done[cid] = cell
        cells.append(cell)
        walls.append(cell["wall_s"])
        eta = sum(walls) / len(walls) * (len(plan) - i)
        print(
            f"[{i}/{len(plan)}] {label:<15} N={n:<3} seed={s}  test Dice {cell['test_dice']:.3f}  HD95 "
            f"{cell['test_hd95']:.2f}  ({cell['wall_s']:.0f} s; at most {eta / 60:.0f} min left)",
            flush=True,
        )

    summary, paired = aggregate(cells, labels, args.n)
    print("\ntest Dice and HD95 (px), mean and std over seeds\n")
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
                "test_hd95",
                "val_dice",
            ],
        )
    )
    print("\npaired differences in test Dice (ours - other, per seed; wins = seeds where ours is higher)\n")
    print(
        table(
            paired,
            [
                "ours",
                "vs",
                "n",
                "seeds",
                "dice_diff",
                "diff_std",
                "wins",
                "ratio",
                "ratio_min",
                "target",
                "met",
            ],
        )
    )
    if missing:
        print(f"\nnot run: {len(missing)} cells of the grid (listed under `missing` in the JSON)")
    shown = load_config(args.space, base)  # the grid's config before each cell's variant, N and seed
    teacher_name = shown.teacher.model
    result = provenance() | {
        "space": args.space,
        "base_overrides": base,
        "ns": args.n,
        "seeds": args.seeds,
        "variants": labels,
        "fixed_split": args.fixed_split,
        "teacher_model": teacher_name,
        "adopted_from": sorted({c["adopted_from"] for c in cells if c.get("adopted_from")}),
        "search": search_info or None,
        "wall_s": round(time.perf_counter() - t_start, 1),
        "summary": summary,
        "paired": paired,
        "missing": missing,
        "cells": [{k: v for k, v in c.items() if k not in ("id", "overrides")} for c in cells],
    }
    # a grid of its own (a probe): its results go beside its cells, not over the main grid's
    name, folder = (
        (args.cells.name.removesuffix(".jsonl").removesuffix(".cells"), args.cells.resolve().parent)
        if args.cells
        else ("kd_methods", RESULTS)
    )
    out = write_result(name, result, args.quick, folder)
    png = plot_path(name, args.quick, folder)
    # nothing finished yet: the JSON lists every cell as missing, and there is nothing to draw
    if not summary:
        print(f"\nno finished cells: no plot; {out} lists the grid's cells under `missing`")
        return
    t, size = shown.teacher, shown.data.image_size
    lora = (
        "LoRA in every block"
        if t.lora.last_blocks is None
        else f"LoRA in its last {t.lora.last_blocks} blocks"
    )
    teacher_desc = f"{t.model}, " + (lora if t.adapt == "lora" else "frozen")
    plot(
        summary,
        labels,
        png,
        f"mni152 ({size} px), teacher {teacher_desc} (`frozen`: the encoder frozen)\n"
        + (f"with {' '.join(args.overrides)}\n" if args.overrides else "")
        + "bars: mean and std over seeds; dots: lowest and highest seed; (k): seeds run",
    )
    shown_at = [f.relative_to(REPO) if f.is_relative_to(REPO) else f for f in (out, png)]
    print(f"\nwritten to {shown_at[0]} and {shown_at[1]}")


if __name__ == "__main__":
    sys.exit(main())
