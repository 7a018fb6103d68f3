"""Checks before a search runs on a cluster: the tracking URI holds no password, and every folder and
file a trial uses is one that every node sees (a marker file written here is read back on each node)."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from tskd_tune.cluster.storage import storage_dir
from tskd_tune.errors import TskdError
from tskd_tune.secrets import mask_uri, refuse_embedded_password

if TYPE_CHECKING:
    from tskd_tune.reporter import Reporter


def check_tracking_uri(uri: str) -> None:
    """Refuse a tracking URI that carries a password: MLflow's credentials come from the environment."""
    refuse_embedded_password(
        uri,
        "tracking.uri",
        "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)",
    )


def alive_nodes() -> list[dict]:
    """The Ray cluster's nodes that are alive."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _check_on_node(items: list[tuple[str, str, str | None]]) -> list[str]:
    """On one node: the labels of ``(label, path, marker text)`` items it cannot see as the driver does."""
    bad = []
    for label, path, text in items:
        p = Path(path)
        try:
            ok = p.read_text() == text if text is not None else p.exists()
        except OSError:
            ok = False
        if not ok:
            bad.append(label)
    return bad


def check_visible(dirs: dict[str, Path], files: dict[str, Path], nodes: list[dict]) -> None:
    """Refuse, in one line, any folder or file that some node does not see as this machine does.

    ``dirs`` get a marker file written here and read back by a Ray task pinned to each node (so a
    node-local folder of the same name fails); ``files`` must exist on every node.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    token = uuid.uuid4().hex
    items, markers = [], []
    for label, folder in dirs.items():
        try:
            folder.mkdir(parents=True, exist_ok=True)
            marker = folder / f".tskd-shared-{token}"
            marker.write_text(token)
        except OSError as exc:
            raise TskdError(f"{label}: cannot write to {folder} ({exc.strerror})") from None
        markers.append(marker)
        items.append((label, str(marker), token))
    items += [(label, str(path), None) for label, path in files.items()]
    check = ray.remote(num_cpus=0, max_retries=0)(_check_on_node)
    try:
        refs = {
            n["NodeID"]: check.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(items)
            for n in nodes
        }
        results = dict(zip(refs, ray.get(list(refs.values()), timeout=300), strict=True))
    finally:
        for m in markers:
            m.unlink(missing_ok=True)
    paths = dict(dirs) | dict(files)
    for node in nodes:
        for label in results[node["NodeID"]]:
            where = f"node {node['NodeID'][:12]} ({node.get('NodeManagerAddress', '?')})"
            raise TskdError(
                f"{label}: {paths[label]} is not shared: {where} does not see it. On a cluster of {len(nodes)} "
                "nodes it must be a folder every node mounts (NFS, EFS, Filestore) or, for --storage, a bucket URI"
            )


def prepare(cfg, opts, say: Reporter):
    """Cluster mode (more than one alive node): shared storage checked, trial cache moved under it.

    Returns the config the search uses. On one node nothing changes. The default ``cache.dir`` moves to
    ``STORAGE/cache`` so a teacher fine-tuned (or a synthetic pool generated) on one node is reused on
    every node; an explicit ``cache.dir`` must itself be shared.
    """
    from tskd_tune.config import CacheConfig, path_values

    nodes = alive_nodes()
    if len(nodes) <= 1:
        return cfg
    uri = opts.tracking_uri
    if not uri.split("://", 1)[0].lower().startswith("http") and not uri.startswith("databricks"):
        raise TskdError(
            f"tracking.uri: {mask_uri(uri)} is a local store, but trials run on {len(nodes)} nodes and would each "
            "write their own copy; run an MLflow server and pass --tracking-uri http://HOST:5000 (see cluster/README.md)"
        )
    default_cache = Path(CacheConfig.model_fields["dir"].default).resolve()
    folder = storage_dir(opts.storage)
    dirs: dict[str, Path] = {}
    if folder is None and cfg.cache.dir == default_cache:
        raise TskdError(
            f"cache.dir: --storage {opts.storage} is a bucket, but the trial cache needs a file system (file "
            "locks, memory-mapped arrays); set cache.dir to a folder every node mounts"
        )
    if folder is not None:
        dirs["--storage"] = folder
    if cfg.cache.dir == default_cache:
        cfg = cfg.model_copy(update={"cache": cfg.cache.model_copy(update={"dir": folder / "cache"})})
    else:
        dirs["cache.dir"] = cfg.cache.dir
    # every other path a trial reads must be there on every node (a journal study storage the driver writes)
    files = {
        k: Path(v).resolve()
        for k, v in path_values(cfg).items()
        if k not in ("cache.dir", "search.study_storage")
    }
    check_visible(dirs, files, nodes)
    gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in nodes)
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
    say.line(
        f"cluster: {len(nodes)} nodes ({cpus:g} CPUs, {gpus:g} GPUs); storage {opts.storage} and trial cache "
        f"{cfg.cache.dir} are shared by every node"
    )
    return cfg
