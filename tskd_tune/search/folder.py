"""A search's folder: its options, where it lives (a folder or a bucket URI), and reading it back."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from tskd_tune import cluster
from tskd_tune.config import Config, validate
from tskd_tune.errors import TskdError

SEARCH_FILE = "search.json"
GRACE_FILE = "grace.json"
"""The grace period a search (or stage) took from its pilot trials, in its experiment folder."""
REFERENCES = "baselines"
"""Folder of the search that holds the reference trials (``baselines/<method>/outputs``)."""


@dataclass(frozen=True)
class SearchRun:
    """What every trial of a search (or of one stage of it) knows of the search: it travels with the trainable
    through Ray's object store, never in a runtime_env, so the MLflow credentials in ``mlflow_env`` reach the
    trials without showing in a dashboard, a log or this object's repr."""

    tracking_uri: str
    parent_run_id: str
    state_path: Path
    """The search folder on this node: MLflow journals, failure records, reference trials."""
    started: float
    """When the search started (time.time()): what the cache keeper spares."""
    mlflow_env: dict[str, str] = field(default_factory=dict, repr=False)
    stage: str | None = None
    """A staged search's stage (``teacher``, ``student``); None for a joint search."""
    teachers: dict[str, dict] = field(default_factory=dict)
    """The student stage's chosen teachers: name -> their teacher.* values."""


@dataclass(frozen=True)
class SearchOptions:
    """How a search runs (CLI flags), as opposed to what it searches (the config)."""

    name: str
    storage: Path | str  # a folder, or a URI (s3://, gs://, file://) that Ray Tune writes through pyarrow
    tracking_uri: str
    address: str | None = None
    space_file: str = ""
    warm_start: tuple[str, ...] = ()
    """Earlier searches whose finished trials join the study first (--warm-start)."""
    verbose: bool = False
    """Ray Tune's own periodic status block instead of the live table (--verbose; not saved)."""

    @property
    def path(self) -> Path:
        """The search folder on this machine; for a storage URI, this machine's copy of it."""
        if cluster.is_uri(self.storage):
            return cluster.local_copy(self.location)
        return Path(self.storage) / self.name

    @property
    def location(self) -> str:
        """Where the search lives for Ray Tune and every node: the folder, or its URI."""
        if cluster.is_uri(self.storage):
            return f"{str(self.storage).rstrip('/')}/{self.name}"
        return str(Path(self.storage) / self.name)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "storage": str(self.storage),
            "tracking_uri": self.tracking_uri,
            "address": self.address,
            "space_file": self.space_file,
            "warm_start": list(self.warm_start),
        }


def state_path(opts: SearchOptions) -> Path:
    """Where trials keep their MLflow journals, failure records and reference trials: the search folder,
    which every node sees with a folder (or file://) storage. With a bucket, the same path on each node:
    journals then stay on the node a trial ran on, and `tskd-tune sync` delivers those on the machine it
    runs on."""
    local = cluster.storage_dir(opts.storage)
    return local / opts.name if local is not None else opts.path


def load_search(path: Path) -> tuple[Config, SearchOptions, str]:
    """The config, options and parent run of an existing search folder."""
    f = Path(path) / SEARCH_FILE
    if not f.is_file():
        raise TskdError(f"{path}: not a search folder (no {SEARCH_FILE})")
    saved = json.loads(f.read_text())
    o = saved["options"]
    storage = o["storage"] if cluster.is_uri(o["storage"]) else Path(o["storage"])
    opts = SearchOptions(
        o["name"], storage, o["tracking_uri"], o["address"], o["space_file"], tuple(o.get("warm_start", ()))
    )
    cfg = validate(saved["config"])
    if o.get("use_cache") is False:  # searches written before --no-cache became cache.enabled
        cfg = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"enabled": False})})
    return cfg, opts, saved["parent_run_id"]


def resolve_search_path(name_or_path: str, storage: Path = Path("runs")) -> Path:
    """A search folder by name (under ``storage``), folder, or URI (fetched to this machine's copy)."""
    if cluster.is_uri(name_or_path):
        local = cluster.local_copy(name_or_path.rstrip("/"))
        if cluster.pull(name_or_path.rstrip("/"), local) and (local / SEARCH_FILE).is_file():
            return local
        raise TskdError(f"{name_or_path}: no search found (no {SEARCH_FILE} there)")
    p = Path(name_or_path)
    if (p / SEARCH_FILE).is_file():
        return p
    if (storage / name_or_path / SEARCH_FILE).is_file():
        return storage / name_or_path
    raise TskdError(
        f"{name_or_path}: no search found (looked for {SEARCH_FILE} in {p} and {storage / name_or_path})"
    )


def git_commit() -> str:
    """The commit of the code running the search (tagged on the parent run), or "unknown"."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def trial_id_of(folder_name: str) -> str:
    """The trial id in a trial folder named by ``tuner.trial_dirname`` (``t007_<trial id>``)."""
    return folder_name.rsplit("_", 1)[-1]
