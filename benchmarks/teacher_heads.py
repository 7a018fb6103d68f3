"""Which teacher beats scratch, and what distilling it gives: LiteMedSAM's conv head vs its own mask decoder.

Issue 20's evidence, on real brain MRI (mni152, the shipped `mni152.yaml`: 64 px, 120 student epochs), N
labelled in {10, 40}, 3 paired seeds (seed s: ``seed=s`` and ``data.seed=s``, so split, labelled subset,
initialisation and augmentation all change together).

Phase 1, teachers: every recipe in TEACHERS (``distill.method: teacher``), and the scratch U-Net they must
beat. Phase 2, students: the teacher recipe with the best mean **val** Dice over all cells of phase 1 (test
Dice is never used to choose) is distilled into the U-Net (16-128) and ViT-Tiny students (``ts_kd``), beside
``scratch``, ``ta_kd`` and (ViT-Tiny, where the method is registered) ``mae``, and ``ts_kd`` from the conv
teacher for comparison. Both students train with the same steps and epochs in every method.

Cells run in ``--workers`` processes (a GPU takes several at once; the encoder-feature, teacher and logits
caches are shared through the trial cache's locks). Each finished cell is appended to WORK/cells.jsonl,
so a rerun continues (the file is committed beside the results, so a fresh clone continues too; the
caches are not); ``--budget-s`` stops starting cells once spent. ``--report-only`` turns the finished
cells into benchmarks/results/teacher_heads.{json,png} and the tables of docs/BENCHMARKS.md.

    .venv/bin/python benchmarks/teacher_heads.py                     # the grid (meant for a GPU)
    .venv/bin/python benchmarks/teacher_heads.py --quick             # smoke run on the CPU: few slices, 2 epochs
    .venv/bin/python benchmarks/teacher_heads.py --report-only --work DIR
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path

from _common import (
    REPO,
    append_cell,
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

SAM = {"teacher.head": "sam_decoder", "teacher.warmup_epochs": 5}
CPU_SIZED = {"teacher.epochs": 20, "teacher.warmup_epochs": 2, "teacher.augment_views": 2}
LORA2 = {"teacher.adapt": "lora", "teacher.lora.last_blocks": 2}
TEACHERS = {
    "conv": {},  # FROZEN below: the frozen encoder, conv head (lr 3e-3, 50 epochs, 8 views)
    "conv lora2": LORA2,
    "sam lr1e-4": SAM | {"teacher.lr": 1e-4},
    "sam lr3e-4": SAM | {"teacher.lr": 3e-4},
    "sam lr1e-3": SAM | {"teacher.lr": 1e-3},
    "sam box lr3e-4": SAM | {"teacher.lr": 3e-4, "teacher.prompt": "box"},
    "sam lora2 lr3e-4": SAM | LORA2 | {"teacher.lr": 3e-4},
    "sam lr3e-4 20ep": SAM | {"teacher.lr": 3e-4, "teacher.epochs": 20, "teacher.warmup_epochs": 2},
    # CPU-sized: 2 augmented views, 20 epochs (about 80 steps at N=10, 2-3 min on 2 cores)
    **{
        f"sam lr{lr} 20ep 2views": SAM | CPU_SIZED | {"teacher.lr": float(lr)}
        for lr in ("3e-4", "1e-3", "3e-3")
    },
    # the conv head's step count (600 at N=10) with the CPU-sized views: the two heads at equal steps
    "sam lr1e-3 150ep 2views": SAM
    | CPU_SIZED
    | {"teacher.lr": 1e-3, "teacher.epochs": 150, "teacher.warmup_epochs": 10},
    "sam lr3e-4 100ep": SAM | {"teacher.lr": 3e-4, "teacher.epochs": 100, "teacher.warmup_epochs": 10},
}
# the teacher's input resolution (--resolutions): slices prepared at R px instead of 64 (upsampled to
# LiteMedSAM's 256 either way), every --teachers recipe and the scratch U-Net at the same R; N = min(--n) only
VIT = {"student.model": "vit_tiny", "student.lr": 1e-3}
# ts_kd+synth: kd_methods.py's CPU-sized generator, one synthetic image per real transfer image
SYNTH = {
    "synthetic.generator": "ddpm",
    "synthetic.ratio": 1.0,
    "synthetic.image_size": 32,
    "synthetic.channels": [16, 32, 64],
    "synthetic.train_steps": 1000,
    "synthetic.pool_size": 128,
    "synthetic.sample_steps": 25,
}
# every cell's teacher unless its recipe says otherwise: the frozen encoder, which mni152.yaml shipped when the
# grid began (it ships the "conv lora2" recipe since); left out of the cell's identity, so cells stay comparable
FROZEN = {"teacher.adapt": "head"}
# what only changes where or how fast a cell runs, not its result: left out of the cell's identity
MACHINE_KEYS = ("cache.dir", "resources.threads")
QUICK = {
    "data.options": {"axis": "axial", "stride": 4, "slab": 2},
    "teacher.augment_views": 1,
    "teacher.epochs": 2,
    "teacher.warmup_epochs": 1,
    "student.epochs": 2,
    "distill.pretrain_epochs": 1,
    "search.grace_period": 1,
}
QUICK_VIT = {"student.model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}
KEEP = (
    "test_dice",
    "test_hd95",
    "val_dice",
    "val_hd95",
    "teacher_val_dice",
    "student_params",
    "teacher_s",
    "student_s",
    "total_s",
)


def students(best: dict, has_mae: bool) -> dict[str, dict]:
    """Phase 2's variants for the chosen teacher's overrides ``best``."""
    out = {
        "ts_kd": {"distill.method": "ts_kd"} | best,
        "ts_kd conv": {"distill.method": "ts_kd"},
        "ta_kd": {"distill.method": "ta_kd"},
        "ts_kd+synth": {"distill.method": "ts_kd"} | best | SYNTH,
        "scratch vit": {"distill.method": "scratch"} | VIT,
        "ts_kd vit": {"distill.method": "ts_kd"} | best | VIT,
        "ta_kd vit": {"distill.method": "ta_kd"} | VIT,
    }
    if not best:  # the conv teacher was chosen: "ts_kd" is "ts_kd conv"
        del out["ts_kd conv"]
    if has_mae:
        out["mae vit"] = {"distill.method": "mae"} | VIT
    return out


def run_cell(space: str, overrides: dict) -> dict:
    """One ``run_trial(test=True)``; the metrics kept, and its wall time."""
    return trial_cell(space, overrides, KEEP)


def run_phase(
    args, plan: list[tuple[str, int, int, dict]], done: dict, cells_file: Path, deadline: float
) -> None:
    """Run the cells of ``plan`` not in ``done`` in worker processes, appending each as it ends."""
    todo = [p for p in plan if cell_id(*p) not in done]
    if not todo:
        return
    with ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        running = {pool.submit(run_cell, args.space, over): (label, n, s, over) for label, n, s, over in todo}
        while running:
            finished, _ = wait(running, timeout=30, return_when=FIRST_COMPLETED)
            if time.time() > deadline:
                for f in running:
                    f.cancel()  # cells not started yet; those running finish
            for f in finished:
                label, n, s, over = running.pop(f)
                try:
                    cell = {
                        "id": cell_id(label, n, s, over),
                        "variant": label,
                        "n": n,
                        "seed": s,
                    } | f.result()
                except Exception as exc:  # noqa: BLE001 - one failed cell is reported, the grid goes on
                    print(
                        f"FAILED {label} N={n} seed={s}: {exc.__class__.__name__}: {str(exc)[:300]}",
                        flush=True,
                    )
                    continue
                done[cell["id"]] = cell
                append_cell(cells_file, cell)
                print(
                    f"{label:<18} N={n:<3} seed={s}  val {cell['val_dice']:.3f}  test {cell['test_dice']:.3f}  "
                    f"({cell['wall_s']:.0f} s)",
                    flush=True,
                )
            running = {f: v for f, v in running.items() if not f.cancelled()}


def cell_id(label: str, n: int, seed: int, over: dict) -> str:
    """A cell's identity: its label, N, seed and the overrides that change its result."""
    same = {k: v for k, v in over.items() if k not in MACHINE_KEYS and (k, v) not in FROZEN.items()}
    return json.dumps([label, n, seed, same], sort_keys=True, default=str)


