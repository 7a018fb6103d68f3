"""Links from a report to each trial's MLflow run: into a server's UI, or into the UI ``tskd-tune ui`` serves for
a local store; run ids where neither answers."""

from __future__ import annotations

import html
import os
from pathlib import Path

from tskd_tune.secrets import mask_secrets


def _experiment_id(uri: str, run_id: str) -> str | None:
    """The experiment of ``run_id`` on the server ``uri``, asked once, within seconds; None if it does not answer."""
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    saved = {k: os.environ.get(k) for k in quick}
    os.environ.update(quick)
    try:
        from mlflow.tracking import MlflowClient

        return str(MlflowClient(tracking_uri=uri).get_run(run_id).info.experiment_id)
    except Exception:  # noqa: BLE001 - a report never fails on MLflow: it falls back to run ids
        return None
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def run_links(uri: str | None, run_ids: list[str]) -> tuple[dict[str, str], str]:
    """For each run id, the HTML that leads to it (a link into the MLflow UI of an ``http(s)://`` server
    that answers, else the id), and one note on how to open the runs."""
    shown = html.escape(mask_secrets(uri or ""))
    ids = {r: f"<code>{html.escape(r)}</code>" for r in run_ids}
    if not uri:
        return (
            ids,
            "The search folder names no MLflow store (no <code>search.json</code>): the table gives run ids.",
        )
    if uri.startswith(("http://", "https://")):
        experiment = _experiment_id(uri, run_ids[0]) if run_ids else None
        if experiment is None:
            return ids, f"MLflow at <code>{shown}</code> did not answer: the table gives each trial's run id."
        base = html.escape(mask_secrets(uri.rstrip("/")), quote=True)
        links = {
            r: f'<a href="{base}/#/experiments/{html.escape(experiment)}/runs/{html.escape(r)}">'
            f"{html.escape(r[:8])}…</a>"
            for r in run_ids
        }
        return (
            links,
            f"Runs on the MLflow server <code>{shown}</code> (experiment {html.escape(experiment)}).",
        )
    # a local store (sqlite, a folder) has an address once `tskd-tune ui` serves it: 127.0.0.1 on its default port
    command = html.escape(f"tskd-tune ui --uri {mask_secrets(uri)}")
    experiment = _experiment_id(uri, run_ids[0]) if run_ids and _local_store(uri).exists() else None
    if experiment is None:  # never create a store by asking one that is not there
        return ids, (
            f"MLflow is a local store: open it with <code>{command}</code> (it prints the link to this "
            "search's runs), then find a trial's run by the run id in the table."
        )
    links = {
        r: f'<a href="{LOCAL_UI}/#/experiments/{html.escape(experiment)}/runs/{html.escape(r)}">'
        f"{html.escape(r[:8])}…</a>"
        for r in run_ids
    }
    return links, (
        f"MLflow is a local store: the run links open once <code>{command}</code> serves it at "
        f"{LOCAL_UI} (its default port; with <code>--port N</code>, change the port in the address)."
    )


LOCAL_UI = "http://127.0.0.1:5000"
"""Where ``tskd-tune ui`` serves a local store (127.0.0.1 and its default ``--port``)."""


def _local_store(uri: str) -> Path:
    """The file (SQLite) or folder of a local MLflow store URI."""
    from urllib.parse import urlparse

    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///"))
    return Path(urlparse(uri).path) if uri.startswith("file:") else Path(uri)
