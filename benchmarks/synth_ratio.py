"""Do synthetic transfer images help? ts_kd at synthetic ratios 0 / 0.5 / 1 / 2, filter off and on (issue 21).

Every cell is one ``run_trial(cfg, test=True)`` of ts_kd on mni152 with the shipped `mni152.yaml` (its
LoRA teacher) at ``data.labeled=N``, ``seed=data.seed=s``, and the `ddpm` generator at 64 px with the
shipped generator defaults, trained ``--steps`` steps (bf16 autocast where the CPU runs it natively; the
generator `synth_gate.py` judged). Variants, paired by seed:

    ratio 0             no synthetic images (the baseline every other cell is compared with)
    ratio R             R synthetic images per real transfer image, every drawn image used
    ratio R filtered    the same draw through ``synthetic.filter: both`` (teacher confidence and the
                        real manifold in the teacher encoder's feature space); the kept count is recorded
    ... unsnapped       the pool as sampled, its background haze kept (--no-snap-background)

The pool's gate figures (pixel stage, Fréchet distance, precision, recall) are in every cell. Teachers,
generators and pools are entries of the trial cache (--cache: teacher_heads.py's, which holds the LoRA
teachers of seeds 0-2 at N = 10); each finished cell is appended to WORK/cells.jsonl, so an interrupted grid
continues where it stopped.

    .venv/bin/python benchmarks/synth_ratio.py --n 10 --seeds 0          # -> benchmarks/results/synth_ratio.json
    .venv/bin/python benchmarks/synth_ratio.py --n 10 --seeds 0 --ratios 1 --no-snap-background
    .venv/bin/python benchmarks/synth_ratio.py --report-only
    .venv/bin/python benchmarks/synth_ratio.py --quick       # smoke run: tiny models (not a figure)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from _common import REPO, append_cell, provenance, read_cells, spread, table, trial_cell, write_result

GENERATOR = {  # synth_gate.py's 64 px generator (shipped defaults), so its trained entry is shared
    "synthetic.generator": "ddpm",
    "synthetic.image_size": 64,
    "synthetic.sample_steps": 25,
    "synthetic.pool_size": 256,  # ratio 2 draws 182 of mni152's 91 training images' worth
}
KEEP = ("test_dice", "test_hd95", "val_dice", "teacher_val_dice", "transfer_real", "transfer_synthetic")


def variants(ratios: list[float], snap: bool = True) -> dict[str, dict]:
    """Ratio 0 and each ratio with the filter off and on; ``snap`` False: the pool as sampled (labels end in
    ``unsnapped``; ratio 0, which draws no pool, is the snapped grid's)."""
    out = {"ratio 0": {"synthetic.ratio": 0.0, "synthetic.filter": "none"}} if snap else {}
    tag = "" if snap else " unsnapped"
    for r in ratios:
        for label, kind in ((f"ratio {r:g}", "none"), (f"ratio {r:g} filtered", "both")):
            out[label + tag] = {
                "synthetic.ratio": r,
                "synthetic.filter": kind,
                "synthetic.snap_background": snap,
            }
    return out


def run_cell(space: str, overrides: dict) -> dict:
    return trial_cell(space, overrides, KEEP, prefixes=("synth_",))


def paired(cells: list[dict]) -> list[dict]:
    """Each variant's test Dice minus ratio 0's, per N, paired by seed."""
    by = {(c["variant"], c["n"], c["seed"]): c for c in cells}
    rows = []
    for variant in dict.fromkeys(c["variant"] for c in cells):
        for n in sorted({c["n"] for c in cells}):
            seeds = sorted(s for (v, nn, s) in by if v == variant and nn == n)
            base = [s for s in seeds if ("ratio 0", n, s) in by]
            if not base:
                continue
            dice = spread([by[(variant, n, s)]["test_dice"] for s in base])
            diff = spread(
                [by[(variant, n, s)]["test_dice"] - by[("ratio 0", n, s)]["test_dice"] for s in base]
            )
            kept = [by[(variant, n, s)].get("synth_kept") for s in base]
            drawn = [by[(variant, n, s)].get("synth_drawn") for s in base]
            rows.append(
                {
                    "variant": variant,
                    "n": n,
                    "seeds": len(base),
                    "test_dice": dice["mean"],
                    "vs_ratio_0": diff["mean"],
                    "diff_std": diff["std"],
                    "wins": sum(
                        by[(variant, n, s)]["test_dice"] > by[("ratio 0", n, s)]["test_dice"] for s in base
                    ),
                    "kept": f"{sum(kept)}/{sum(drawn)}" if None not in kept + drawn else "",
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=str(REPO / "search_spaces/mni152.yaml"))
    ap.add_argument("--n", type=int, nargs="+", default=[10, 40])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--steps", type=int, default=8000, help="generator training steps")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--snap-background",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="synthetic.snap_background; without it the pool as sampled (variants named '... unsnapped')",
    )
    ap.add_argument("--work", default="runs/bench-synth-ratio", help="finished cells")
    ap.add_argument("--cache", default="runs/bench-teachers/cache", help="the trial cache")
    ap.add_argument("--report-only", action="store_true", help="the table and JSON of the finished cells")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: kd_methods.py's tiny models, one cell each"
    )
    args = ap.parse_args()
    if args.quick:
        args.n, args.seeds, args.ratios = [10], [0], [1.0]
        args.work = args.work if args.work != "runs/bench-synth-ratio" else "runs/bench-synth-ratio-quick"
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cells_file = work / "cells.jsonl"
    done = read_cells(cells_file)
    base = GENERATOR | {
        "synthetic.train_steps": args.steps,
        "distill.method": "ts_kd",
        "cache.dir": str(Path(args.cache).resolve()),
        "resources.threads": args.threads,
    }
    if args.quick:
        from kd_methods import QUICK

        base |= QUICK | {"synthetic.pool_size": 32, "cache.dir": str(work / "cache")}
    if not args.report_only:
        for n in args.n:
            for seed in args.seeds:
                for label, over in variants(args.ratios, args.snap_background).items():
                    sets = base | over | {"data.labeled": n, "seed": seed, "data.seed": seed}
                    cid = json.dumps([label, n, seed, args.steps], sort_keys=True)
                    if cid in done:
                        continue
                    cell = {"id": cid, "variant": label, "n": n, "seed": seed, "steps": args.steps}
                    cell |= run_cell(args.space, sets)
                    done[cid] = cell
                    append_cell(cells_file, cell)
                    print(
                        f"N={n} seed {seed} {label:<20} test Dice {cell['test_dice']:.3f}  synthetic "
                        f"{cell.get('transfer_synthetic')} kept {cell.get('synth_kept')}  "
                        f"fd {cell.get('synth_fd') or 0:.2f}  ({cell['wall_s']:.0f} s)",
                        flush=True,
                    )
    cells = [{k: v for k, v in c.items() if k != "id"} for c in done.values()]
    rows = paired(cells)
    print(table(rows))
    pools = sorted(
        {
            (
                c["n"],
                c["seed"],
                " (unsnapped)" if c["variant"].endswith("unsnapped") else "",
                c.get("synth_fd"),
                c.get("synth_precision"),
                c.get("synth_recall"),
            )
            for c in cells
            if c.get("synth_fd") is not None
        }
    )
    for n, seed, tag, fd, prec, rec in pools:
        print(f"pool N={n} seed {seed}{tag}: fd {fd:.2f} precision {prec:.2f} recall {rec:.2f}")
    out = write_result(
        "synth_ratio",
        provenance() | {"space": args.space, "generator": base, "cells": cells, "paired": rows},
        quick=args.quick,
    )
    print(f"\nwritten to {out.relative_to(REPO)}")


if __name__ == "__main__":
    sys.exit(main())