def overrides(args, variant: dict, n: int, s: int, cache: Path) -> dict:
    base = FROZEN | {
        "data.labeled": n,
        "seed": s,
        "data.seed": s,
        "cache.dir": str(cache),
        "resources.threads": args.threads,
    }
    if args.quick:
        base |= QUICK | (QUICK_VIT if variant.get("student.model") == "vit_tiny" else {})
    return base | variant


def best_teacher(cells: list[dict]) -> str:
    """The teacher recipe with the best mean val Dice over every (N, seed) it ran."""
    means = {}
    for label in TEACHERS:
        vals = [c["val_dice"] for c in cells if c["variant"] == f"teacher {label}"]
        if vals:
            means[label] = sum(vals) / len(vals)
    return max(means, key=means.get)


PAIRS = {  # ours -> the references it is compared with, seed by seed
    "ts_kd": ("scratch", "ta_kd", "ts_kd conv", "teacher*"),
    "ts_kd conv": ("scratch", "teacher conv"),
    "ts_kd+synth": ("ts_kd", "scratch"),
    "teacher*": ("scratch", "teacher conv"),
    "ts_kd vit": ("scratch vit", "ta_kd vit", "mae vit", "teacher*"),
    **{f"teacher {t} {r}px": (f"scratch {r}px", f"teacher {t}") for t in TEACHERS for r in (128, 256)},
}


