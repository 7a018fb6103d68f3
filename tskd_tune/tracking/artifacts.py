"""Where run artifacts live: beside a SQLite store, in ``<the database's folder>/mlartifacts/<experiment>``.

MLflow's default for a database store is ``./mlruns`` of whatever folder the process that creates the
experiment runs in; an experiment created here keeps its artifacts next to the database instead, so that
the store and its artifacts are one folder (``runs/`` by default: ``runs/mlflow.db``, ``runs/mlartifacts``).
With an MLflow server the server's artifact root is used, as it configures it.

MLflow keeps every artifact location as an absolute path (it resolves a relative one against the working
directory when the experiment is created), so a store that is moved with its ``mlartifacts`` folder points
at the old place. :func:`reroot` points it at the new one; ``tskd-tune ui`` calls it before starting MLflow.
"""

from __future__ import annotations

import re
import sqlite3
from contextlib import closing
from pathlib import Path

ARTIFACTS = "mlartifacts"
SQLITE = "sqlite:///"
# every column in which MLflow keeps an artifact location: experiments, runs, logged models, model versions
_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)
_TABLES = sorted({t for t, _ in _COLUMNS})


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` store URI; None for any other store."""
    return Path(uri[len(SQLITE) :].split("?", 1)[0]) if uri.startswith(SQLITE) else None


def artifact_location(uri: str, experiment: str) -> str | None:
    """Where a new experiment named ``experiment`` keeps its artifacts: ``<db folder>/mlartifacts/<name>``
    for a SQLite store; None (the server's artifact root, or MLflow's default) for any other store."""
    db = sqlite_path(uri)
    if db is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "_", experiment).strip("._") or "experiment"
    return str(db.resolve().parent / ARTIFACTS / folder)


def reroot(uri: str) -> list[str]:
    """Point the artifact locations of a moved SQLite store at the ``mlartifacts`` folder beside it now.

    An experiment located at ``<old folder>/mlartifacts/<name>`` is re-rooted, with its runs, logged models
    and model versions, when ``<name>`` is in the ``mlartifacts`` beside the database or the old folder is
    gone; every other location is left as it is. Returns the names of the experiments re-rooted.
    """
    db = sqlite_path(uri)
    if db is None or not db.is_file() or not (db.resolve().parent / ARTIFACTS).is_dir():
        return []
    root = str(db.resolve().parent / ARTIFACTS)
    moved = []
    with closing(sqlite3.connect(db)) as con, con:  # closed, and committed as one transaction
        columns = {t: {c[1] for c in con.execute(f"PRAGMA table_info({t})")} for t in _TABLES}
        for exp_id, name, location in con.execute(
            "SELECT experiment_id, name, artifact_location FROM experiments"
        ).fetchall():
            path = (location or "").removeprefix("file://")
            old, sep, rest = path.rpartition(f"/{ARTIFACTS}/")
            if not sep or not rest or old + sep == root + "/":
                continue
            if not (Path(root, rest).is_dir() or not Path(path).exists()):
                continue  # kept elsewhere on purpose: not a store moved with its artifacts
            for prefix in ("", "file://"):
                before, after = f"{prefix}{old}/{ARTIFACTS}/", f"{prefix}{root}/"
                for table, column in _COLUMNS:
                    if column not in columns[table]:
                        continue
                    # this experiment's rows (model versions, which have no experiment: by the location alone)
                    scope = " AND experiment_id = ?" if "experiment_id" in columns[table] else ""
                    con.execute(
                        f"UPDATE {table} SET {column} = ? || substr({column}, ?) WHERE substr({column}, 1, ?) = ?{scope}",
                        (after, len(before) + 1, len(before), before, *([exp_id] if scope else [])),
                    )
            moved.append(name)
    return moved
