"""What the synthetic-pool gates see: pixel checks and the semantic gate on pools of known quality.

Issue 21's calibration, on real brain MRI (mni152, the shipped `mni152.yaml`, 64 px, LiteMedSAM's encoder).
Each pool is measured against the training images of its seed's split (labelled and unlabelled, what
the generator learns from), by both stages: the cheap pixel checks (`synth/gate.py`) and the semantic
gate in the teacher encoder's feature space (`synth/semantic.py`: Fréchet distance relative to the real
variance, precision and recall on k-NN manifolds). Pools:

    held-back real    the split's val and test images (real images the generator never saw: the target)
    noise uniform     uniform noise in [0, 1]
    noise smooth      Gaussian noise upsampled from 8 px, clipped (blobs with real-like contrast)
    shuffled patches  training images cut into 16 px patches, shuffled within each image (every pixel
                      statistic exact, the anatomy gone)
    blurred           training images blurred (Gaussian, sigma 4 px): a generator's mean-image mush
    one image         one training image repeated with 2% noise (a collapsed generator)
    ddpm32 S steps    the `ddpm` generator of kd_methods.py (CPU-sized: 32 px, 16-32-64 channels) trained
                      S steps, 128 images sampled (25 DDIM steps)
    ddpm64 S steps    the `ddpm` generator with the shipped defaults at 64 px (32-64-64 channels)
    ... bf16          the same generator trained and sampled under bf16 autocast (--precision bf16)
    ... unsnapped     the samples as the sampler gave them (--no-snap-background); by default a pool's
                      background haze is set to the training images' exact background
                      (synthetic.snap_background)

Generator pools and every pool's encoder features are entries of the trial cache (--cache), so a rerun
only measures again; finished cells are kept in WORK/cells.jsonl.

    .venv/bin/python benchmarks/synth_gate.py                    # seeds 0-2, generator steps 20..3000
    .venv/bin/python benchmarks/synth_gate.py --seeds 0 --steps 20 1000
    .venv/bin/python benchmarks/synth_gate.py --seeds 0 --sizes 64 --steps 2000 8000 --precision bf16
    .venv/bin/python benchmarks/synth_gate.py --seeds 0 --sizes 64 --steps 8000 --precision bf16 --no-snap-background
    .venv/bin/python benchmarks/synth_gate.py --pixel-only       # the pixel stage of the constructed pools (seconds)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from _common import REPO, append_cell, provenance, read_cells, table, write_result

from tskd_tune.cache import Store, digest
from tskd_tune.config import load_config
from tskd_tune.data.prepare import load, take_rows
from tskd_tune.runtime import resolve_device
from tskd_tune.synth import Pool, build_pool, pool_semantics, quality_gate, training_indices

SAMPLING = {
    "synthetic.generator": "ddpm",
    "synthetic.ratio": 1.0,
    "synthetic.pool_size": 128,
    "synthetic.sample_steps": 25,
}
GENERATORS = {  # --sizes: the generator's resolution -> its overrides
    32: SAMPLING
    | {"synthetic.image_size": 32, "synthetic.channels": [16, 32, 64]},  # kd_methods.py's CPU-sized one
    64: SAMPLING | {"synthetic.image_size": 64},  # the shipped defaults at mni152's 64 px (32-64-64 channels)
}
POOL = 128


def constructed(name: str, train: np.ndarray, held: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A pool of POOL images (N, C, S, S) float32 in [0, 1] built from the real ones or from noise."""
    import torch
    import torch.nn.functional as F

    c, s = train.shape[1], train.shape[-1]
    pick = train[rng.integers(0, len(train), POOL)]
    if name == "held-back real":
        return held
    if name == "noise uniform":
        return rng.random((POOL, c, s, s), dtype=np.float32)
    if name == "noise smooth":
        small = torch.from_numpy(rng.normal(0.3, 0.25, (POOL, c, 8, 8)).astype(np.float32))
        return F.interpolate(small, size=(s, s), mode="bicubic", align_corners=False).clamp(0, 1).numpy()
    if name == "shuffled patches":
        p = 16
        out = pick.copy()
        for img in out:
            tiles = [img[:, i : i + p, j : j + p].copy() for i in range(0, s, p) for j in range(0, s, p)]
            order = rng.permutation(len(tiles))
            for k, (i, j) in enumerate((i, j) for i in range(0, s, p) for j in range(0, s, p)):
                img[:, i : i + p, j : j + p] = tiles[order[k]]
        return out
    if name == "blurred":
        from scipy.ndimage import gaussian_filter

        return np.stack([gaussian_filter(x, sigma=(0, 4, 4)) for x in pick]).astype(np.float32)
    if name == "one image":
        return np.clip(train[:1] + rng.normal(0, 0.02, (POOL, c, s, s)), 0, 1).astype(np.float32)
    raise ValueError(name)


CONSTRUCTED = ("held-back real", "noise uniform", "noise smooth", "shuffled patches", "blurred", "one image")