DISTILLED = ("ts_kd", "ts_kd+synth", "ts_kd vit")
"""Phase 2's variants that distil the chosen teacher (the rest do not depend on which was chosen)."""


def taught_by(cell: dict) -> dict:
    """The teacher overrides a cell ran with (from its identity)."""
    over = json.loads(cell["id"])[3]
    return {k: v for k, v in over.items() if k.startswith("teacher.")}


def aggregate(cells: list[dict], chosen: str | None) -> tuple[list[dict], list[dict]]:
    """Per (variant, N) the spread over seeds; paired differences of test Dice for PAIRS."""
    alias = {f"teacher {chosen}": "teacher*"} if chosen else {}
    # phase 2's students of the chosen teacher only: "ts_kd" of another phase 2 (another --chosen) distilled another
    cells = [c for c in cells if c["variant"] not in DISTILLED or taught_by(c) == TEACHERS.get(chosen, {})]
    rows = [c | {"variant": alias.get(c["variant"], c["variant"])} for c in cells]
    rows += [c for c in cells if c["variant"] in alias]  # the chosen teacher also under its own name
    summary = []
    for label in dict.fromkeys(r["variant"] for r in rows):
        for n in sorted({r["n"] for r in rows}):
            sel = [r for r in rows if r["variant"] == label and r["n"] == n]
            if sel:
                d = spread([r["test_dice"] for r in sel])
                summary.append(
                    {
                        "variant": label,
                        "n": n,
                        "seeds": d["n"],
                        "test_dice": d["mean"],
                        "dice_std": d["std"],
                        "val_dice": spread([r["val_dice"] for r in sel])["mean"],
                        "test_hd95": spread([r["test_hd95"] for r in sel])["mean"],
                    }
                )
    by = {(r["variant"], r["n"], r["seed"]): r for r in rows}
    paired = []
    for ours, others in PAIRS.items():
        for other in others:
            for n in sorted({r["n"] for r in rows}):
                row = paired_row(by, ours, other, n)
                if row is not None:
                    paired.append(row)
    return summary, paired


