"""Commands on a search: launch, resume, sync, status, report, ui."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tskd_tune.cli.app import SetOpt, SpaceArg, app, load_cfg, out
from tskd_tune.errors import TskdError


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
    verbose: Annotated[
        bool,
        typer.Option("--verbose", help="Ray Tune's periodic status block instead of the live trial table."),
    ] = False,
    warm_start: Annotated[
        list[str] | None,
        typer.Option(
            "--warm-start",
            help="An earlier search (name or folder) whose finished trials join the "
            "study before any new proposal (repeatable).",
        ),
    ] = None,
) -> None:
    """Run a hyperparameter search: Ray Tune trials, Optuna proposals, ASHA early stopping, MLflow records."""
    from tskd_tune import cluster
    from tskd_tune.config import apply_search_overrides
    from tskd_tune.errors import ConfigError
    from tskd_tune.reporter import Reporter
    from tskd_tune.search import SearchOptions, SearchSession

    cfg = apply_search_overrides(load_cfg(space, set_, no_cache), num_samples, max_concurrent)
    if not cfg.search.space:
        raise ConfigError(
            ["search.space: empty; a search needs at least one dimension to search"], str(space)
        )
    if detach and not cluster.is_job_address(address):
        raise TskdError("--detach: only with --address http(s)://HOST:8265 (a search submitted as a Ray Job)")
    if cluster.is_job_address(address):
        cluster.check_tracking_uri(tracking_uri or cfg.tracking.uri)
        job = cluster.JobLaunch(
            space.name,
            name or cfg.name or space.stem,
            str(storage),
            tracking_uri,
            num_samples,
            max_concurrent,
            no_cache,
            verbose,
            tuple(warm_start or ()),
            tuple(set_ or ()),
        )
        raise typer.Exit(cluster.submit(cfg, space, job, address, out, detach=detach))
    # the teacher is checked with MLflow and the data, while a local Ray starts (search.launch.check_teacher)
    opts = SearchOptions(
        name or cfg.name or space.stem,
        storage,
        tracking_uri or cfg.tracking.uri,
        address,
        str(space),
        tuple(warm_start or ()),
        verbose,
    )
    SearchSession(cfg, opts, Reporter(out)).run()


@app.command()
def resume(
    name_or_path: Annotated[
        str, typer.Argument(help="Search name (under runs/) or folder.", show_default=False)
    ],
) -> None:
    """Continue an interrupted search: unfinished and errored trials go on from their checkpoints."""
    from tskd_tune.reporter import Reporter
    from tskd_tune.search import SearchSession, load_search, resolve_search_path

    cfg, opts, _ = load_search(resolve_search_path(name_or_path))
    SearchSession(cfg, opts, Reporter(out), resume=True).run()


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
    watch: Annotated[
        bool, typer.Option("--watch", help="Keep the table up to date (every 5 s) until the search ends.")
    ] = False,
) -> None:
    """Table of a search's trials and the best so far (also while it runs); or a Ray Job's state and log tail."""
    import time

    from tskd_tune.search import resolve_search_path

    if address is not None:
        from tskd_tune import cluster

        if not cluster.is_job_address(address):
            raise TskdError(
                f"--address {address}: status reads Ray Jobs through the dashboard, http(s)://HOST:8265"
            )
        cluster.job_status(address, name_or_path, out)
        return
    path = resolve_search_path(name_or_path)
    if not watch:
        out.print(status_view(path))
        return
    from rich.live import Live

    with Live(status_view(path), console=out, refresh_per_second=1) as live:
        while not (path / "summary.json").is_file():
            time.sleep(5)
            live.update(status_view(path))
        live.update(status_view(path))


def status_view(path: Path):
    """The status of the search in ``path``: its trials, the reference trials, the best so far."""
    import pandas as pd
    from rich.console import Group

    from tskd_tune.report import importances, objective_board, top
    from tskd_tune.report.plots import FEW_TRIALS
    from tskd_tune.search import load_search, reference_lines, reference_metrics

    cfg, _, parent = load_search(path)
    objectives = cfg.search.objective_items()
    metric = objectives[0][0]
    extra = [m for m, _ in objectives[1:] if m != "val_hd95"]
    from rich import box

    from tskd_tune.report import trial_label
    from tskd_tune.search.names import short_name

    board = objective_board(path, objectives)
    # the names of the live table and the MLflow runs (t003, T, kd, lr): 80 columns hold a demo search
    knobs = [short_name(k) for k in cfg.search.space]
    table = Table(
        "trial",
        "state",
        "epoch",
        metric,
        "gain",
        "hd95",
        *extra,
        *(["pareto"] if len(objectives) > 1 else []),
        *knobs,
        title=f"search {path.name}",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for column in table.columns:
        column.no_wrap = True

    def fmt(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) and pd.notna(v) else "" if isinstance(v, float) else str(v)

    for _, row in board.iterrows():
        front = ["yes" if row["pareto"] else ""] if len(objectives) > 1 else []
        gain = f"{row['gain_vs_scratch']:+.3f}" if pd.notna(row["gain_vs_scratch"]) else ""
        table.add_row(
            trial_label(row),
            row["state"],
            str(row["epoch"]),
            fmt(row[metric]),
            gain,
            fmt(row["val_hd95"]),
            *(fmt(row[m]) for m in extra),
            *front,
            *(fmt(row.get(p, "")) for p in cfg.search.space),
        )
    lines = []
    refs = reference_metrics(path)
    lines += reference_lines(refs)
    if "reference_scratch_val_dice" in refs:
        lines.append("gain: a trial's val_dice minus the scratch reference's")
    done = board[board["state"] == "finished"]
    counts = board["state"].value_counts()  # the words of tskd_tune.states
    states = ", ".join(f"{n} {state}" for state, n in counts.items())
    lines.append(f"{len(board)} trial(s){': ' + states if states else ''}; MLflow parent run {parent}")
    if not board.empty and board[metric].notna().any():
        best = board.iloc[0]
        lines.append(f"best so far: {trial_label(best)} ({best['trial_id']}) {metric} {best[metric]:.4f}")
    if len(objectives) > 1 and board["pareto"].any():
        front = ", ".join(trial_label(row) for _, row in board[board["pareto"]].iterrows())
        names = ", ".join(f"{m} {d}" for m, d in objectives)
        lines.append(f"Pareto front ({names}): {front}")
    if len(done) >= FEW_TRIALS:  # importances of fewer trials rank the parameters mostly by chance
        ranked = top(importances(board, cfg.search.space, objectives))
        if ranked:
            lines.append(
                f"most important ({len(done)} finished trials): "
                + ", ".join(f"{k} {v:.2f}" for k, v in ranked)
            )
    from rich.text import Text

    return Group(table, *(Text(line) for line in lines))


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
    """Open the MLflow UI on the local store, bound to 127.0.0.1 (a store moved with its mlartifacts folder
    is first pointed at it there). The link is printed once the server answers, on the latest search's runs
    table; the server's own log goes to a file; Ctrl-C or SIGTERM stops the server with it."""
    import signal
    import socket
    import subprocess
    import tempfile

    from tskd_tune.tracking import absolute_uri, reroot

    uri = absolute_uri(uri)
    moved = reroot(uri)
    if moved:
        out.print(f"artifacts of {', '.join(moved)} found beside the moved store", markup=False)
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise TskdError(
                f"--port {port}: 127.0.0.1:{port} is taken (another MLflow UI?); pass --port N"
            ) from None
    store = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    folder = (
        store.parent
        if store is not None and os.access(store.parent, os.W_OK)
        else Path(tempfile.gettempdir())
    )
    log = folder / f"mlflow-ui-{port}.log"
    with open(log, "w") as sink:
        server = subprocess.Popen(
            ui_command(uri, port),
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=os.environ | UI_ENV,
            start_new_session=True,
        )

    def stop(*_) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        view = latest_view(uri)  # while the server starts
        if not _answers(port, server):
            raise TskdError(f"mlflow ui did not start; its log: {log} ({_last_line(log)})")
        out.print(
            f"MLflow UI on http://127.0.0.1:{port}/{view or ''}  (server log: {log}; Ctrl-C stops it)",
            markup=False,
        )
        code = server.wait()
    except KeyboardInterrupt:
        code = 0
    finally:
        _stop_group(server)
    raise typer.Exit(code)


