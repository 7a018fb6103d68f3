"""`tskd-tune synth`: train or load the generator, fill the cached pool with a progress bar, write a grid of
synthetic next to real images and the gate's figures, and print them."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tskd_tune.cache import Store, json_text
from tskd_tune.config import Config
from tskd_tune.data.prepare import load, take_rows
from tskd_tune.errors import TskdError
from tskd_tune.kinds import GENERATOR_KINDS, generator_kind, names_where
from tskd_tune.runtime import resolve_device
from tskd_tune.synth import (
    GATE_FIGURES,
    Progress,
    build_pool,
    generator_size,
    pool_key,
    pool_semantics,
    training_indices,
)
from tskd_tune.synth.gate import spread
from tskd_tune.synth.grid import sample_grid
from tskd_tune.synth.pool import pretrained_folder
from tskd_tune.synth.semantic import SEMANTIC_FIGURES
from tskd_tune.synth.semantic import K as SEMANTIC_MIN_POOL

if TYPE_CHECKING:
    from rich.console import Console


@contextmanager
def progress_bar(console: Console | None = None) -> Iterator[Progress]:
    """A rich progress bar (one line per phase) as a ``Progress`` callback."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as Bar

    labels = {"train": "training generator", "sample": "sampling pool"}
    with Bar(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        tasks: dict[str, int] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(labels.get(phase, phase), total=total)
            bar.update(tasks[phase], completed=done)

        yield update


def synth_command(cfg: Config, out_dir: Path, console: Console | None = None) -> dict:
    """`tskd-tune synth`: train or load the generator, fill the pool (progress bar), write grid.png and gate.json."""
    gc = cfg.synthetic
    kind = generator_kind(gc.generator)
    if not kind.images:
        raise TskdError(
            f"synthetic.generator: is {kind.name}, so there is nothing to generate "
            f"(set {names_where(GENERATOR_KINDS, 'images')})"
        )
    if gc.pool_size == 0:
        raise TskdError("synthetic.pool_size: is 0, so there is nothing to generate")
    # a standalone command has the machine, as `trial` computes teacher features on every core
    torch.set_num_threads(cfg.resources.threads or os.cpu_count() or 1)
    if kind.folder:
        pretrained_folder(gc)  # a bad path fails before the data is prepared
    t0 = time.perf_counter()
    prepared, splits = load(cfg)
    store = Store(cfg.cache.dir, enabled=cfg.cache.enabled)
    pool_key(cfg, prepared, splits)  # a bad pretrained_path fails here, before the progress bar starts
    with progress_bar(console) as progress:
        pool = build_pool(cfg, prepared, splits, store, resolve_device(cfg), progress)
        assert pool is not None
        semantic = None
        if len(pool) > SEMANTIC_MIN_POOL:
            semantic = pool_semantics(
                cfg, prepared, splits, pool, store, resolve_device(cfg), torch.get_num_threads(), progress
            )
            semantic = {k: v for k, v in semantic.items() if k not in ("inside", "cached")}
    real = take_rows(prepared.images, spread(training_indices(splits), 16))
    grid = sample_grid(pool.images, real, Path(out_dir) / "grid.png")
    summary = {
        "pool": str(pool.path),
        "images": len(pool),
        "shape": list(pool.images.shape[1:]),
        "cached": pool.cached,
        "generator": gc.generator,
        "generator_image_size": generator_size(cfg) if kind.trained else None,
        "grid": str(grid),
        "gate": pool.gate,
        "semantic": semantic,
        "synth_s": time.perf_counter() - t0,
    } | {k: v for k, v in pool.info.items() if k != "generator"}
    training = Path(pool.info.get("generator", "")) / "training.json"
    if kind.trained and training.is_file():
        summary["training"] = json.loads(training.read_text())
    path = Path(out_dir) / "gate.json"
    tmp = path.with_name(".gate.json.tmp")
    tmp.write_text(json_text(summary))
    os.replace(tmp, path)
    return summary


def print_summary(summary: dict, console: Console) -> None:
    """Human-readable `tskd-tune synth` output: the pool, the gate's figures, and a warning if it failed."""
    from rich.table import Table

    gate = summary["gate"]
    state = "reused from the cache" if summary["cached"] else "built now"
    c, s, _ = summary["shape"]
    console.print(f"pool: {summary['images']} synthetic images ({c}x{s}x{s}), {state}: {summary['pool']}")
    if summary.get("training"):
        t = summary["training"]
        console.print(
            f"generator: {t['params'] / 1e6:.2f}M-parameter UNet2DModel trained {t['steps']} steps at "
            f"{t['image_size']}x{t['image_size']} on {t['images']} training images in {t['train_s']:.0f}s "
            f"(loss {t['loss_first']:.3f} -> {t['loss_last']:.3f})"
        )
    if summary.get("background_snapped"):
        console.print(
            f"background: the pool's darkest {summary['background_snapped']:.1%} of pixels set to the training "
            "images' exact background (synthetic.snap_background)"
        )
    table = Table(
        "figure", "value", title="quality gate (synthetic vs real training images)", title_justify="left"
    )
    for k in GATE_FIGURES:
        v = gate[k]
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    console.print(table)
    if gate["passed"]:
        console.print("[green]quality gate passed[/green]")
    else:
        console.print(f"[yellow]warning: quality gate FAILED: {'; '.join(gate['reasons'])}[/yellow]")
    sem = summary.get("semantic")
    if sem:
        table = Table(
            "figure",
            "value",
            title="semantic gate (the teacher encoder's features: synthetic vs real training images)",
            title_justify="left",
        )
        for k in SEMANTIC_FIGURES:
            table.add_row(k, f"{sem[k]:.4f}")
        console.print(table)
        if sem["passed"]:
            console.print("[green]semantic gate passed[/green]")
        else:
            console.print(f"[yellow]warning: semantic gate FAILED: {'; '.join(sem['reasons'])}[/yellow]")
    console.print(f"grid (synthetic | real): {summary['grid']}")
