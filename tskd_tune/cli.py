"""The `tskd-tune` command line. Bad input exits 2 with one line per problem, never a traceback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

# typer >= 0.22 vendors click; its exceptions live here, not in the `click` package
from typer._click import exceptions as click_exc

from tskd_tune.errors import TskdError

app = typer.Typer(
    help="Hyperparameter search for task-specific knowledge distillation (TS-KD) of segmentation models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

out = Console(highlight=False, soft_wrap=True)  # long paths and commands stay copy-pasteable

SpaceArg = Annotated[
    Path, typer.Argument(help="Search-space YAML (config + search space).", show_default=False)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a config field by dotted path, e.g. --set distill.temperature=2.0 (repeatable).",
    ),
]


def warn(line: str | None) -> None:
    """One warning line on stderr (nothing for None)."""
    if line:
        Console(stderr=True, highlight=False, soft_wrap=True).print(line, style="yellow", markup=False)


def _load(space: Path, overrides: list[str] | None, no_cache: bool = False):
    """The config of ``space`` with ``--set`` overrides; ``--no-cache`` is ``cache.enabled: false``."""
    from tskd_tune.config import load_config, parse_overrides

    values = parse_overrides(overrides) | ({"cache.enabled": False} if no_cache else {})
    return load_config(space, values)


@app.command()
def validate(space: SpaceArg, set_: SetOpt = None) -> None:
    """Validate a search-space YAML; print the resolved config and the search space."""
    from tskd_tune.config import to_yaml
    from tskd_tune.data.registry import class_names
    from tskd_tune.space import describe_space

    cfg = _load(space, set_)
    print(f"# resolved config ({space})")
    print(to_yaml(cfg).rstrip())
    print(f"# classes: {', '.join(class_names(cfg.data))}")
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
    from tskd_tune.data.prepare import load

    cfg = _load(space, set_)
    prepared, splits = load(cfg)
    summary = summarize(prepared, splits)
    summary["dataset"] = cfg.data.dataset
    out_dir = out_dir or Path("runs") / "inspect" / (cfg.name or cfg.data.dataset)
    summary["preview"] = str(preview_grid(prepared, preview_indices(splits), out_dir / "preview.png"))
    _write_json(out_dir / "summary.json", summary)
    if as_json:
        print(json.dumps(summary, indent=2))
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
    cfg = _load(space, set_, no_cache)
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

    # a standalone trial has the machine: teacher features missing from the cache are computed on every core
    result = run_trial(cfg, report, JsonlTracker(out_dir / "history.jsonl"), out_dir=out_dir, resume_from=resume_from,
                       test=test, fill_threads=cfg.resources.threads or os.cpu_count())  # fmt: skip
    if as_json:
        print(json.dumps(result.metrics, indent=2, default=float))
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
    cfg = _load(space, set_, no_cache)
    from tskd_tune.cli_synth import print_summary, synth_command

    out_dir = out_dir or Path("runs") / "synth" / (cfg.name or "synth")
    summary = synth_command(cfg, out_dir, console=Console(stderr=True))
    if as_json:
        print(json.dumps(summary, indent=2, default=float))
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
    from tskd_tune.errors import TskdError
    from tskd_tune.export import export

    if fmt not in ("onnx", "torchscript"):
        raise TskdError(f"--format: must be onnx or torchscript, got {fmt!r}")
    if register and fmt != "onnx":
        raise TskdError("--register: needs --format onnx (the registry stores the ONNX model)")
    trial_dir = _trial_folder(trial_dir)
    out_dir = out_dir or trial_dir / f"export-{fmt}"
    card = export(trial_dir, fmt, out_dir)
    out.print(
        f"wrote {out_dir / card['file']} (max |diff| vs PyTorch {card['max_abs_diff_vs_pytorch']:.1e}) and model_card.json"
    )
    if register:
        from tskd_tune import tracking

        uri = tracking.absolute_uri(tracking_uri or card["config"]["tracking"]["uri"])
        tracking.preflight(uri)
        version = tracking.register_export(uri, out_dir, card, register)
        out.print(f"registered {register} version {version} in {uri}")


def _trial_folder(path: Path) -> Path:
    """A trial folder as given, or for a search folder the outputs of its best trial."""
    from tskd_tune.errors import TskdError
    from tskd_tune.search import SEARCH_FILE

    if not (path / SEARCH_FILE).is_file():
        return path
    board = path / "leaderboard.csv"
    if not board.is_file():
        raise TskdError(f"{path}: the search has no leaderboard yet; it writes one when it ends")
    import pandas as pd

    from tskd_tune.report import best_trial

    return Path(best_trial(pd.read_csv(board))["trial_dir"]) / "outputs"


@app.command()
def predict(
    model: Annotated[
        Path,
        typer.Argument(help="An exported folder (model_card.json) or a trial folder.", show_default=False),
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


@app.command()
def launch(
    space: SpaceArg,
    set_: SetOpt = None,
    num_samples: Annotated[
        int | None, typer.Option("--num-samples", help="Trials (default search.num_samples).")
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option("--max-concurrent", help="Trials at once (default search.max_concurrent).")
    ] = None,
    name: Annotated[
        str | None, typer.Option("--name", help="Search name (default: the config's name).")
    ] = None,
    storage: Annotated[
        str,
        typer.Option(
            "--storage",
            help="Folder that holds searches (shared by every node on a cluster), or s3://, gs:// URI.",
        ),
    ] = "runs",
    tracking_uri: Annotated[
        str | None, typer.Option("--tracking-uri", help="MLflow tracking URI (default tracking.uri).")
    ] = None,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            help="Ray cluster: auto (this node's cluster), HOST:PORT, ray://HOST:10001 (Ray Client), or "
            "http(s)://HOST:8265 (submit as a Ray Job). Default: a local Ray instance.",
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Recompute data, teachers and teacher outputs in every trial.")
    ] = False,
    detach: Annotated[
        bool,
        typer.Option("--detach", help="With --address http(s)://...: print the job id and return at once."),
    ] = False,
) -> None:
    """Run a hyperparameter search: Ray Tune trials, Optuna proposals, ASHA early stopping, MLflow records."""
    from tskd_tune import cluster
    from tskd_tune.config import apply_search_overrides
    from tskd_tune.errors import ConfigError
    from tskd_tune.search import SearchOptions
    from tskd_tune.search import launch as run_search

    cfg = apply_search_overrides(_load(space, set_, no_cache), num_samples, max_concurrent)
    if not cfg.search.space:
        raise ConfigError(
            ["search.space: empty; a search needs at least one dimension to search"], str(space)
        )
    if detach and not cluster.is_job_address(address):
        raise TskdError("--detach: only with --address http(s)://HOST:8265 (a search submitted as a Ray Job)")
    if cluster.is_job_address(address):
        cluster.check_tracking_uri(tracking_uri or cfg.tracking.uri)
        args = {"name": name or cfg.name or space.stem, "storage": storage, "tracking_uri": tracking_uri,
                "num_samples": num_samples, "max_concurrent": max_concurrent, "no_cache": no_cache}  # fmt: skip
        raise typer.Exit(cluster.submit(cfg, space, set_ or [], args, address, out, detach=detach))
    from tskd_tune.methods.checks import check_teacher

    # on the driver (a job checks it on the cluster): otherwise every trial would fail on it, each after a retry
    check_teacher(cfg)
    opts = SearchOptions(name or cfg.name or space.stem, storage, tracking_uri or cfg.tracking.uri, address, str(space))
    run_search(cfg, opts, out)


@app.command()
def resume(
    name_or_path: Annotated[
        str, typer.Argument(help="Search name (under runs/) or folder.", show_default=False)
    ],
) -> None:
    """Continue an interrupted search: unfinished and errored trials go on from their checkpoints."""
    from tskd_tune.search import launch as run_search
    from tskd_tune.search import load_search, resolve_search_path

    cfg, opts, _ = load_search(resolve_search_path(name_or_path))
    run_search(cfg, opts, out, resume=True)


@app.command()
def sync(
    name_or_path: Annotated[
        str, typer.Argument(help="Search name (under runs/) or folder.", show_default=False)
    ],
    tracking_uri: Annotated[
        str | None,
        typer.Option(
            "--tracking-uri", help="The MLflow store's address, if it moved (default: the search's)."
        ),
    ] = None,
) -> None:
    """Deliver the MLflow writes a search kept while MLflow was unreachable (a search also does it when it ends)."""
    from tskd_tune import tracking
    from tskd_tune.search import load_search, resolve_search_path, state_path

    path = resolve_search_path(name_or_path)
    _, opts, _ = load_search(path)
    folder = state_path(opts) if (state_path(opts) / tracking.JOURNAL_DIR).is_dir() else path  # moved?
    uri = tracking.absolute_uri(tracking_uri) if tracking_uri else opts.tracking_uri
    tracking.preflight(uri)
    journals, delivered, queued = tracking.sync_journals(folder, uri if tracking_uri else None)
    if queued:
        raise TskdError(
            f"{folder / tracking.JOURNAL_DIR}: {queued} write(s) still queued, MLflow at {uri} "
            "failed again; run `tskd-tune sync` once it is steady"
        )
    out.print(f"delivered {delivered} queued write(s) from {journals} journal(s) to {uri}", markup=False)


@app.command()
def status(
    name_or_path: Annotated[
        str,
        typer.Argument(
            help="Search name (under runs/) or folder; with --address, a Ray Job id.", show_default=False
        ),
    ],
    address: Annotated[
        str | None,
        typer.Option(
            "--address", help="Ray dashboard (http(s)://HOST:8265) of a search submitted as a Ray Job."
        ),
    ] = None,
) -> None:
    """Table of a search's trials and the best so far (also while it runs); or a Ray Job's state and log tail."""
    import pandas as pd

    from tskd_tune.report import objective_board
    from tskd_tune.search import load_search, resolve_search_path

    if address is not None:
        from tskd_tune import cluster

        if not cluster.is_job_address(address):
            raise TskdError(
                f"--address {address}: status reads Ray Jobs through the dashboard, http(s)://HOST:8265"
            )
        cluster.job_status(address, name_or_path, out)
        return
    path = resolve_search_path(name_or_path)
    cfg, _, parent = load_search(path)
    objectives = cfg.search.objective_items()
    metric = objectives[0][0]
    extra = [m for m, _ in objectives[1:] if m != "val_hd95"]
    board = objective_board(path, objectives)
    table = Table("trial", "state", "epoch", metric, "gain", "hd95", *extra,
                  *(["pareto"] if len(objectives) > 1 else []), *cfg.search.space, title=f"search {path.name}",
                  title_justify="left")  # fmt: skip
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    for _, row in board.iterrows():
        front = ["yes" if row["pareto"] else ""] if len(objectives) > 1 else []
        gain = f"{row['gain_vs_scratch']:+.4f}" if pd.notna(row["gain_vs_scratch"]) else ""
        table.add_row(str(row["trial_id"]), row["state"], str(row["epoch"]), fmt(row[metric]), gain,
                      fmt(row["val_hd95"]), *(fmt(row[m]) for m in extra), *front,
                      *(fmt(row.get(p, "")) for p in cfg.search.space))  # fmt: skip
    out.print(table)
    from tskd_tune.search import reference_lines, reference_metrics

    refs = reference_metrics(path)
    for line in reference_lines(refs):
        out.print(line, markup=False)
    if "reference_scratch_val_dice" in refs:
        out.print("gain: a trial's val_dice minus the scratch reference's", markup=False)
    done = board[board["state"] == "finished"]
    out.print(f"{len(board)} trial(s), {len(done)} finished; MLflow parent run {parent}", markup=False)
    if not board.empty and board[metric].notna().any():
        best = board.iloc[0]
        out.print(f"best so far: {best['trial_id']} {metric} {best[metric]:.4f}", markup=False)
    if len(objectives) > 1 and board["pareto"].any():
        front = ", ".join(board.loc[board["pareto"], "trial_id"].astype(str))
        names = ", ".join(f"{m} {d}" for m, d in objectives)
        out.print(f"Pareto front ({names}): {front}", markup=False)


@app.command()
def report(
    name_or_path: Annotated[
        str, typer.Argument(help="Search name (under runs/) or folder.", show_default=False)
    ],
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Output folder (default SEARCH/report).")
    ] = None,
) -> None:
    """Leaderboard CSV and plots (optimisation history, importances, parallel coordinates, Pareto front) as PNG + HTML."""
    from tskd_tune.report import write_report
    from tskd_tune.search import load_search, resolve_search_path

    path = resolve_search_path(name_or_path)
    cfg, _, _ = load_search(path)
    written = write_report(path, out_dir or path / "report", cfg.search.space, cfg.search.objective_items())
    for kind, p in written.items():
        out.print(f"{kind}: {p}", markup=False)


@app.command()
def ui(
    uri: Annotated[str, typer.Option("--uri", help="MLflow store to browse.")] = "sqlite:///runs/mlflow.db",
    port: Annotated[int, typer.Option("--port")] = 5000,
) -> None:
    """Open the MLflow UI on the local store, bound to 127.0.0.1."""
    import subprocess

    out.print(f"MLflow UI on http://127.0.0.1:{port} (Ctrl-C stops it)", markup=False)
    raise typer.Exit(subprocess.call(ui_command(uri, port)))


def ui_command(uri: str, port: int) -> list[str]:
    """The `mlflow ui` command line: loopback only, as the MLflow UI has no login (see SECURITY.md)."""
    from tskd_tune.tracking import absolute_uri

    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", absolute_uri(uri),
            "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip


def _write_json(path: Path, obj: dict) -> None:
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: turns every user error into one line on stderr and exit status 2."""
    from tskd_tune.tracking import mask_secrets

    err = Console(stderr=True, highlight=False)
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="tskd-tune")
    except TskdError as exc:
        for line in exc.lines():
            err.print(f"error: {mask_secrets(line)}", markup=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err.print("interrupted")
        return 130
    except click_exc.NoArgsIsHelpError as exc:
        exc.show()  # the help text, as for --help
        return 2
    except click_exc.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx else "tskd-tune"
        msg = mask_secrets(exc.format_message())
        err.print(f"error: {cmd}: {msg} (see {cmd} --help)", markup=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    return rv if isinstance(rv, int) else 0


def run() -> None:
    """The `tskd-tune` console script."""
    sys.exit(main())
