"""Commands on one config or one trial: validate, data inspect, trial, synth, export, predict."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tskd_tune.cache import json_text, write_json
from tskd_tune.cli.app import SetOpt, SpaceArg, app, data_app, load_cfg, out, warn
from tskd_tune.errors import TskdError


@app.command()
def validate(space: SpaceArg, set_: SetOpt = None) -> None:
    """Validate a search-space YAML; print the resolved config and the search space."""
    from tskd_tune.config import to_yaml
    from tskd_tune.data.lateral import flip_plan
    from tskd_tune.data.registry import class_names
    from tskd_tune.space import describe_space

    cfg = load_cfg(space, set_)
    print(f"# resolved config ({space})")
    print(to_yaml(cfg).rstrip())
    print(f"# classes: {', '.join(class_names(cfg.data))}")
    flips = flip_plan(cfg.data)
    if flips.label_swap:
        print(f"# flips swap: {', '.join(f'{a} <-> {b}' for a, b in flips.pairs)}")
    warn(flips.note)
    table = Table(title=f"search space ({len(cfg.search.space)} dimension(s))", title_justify="left")
    table.add_column("path")
    table.add_column("distribution")
    for path, dist in describe_space(cfg.search.space):
        table.add_row(path, dist)
    out.print(table)
    out.print(f"[green]ok[/green]: {space} is valid")


@data_app.command("inspect")
def data_inspect(
    space: SpaceArg,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Folder for preview.png and summary.json.")
    ] = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Preprocess (cached) and summarise a dataset: counts per split, class frequencies, a preview grid."""
    from tskd_tune.data.inspect import preview_grid, preview_indices, summarize
    from tskd_tune.data.lateral import flip_plan
    from tskd_tune.data.prepare import load

    cfg = load_cfg(space, set_)
    prepared, splits = load(cfg)
    warn(flip_plan(cfg.data, prepared.classes).note)
    summary = summarize(prepared, splits)
    summary["dataset"] = cfg.data.dataset
    out_dir = out_dir or Path("runs") / "inspect" / (cfg.name or cfg.data.dataset)
    summary["preview"] = str(preview_grid(prepared, preview_indices(splits), out_dir / "preview.png"))
    write_json(out_dir / "summary.json", summary)
    if as_json:
        print(json_text(summary))
        return
    s = summary["splits"]
    out.print(
        f"[bold]{cfg.data.dataset}[/bold]: {summary['images']} images in {summary['groups']} patient/volume group(s)"
    )
    out.print(
        f"  train {s['train']} (labelled {s['labeled']}, unlabelled {s['unlabeled']}), val {s['val']}, test {s['test']}"
    )
    c, h, w = summary["image_size"]
    out.print(f"  image size {h}x{w}, {c} channel(s)")
    table = Table("class", "pixel frequency", title="class pixel frequencies", title_justify="left")
    for name, f in summary["class_frequency"].items():
        table.add_row(name, f"{f:.4f}")
    out.print(table)
    out.print(f"  preview: {summary['preview']}")
    out.print(f"  cache: {summary['cache']} ({'reused' if summary['cached'] else 'built now'})")


@data_app.command("export-slices")
def data_export_slices(
    space: SpaceArg,
    split: Annotated[
        str, typer.Option("--split", help="Which split's images: test, val, labeled or unlabeled.")
    ] = "test",
    n: Annotated[int, typer.Option("--n", min=1, help="How many images.")] = 8,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Folder for images/ and masks/ (default runs/slices/NAME).")
    ] = None,
    set_: SetOpt = None,
) -> None:
    """Write a split's images as the models see them (PNG) with their true masks: images to try `predict` on."""
    from tskd_tune.data.inspect import export_slices
    from tskd_tune.data.prepare import load

    if split not in ("test", "val", "labeled", "unlabeled"):
        raise TskdError(f"--split: must be test, val, labeled or unlabeled, got {split!r}")
    cfg = load_cfg(space, set_)
    prepared, splits = load(cfg)
    out_dir = out_dir or Path("runs") / "slices" / (cfg.name or cfg.data.dataset)
    images, masks = export_slices(prepared, splits, split, n, out_dir)
    count = min(n, len(getattr(splits, split)))
    out.print(
        f"wrote {count} {split} image(s) to {images} and their true masks to {masks}; try: "
        f"tskd-tune predict runs/NAME {images} --out runs/predict",
        markup=False,
    )