def measure(cfg, prepared, splits, store, device, pool: Pool, train: np.ndarray) -> dict:
    pixel = pool.gate
    t0 = time.perf_counter()
    sem = pool_semantics(cfg, prepared, splits, pool, store, device, threads=2)
    return {
        "pixel_passed": pixel["passed"],
        "pixel_gate_version": pixel.get("version", 1),
        "pixel_reasons": "; ".join(pixel["reasons"]),
        "nn_ratio": pixel["nn_ratio"],
        "hist_distance": pixel["hist_distance"],
        "fd": sem["fd"],
        "precision": sem["precision"],
        "recall": sem["recall"],
        "semantic_passed": sem["passed"],
        "semantic_reasons": "; ".join(sem["reasons"]),
        "semantic_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--space", default=str(REPO / "search_spaces/mni152.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, nargs="+", default=[20, 1000, 3000], help="generator steps")
    ap.add_argument(
        "--sizes", type=int, nargs="+", default=[32], choices=sorted(GENERATORS), help="generator resolutions"
    )
    ap.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="the generators' arithmetic (synthetic.mixed_precision; bf16 needs a CPU with AMX or "
        "AVX512-BF16, see cpu_bf16.py); bf16 pools are named '... bf16'",
    )
    ap.add_argument(
        "--snap-background",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="synthetic.snap_background (the pool's darkest pixels set to the training images' exact "
        "background); pools sampled without it are named '... unsnapped'",
    )
    ap.add_argument("--work", default="runs/bench-synth-gate", help="finished cells")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads (generator training, encoder)")
    ap.add_argument(
        "--pixel-only",
        action="store_true",
        help="the constructed pools through the pixel stage only (no encoder, no generator): "
        "benchmarks/results/synth_gate_pixel.json",
    )
    ap.add_argument(
        "--cache",
        default="runs/bench-teachers/cache",
        help="the trial cache (teacher_heads.py's: the real images' encoder features are there)",
    )
    args = ap.parse_args()
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    cells_file = work / "cells.jsonl"
    done = read_cells(cells_file)
    pixel_cells: list[dict] = []
    for seed in args.seeds:
        over = {
            "seed": seed,
            "data.seed": seed,
            "cache.dir": str(Path(args.cache).resolve()),
            "resources.threads": args.threads,
        }
        cfg = load_config(args.space, over)
        prepared, splits = load(cfg)
        store, device = Store(cfg.cache.dir), resolve_device(cfg)
        rows = training_indices(splits)
        train = take_rows(prepared.images, rows).astype(np.float32)
        groups = np.asarray(prepared.groups)[rows]  # slabs: the nearest-real scale
        held = take_rows(prepared.images, np.sort(np.concatenate([splits.val, splits.test]))).astype(
            np.float32
        )
        rng = np.random.default_rng(seed)
        if args.pixel_only:
            for name in CONSTRUCTED:
                gate = quality_gate(constructed(name, train, held, rng), train, groups=groups)
                pixel_cells.append(
                    {"pool": name, "seed": seed} | gate | {"reasons": "; ".join(gate["reasons"])}
                )
            continue
        plan = [(name, None, None) for name in CONSTRUCTED]
        tag = (" bf16" if args.precision == "bf16" else "") + ("" if args.snap_background else " unsnapped")
        plan += [(f"ddpm{r} {s} steps{tag}", s, r) for r in args.sizes for s in args.steps]
        for name, steps, size in plan:
            cid = json.dumps([name, seed])
            if cid in done:
                continue
            t0 = time.perf_counter()
            if steps is None:
                images = constructed(name, train, held, rng)
                gate = quality_gate(images, train, groups=groups)
                pool = Pool(images, work, digest([name, seed, "v1"]), False, gate)
            else:
                gen = GENERATORS[size] | {
                    "synthetic.train_steps": steps,
                    "synthetic.mixed_precision": args.precision == "bf16",
                    "synthetic.snap_background": args.snap_background,
                }
                pool = build_pool(load_config(args.space, over | gen), prepared, splits, store, device)
            cell = {"id": cid, "pool": name, "seed": seed, "images": len(pool)}
            cell |= measure(cfg, prepared, splits, store, device, pool, train)
            cell["wall_s"] = time.perf_counter() - t0
            done[cid] = cell
            append_cell(cells_file, cell)
            print(
                f"seed {seed}  {name:<18} fd {cell['fd']:.3f}  precision {cell['precision']:.2f}  recall "
                f"{cell['recall']:.2f}  semantic {'pass' if cell['semantic_passed'] else 'FAIL'}  pixel "
                f"{'pass' if cell['pixel_passed'] else 'FAIL'}  ({cell['wall_s']:.0f} s)",
                flush=True,
            )
    if args.pixel_only:
        cols = ["pool", "seed", "nn_ratio", "nn_real", "nn_self", "copies", "passed", "reasons"]
        print(table(pixel_cells, cols))
        out = write_result("synth_gate_pixel", provenance() | {"space": args.space, "cells": pixel_cells})
        print(f"\nwritten to {out.relative_to(REPO)}")
        return
    cells = [{k: v for k, v in c.items() if k != "id"} for c in done.values()]
    cols = ["pool", "seed", "fd", "precision", "recall", "semantic_passed", "pixel_passed", "nn_ratio"]
    print(table(sorted(cells, key=lambda c: (c["pool"], c["seed"])), cols))
    out = write_result(
        "synth_gate", provenance() | {"space": args.space, "generators": GENERATORS, "cells": cells}
    )
    print(f"\nwritten to {out.relative_to(REPO)}")


if __name__ == "__main__":
    sys.exit(main())