def latest_view(uri: str) -> str | None:
    """The runs-table link (``#/experiments/...``) of the latest search in the store: the view its parent run's
    search saved (see search/parent_view.py's ``leaderboard_view``); None when there is none."""
    from mlflow.tracking import MlflowClient

    from tskd_tune.search.parent_view import TRAINING_UI, VIEW_TAG

    try:
        client = MlflowClient(uri)
        found = []
        for exp in client.search_experiments():
            keys = [k.removeprefix(VIEW_TAG) for k in exp.tags if k.startswith(VIEW_TAG + "tskd-")]
            found += [(exp.experiment_id, key, exp.last_update_time or 0) for key in keys]
        if not found:
            return None
        runs = {k: client.get_run(k.removeprefix("tskd-")).info.start_time for _, k, _ in found}
    except Exception:  # noqa: BLE001 - a convenience: the UI opens on its home page instead
        return None
    experiment, key, _ = max(found, key=lambda f: runs.get(f[1]) or 0)
    return f"#/experiments/{experiment}/runs?viewStateShareKey={key}&{TRAINING_UI}"


def _answers(port: int, server, timeout: float = 180.0) -> bool:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def _last_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def _stop_group(server) -> None:
    """SIGTERM to the server's process group (mlflow ui, its uvicorn workers), SIGKILL after 10 s."""
    import signal
    import subprocess

    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            return
        try:
            server.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


UI_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
"""The environment of `mlflow ui`: without the job runners of MLflow's GenAI features (evaluation judges), a
dozen processes a local browse of training runs does not use."""


def ui_command(uri: str, port: int) -> list[str]:
    """The `mlflow ui` command line: loopback only, as the MLflow UI has no login (see SECURITY.md); one worker."""
    from tskd_tune.tracking import absolute_uri

    return [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--backend-store-uri",
        absolute_uri(uri),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