@app.command()
def trial(
    space: SpaceArg,
    set_: SetOpt = None,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Folder for the trial's outputs (default runs/trials/NAME).")
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the final metrics as JSON on stdout.")
    ] = False,
    test: Annotated[
        bool, typer.Option("--test", help="Also evaluate on the test split (never done in a search).")
    ] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Recompute data, teacher and teacher outputs.")
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue from OUT/checkpoint if an earlier run left one.")
    ] = False,
) -> None:
    """Run one trial without Ray: teacher -> transfer set -> student -> metrics, written to --out."""
    import logging
    import shutil

    # config and teacher first, the heavy trial imports (MONAI, diffusers) after: bad input fails fast
    cfg = load_cfg(space, set_, no_cache)
    if cfg.resources.threads is None:
        # a standalone trial has the machine (resources.cpu is what a search reserves per trial)
        cfg = cfg.model_copy(
            update={"resources": cfg.resources.model_copy(update={"threads": os.cpu_count()})}
        )
    from tskd_tune.methods.checks import check_teacher, premise_warning

    check_teacher(cfg)
    from tskd_tune.cache import writable_dir
    from tskd_tune.train import CHECKPOINT
    from tskd_tune.trial import JsonlTracker, run_trial

    out_dir = writable_dir(out_dir or Path("runs") / "trials" / (cfg.name or "trial"), "--out")
    warn(premise_warning(cfg))  # once the input is known to be good: bad input gets its one error line
    resume_from = (
        out_dir / "checkpoint" if resume and (out_dir / "checkpoint" / CHECKPOINT).is_file() else None
    )
    if resume_from is None:
        # a fresh run must not mix its curves or checkpoint with an earlier run's
        (out_dir / "history.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    err = Console(stderr=True, highlight=False)
    from tskd_tune.methods import get_method

    epochs = get_method(cfg.distill.method).reported_epochs(cfg)

    def report(epoch: int, m: dict, _ckpt) -> None:
        shown = "  ".join(
            f"{k} {m[k]:.4f}" for k in ("train_loss", "val_dice", "val_hd95") if k in m and m[k] is not None
        )
        err.print(
            f"[{cfg.distill.method}] epoch {epoch}/{epochs}  {shown}  ({m.get('epoch_s', 0):.1f}s)",
            markup=False,
        )

    result = run_trial(
        cfg,
        report,
        JsonlTracker(out_dir / "history.jsonl"),
        out_dir=out_dir,
        resume_from=resume_from,
        test=test,
        fill_threads=cfg.resources.threads,
    )
    if as_json:
        print(json_text(result.metrics))
        return
    table = Table("metric", "value", title=f"trial {cfg.name} ({cfg.distill.method})", title_justify="left")
    for k, v in result.items():
        table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(table)
    out.print(f"outputs: {out_dir}")


@app.command()
def synth(
    space: SpaceArg,
    set_: SetOpt = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out", help="Folder for grid.png and gate.json (default runs/synth/NAME)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON on stdout.")] = False,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Retrain the generator and regenerate the pool.")
    ] = False,
) -> None:
    """Train (or load) the synthetic-image generator, fill the cached pool, write a sample grid and the gate."""
    cfg = load_cfg(space, set_, no_cache)
    from tskd_tune.cli.synth_view import print_summary, synth_command

    out_dir = out_dir or Path("runs") / "synth" / (cfg.name or "synth")
    summary = synth_command(cfg, out_dir, console=Console(stderr=True))
    if as_json:
        print(json_text(summary))
        return
    print_summary(summary, out)


@app.command("export")
def export_cmd(
    trial_dir: Annotated[
        Path, typer.Argument(help="A trial folder, or a search folder (its best trial).", show_default=False)
    ],
    fmt: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default TRIAL_DIR/export-FORMAT).")
    ] = None,
    register: Annotated[
        str | None,
        typer.Option("--register", help="Also register it in the MLflow model registry under this name."),
    ] = None,
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri", help="MLflow store for --register (default: the trial's tracking.uri)."
        ),
    ] = None,
) -> None:
    """Export a trial's student (checked against PyTorch) with a model card; optionally register it in MLflow."""
    from tskd_tune.export import export, trial_outputs

    if fmt not in ("onnx", "torchscript"):
        raise TskdError(f"--format: must be onnx or torchscript, got {fmt!r}")
    if register and fmt != "onnx":
        raise TskdError("--register: needs --format onnx (the registry stores the ONNX model)")
    trial_dir, known = trial_outputs(trial_dir)
    out_dir = out_dir or trial_dir / f"export-{fmt}"
    card = export(trial_dir, fmt, out_dir, known)
    out.print(
        f"wrote {out_dir / card['file']} (max |diff| vs PyTorch {card['max_abs_diff_vs_pytorch']:.1e}) and model_card.json"
    )
    if register:
        from tskd_tune import tracking

        uri = tracking.absolute_uri(tracking_uri or card["config"]["tracking"]["uri"])
        tracking.preflight(uri)
        version = tracking.register_export(uri, out_dir, card, register)
        out.print(f"registered {register} version {version} in {uri}")


@app.command()
def predict(
    model: Annotated[
        Path,
        typer.Argument(
            help="An exported folder (model_card.json), a trial folder or its outputs, or a search "
            "folder (its best trial).",
            show_default=False,
        ),
    ],
    images: Annotated[
        Path, typer.Argument(help="Folder of images (png, jpg, tif, bmp).", show_default=False)
    ],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for <name>_mask.png and <name>_overlay.png.")
    ] = Path("runs/predict"),
) -> None:
    """Segment a folder of images: class-index mask PNGs and overlays."""
    from tskd_tune.export import predict_folder

    written = predict_folder(model, images, out_dir)
    out.print(f"wrote {len(written)} mask(s) and overlay(s) to {out_dir}")