def plot(summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted({r["n"] for r in summary})
    labels = list(dict.fromkeys(r["variant"] for r in summary))
    fig, axes = plt.subplots(1, len(ns), figsize=(7 * len(ns), 0.32 * len(labels) + 1.6), squeeze=False)
    for ax, n in zip(axes[0], ns, strict=True):
        rows = {r["variant"]: r for r in summary if r["n"] == n}
        shown = [lab for lab in labels if lab in rows]
        y = range(len(shown))
        colors = [
            "tab:orange" if lab.startswith("teacher") else "tab:blue" if "vit" in lab else "tab:green"
            for lab in shown
        ]
        ax.barh(
            y,
            [rows[lab]["test_dice"] for lab in shown],
            xerr=[rows[lab]["dice_std"] for lab in shown],
            color=colors,
            capsize=3,
        )
        ax.set_yticks(list(y), shown)
        ax.invert_yaxis()
        ax.set_xlabel("test Dice (mean over seeds, std as bars)")
        ax.set_title(f"mni152, N = {n} labelled")
        ax.set_xlim(left=min(rows[lab]["test_dice"] for lab in shown) - 0.1)
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(
        "teachers (orange), U-Net students (green), ViT-Tiny students (blue)\nteacher* = the teacher distilled (--chosen, or the best on val Dice)",
        fontsize=10,
    )
    save_figure(fig, path)


def report(args, cells: list[dict], chosen: str | None) -> None:
    if not cells:
        print("no finished cell")
        return
    summary, paired = aggregate(cells, chosen)
    print(f"\nteacher distilled in phase 2: {chosen}\n")
    print(table(summary, ["variant", "n", "seeds", "test_dice", "dice_std", "val_dice", "test_hd95"]))
    print()
    print(table(paired, ["ours", "vs", "n", "seeds", "dice_diff", "diff_std", "wins", "ratio"]))
    payload = {
        "provenance": provenance(),
        "chosen_teacher": chosen,
        "teachers": TEACHERS,
        "summary": summary,
        "paired": paired,
        "cells": [{k: v for k, v in c.items() if k != "id"} for c in cells],
    }
    print(f"\nwrote {write_result('teacher_heads', payload, quick=args.quick)}")
    plot(summary, plot_path("teacher_heads", quick=args.quick))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=str(REPO / "search_spaces/mni152.yaml"))
    ap.add_argument("--n", type=int, nargs="+", default=[10, 40])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--teachers", nargs="+", default=list(TEACHERS), help=f"subset of {list(TEACHERS)}")
    ap.add_argument(
        "--resolutions", type=int, nargs="*", default=[128], help="teacher input sizes besides 64 px"
    )
    ap.add_argument("--teachers-only", action="store_true", help="phase 1 only")
    ap.add_argument(
        "--variants", nargs="+", help="phase 2's students, a subset of its variants (default: all)"
    )
    ap.add_argument(
        "--chosen", choices=list(TEACHERS), help="phase 2's teacher (default: the best on val Dice)"
    )
    ap.add_argument("--workers", type=int, default=1, help="cells at once (a GPU takes several)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per cell")
    ap.add_argument(
        "--budget-s", type=float, default=float("inf"), help="start no cell after this many seconds"
    )
    ap.add_argument(
        "--work", default="runs/bench-teachers", help="cache and finished cells (kept between runs)"
    )
    ap.add_argument(
        "--cells",
        type=Path,
        help="finished cells, one JSON line each (default: "
        "benchmarks/results/teacher_heads.cells.jsonl, committed so that a fresh clone resumes; "
        "--quick: WORK/cells.jsonl)",
    )
    ap.add_argument(
        "--report-only", action="store_true", help="tables, JSON and plot from the finished cells"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: few slices, 2 epochs, N=10, seed 0")
    args = ap.parse_args()
    if args.quick:
        args.n, args.seeds = [min(args.n)], [0]
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    default_cells = (
        work / "cells.jsonl" if args.quick else REPO / "benchmarks/results/teacher_heads.cells.jsonl"
    )
    cells_file = args.cells or default_cells
    done = read_cells(cells_file)
    deadline = time.time() + args.budget_s
    cache = work / "cache"
    grid = [(n, s) for n in args.n for s in args.seeds]  # the smallest N first: the targets are there
    phase1 = [
        (f"teacher {t}", n, s, overrides(args, {"distill.method": "teacher"} | TEACHERS[t], n, s, cache))
        for n, s in grid
        for t in args.teachers
    ]
    phase1 += [
        ("scratch", n, s, overrides(args, {"distill.method": "scratch"}, n, s, cache)) for n, s in grid
    ]
    n0 = min(args.n)
    for r in args.resolutions:
        res = {"data.image_size": r}
        phase1 += [
            (
                f"teacher {t} {r}px",
                n0,
                s,
                overrides(args, {"distill.method": "teacher"} | TEACHERS[t] | res, n0, s, cache),
            )
            for s in args.seeds
            for t in args.teachers
        ]
        phase1 += [
            (f"scratch {r}px", n0, s, overrides(args, {"distill.method": "scratch"} | res, n0, s, cache))
            for s in args.seeds
        ]
    if not args.report_only:
        run_phase(args, phase1, done, cells_file, deadline)
    cells = list(done.values())
    chosen = best_teacher(cells) if any(c["variant"].startswith("teacher ") for c in cells) else None
    chosen = args.chosen or chosen
    if chosen and not args.report_only and not args.teachers_only:
        import tskd_tune.methods  # noqa: F401 - registers the methods
        from tskd_tune.methods.registry import METHODS

        why = "--chosen" if args.chosen else "the best mean val Dice"
        print(f"phase 2 distils the teacher {chosen} ({why})", flush=True)
        variants = students(TEACHERS[chosen], "mae" in METHODS)
        unknown = set(args.variants or ()) - set(variants)
        if unknown:
            ap.error(f"--variants: {sorted(unknown)} not among {list(variants)}")
        variants = {k: v for k, v in variants.items() if not args.variants or k in args.variants}
        phase2 = [
            (label, n, s, overrides(args, v, n, s, cache)) for n, s in grid for label, v in variants.items()
        ]
        run_phase(args, phase2, done, cells_file, deadline)
        cells = list(done.values())
    report(args, cells, chosen)


if __name__ == "__main__":
    main()
