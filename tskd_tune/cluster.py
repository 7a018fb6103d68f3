"""Beyond one machine: cluster addresses, shared storage, MLflow credentials and Ray Jobs.

``--address`` says where a search runs:

- ``auto`` or ``HOST:PORT``: this machine is a node of a Ray cluster; the driver runs here.
- ``ray://HOST:10001``: Ray Client; the driver runs here and its Ray calls run on the cluster.
- ``http(s)://HOST:8265``: the Jobs API; the whole ``tskd-tune launch`` is submitted as a Ray Job
  (the package and the YAML travel in its runtime_env) and runs on the cluster with ``--address auto``.

On a cluster of more than one node, every path a trial writes or reads (the search folder, the trial
cache with its teachers and synthetic pool, checkpoints named in the config) must be one file system
that every node sees. That is checked, not assumed: the driver writes a marker file and a Ray task on
each node reads it back. MLflow credentials come from the environment only and are handed to the
trials through Ray's object store, so they appear in no YAML, parameter, tag, runtime_env or log line.
"""

from __future__ import annotations

import os
import shlex
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

from tskd_tune.errors import TskdError
from tskd_tune.tracking import mask_secrets

# Buckets every node reaches by URI (pyarrow/fsspec file systems): shared by construction.
BUCKET_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "az", "hdfs")
# What MLflow's client reads from the environment to reach a remote server; the first three are secrets.
MLFLOW_SECRET_VARS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")
MLFLOW_ENV_VARS = MLFLOW_SECRET_VARS + (
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_TRACKING_SERVER_CERT_PATH",
    "MLFLOW_TRACKING_CLIENT_CERT_PATH",
)
TOKEN_HELP = (
    "the token is in ~/.ray/auth_token on the head node (or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH here)"
)


# ------------------------------------------------------------------------------ addresses and URIs
def is_job_address(address: str | None) -> bool:
    """True for a dashboard address (``http(s)://HOST:8265``): the search goes in as a Ray Job."""
    return bool(address) and address.split("://", 1)[0].lower() in ("http", "https")


def is_bucket(storage: str | os.PathLike) -> bool:
    """True for a bucket URI (``s3://``, ``gs://``, ...), which every node reaches on its own."""
    text = str(storage)
    return "://" in text and text.split("://", 1)[0].lower() in BUCKET_SCHEMES


def is_uri(storage: str | os.PathLike) -> bool:
    """True for a storage URI (a bucket, or ``file://``) that goes through pyarrow rather than plain paths."""
    return "://" in str(storage)


def check_storage(storage: str) -> None:
    if is_uri(storage) and not (is_bucket(storage) or str(storage).startswith("file://")):
        raise TskdError(f"--storage: {storage}: expected a folder, file:///PATH or a bucket URI "
                        f"({', '.join(s + '://' for s in BUCKET_SCHEMES)})")  # fmt: skip


def storage_dir(storage: str | os.PathLike) -> Path | None:
    """The local folder behind ``storage`` (a path or ``file://``); None for a bucket."""
    if is_bucket(storage):
        return None
    text = str(storage)
    return Path(urlsplit(text).path) if text.startswith("file://") else Path(text)


def local_copy(location: str) -> Path:
    """Where this machine keeps its copy of a search folder held at a storage URI (stable across runs)."""
    scheme, rest = location.split("://", 1)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "tskd-tune" / "storage" / scheme / rest.strip("/")


def pull(location: str, local: Path, only: tuple[str, ...] | None = None) -> bool:
    """Copy a search folder from a storage URI to ``local`` (checkpoints left out); False if there is none.

    ``only``: just these top-level files (what a quick existence check needs).
    """
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(location)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return False
    if only is not None:
        infos = [fs.get_file_info(f"{root}/{name}") for name in only]
    else:
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    for info in infos:
        rel = info.path[len(root) :].lstrip("/")
        if info.type != pafs.FileType.File or any(part.startswith("checkpoint_") for part in rel.split("/")):
            continue
        target = local / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        with fs.open_input_stream(info.path) as src, open(target, "wb") as dst:
            dst.write(src.read())
    return True


def push(local: Path, location: str, names: list[str]) -> None:
    """Copy the named files of the local search folder to the storage URI."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(location)
    fs.create_dir(root, recursive=True)
    for name in names:
        if (local / name).is_file():
            with open(local / name, "rb") as src, fs.open_output_stream(f"{root}/{name}") as dst:
                dst.write(src.read())


def mask_uri(uri: str | None) -> str:
    """``uri`` with any password replaced by ``***`` (``http://user:***@host``), for printing."""
    return mask_secrets(uri) if uri else ""


def refuse_embedded_password(uri: str | None, field: str, env_hint: str) -> None:
    """Credentials never travel in a URI (it ends up in YAML, search.json and run tags)."""
    if uri and "://" in uri:
        try:
            has_password = urlsplit(uri).password is not None
        except ValueError:
            has_password = False
        if has_password:
            raise TskdError(
                f"{field}: {mask_uri(uri)} holds a password; remove it from the URI and {env_hint}"
            )


def check_tracking_uri(uri: str) -> None:
    refuse_embedded_password(uri, "tracking.uri",
                             "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)")  # fmt: skip


def mlflow_env() -> dict[str, str]:
    """The MLflow client settings of this process's environment that trials need as well."""
    return {k: os.environ[k] for k in MLFLOW_ENV_VARS if os.environ.get(k)}


def secret_values() -> list[str]:
    """The secret values present in this environment (what must never be printed or logged)."""
    return [os.environ[k] for k in MLFLOW_SECRET_VARS if os.environ.get(k)]


# ------------------------------------------------------------------------------------ cluster checks
def alive_nodes() -> list[dict]:
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


def prepare(cfg, opts, console):
    """Cluster mode (more than one alive node): shared storage checked, trial cache moved under it.

    Returns the config the search uses. On one node nothing changes. The default ``cache.dir`` moves to
    ``STORAGE/cache`` so a teacher fine-tuned (or a synthetic pool generated) on one node is reused on
    every node; an explicit ``cache.dir`` must itself be shared.
    """
    from tskd_tune.config import CacheConfig

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
    files = {}
    if cfg.teacher.checkpoint is not None:
        files["teacher.checkpoint"] = cfg.teacher.checkpoint
    if cfg.synthetic.pretrained_path is not None:
        files["synthetic.pretrained_path"] = cfg.synthetic.pretrained_path.resolve()
    check_visible(dirs, files, nodes)
    gpus = sum(n.get("Resources", {}).get("GPU", 0) for n in nodes)
    cpus = sum(n.get("Resources", {}).get("CPU", 0) for n in nodes)
    console.print(
        f"cluster: {len(nodes)} nodes ({cpus:g} CPUs, {gpus:g} GPUs); storage {opts.storage} and trial cache "
        f"{cfg.cache.dir} are shared by every node",
        markup=False,
    )
    return cfg


# -------------------------------------------------------------------------------------- Ray Jobs API
def ray_token() -> str | None:
    """The Ray cluster token as Ray's own clients find it: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def job_client(address: str):
    """A JobSubmissionClient that sends the Ray token; connection and auth problems become one line."""
    import logging

    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = ray_token()
    # explicit, because Ray's client adds the header only when RAY_AUTH_MODE=token is set in this process
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # Ray logs its own multi-line hint about a missing token; ours below is the one line that counts
    logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError:
        raise _auth_error(address, token) from None
    except (ConnectionError, RuntimeError) as exc:
        raise TskdError(
            f"--address: cannot reach the Ray Jobs API at {address} ({_first_line(exc)})"
        ) from None


def _auth_error(address: str, token: str | None) -> TskdError:
    if token is None:
        return TskdError(f"--address: {address} asks for a token (401) and none was found here; {TOKEN_HELP}")
    return TskdError(f"--address: {address} rejected the token sent (403); {TOKEN_HELP}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else exc.__class__.__name__)[:200]


def _call(address: str, fn, *args, **kwargs):
    """A JobSubmissionClient call with its failures turned into one line."""
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args, **kwargs)
    except AuthenticationError:
        raise _auth_error(address, ray_token()) from None
    except (ConnectionError, RuntimeError) as exc:
        raise TskdError(f"--address {address}: {_first_line(exc)}") from None


def _default_cache(cfg) -> bool:
    from tskd_tune.config import CacheConfig

    return Path(cfg.cache.dir) == Path(CacheConfig.model_fields["dir"].default)


def _relative_paths(cfg, storage: str) -> list[str]:
    """Paths that would be read relative to the job's temporary working folder on the cluster."""
    bad = []
    if not is_bucket(storage) and not storage_dir(storage).is_absolute():
        bad.append(f"--storage {storage}")
    for label, value in (
        ("data.root", cfg.data.root),
        ("teacher.checkpoint", cfg.teacher.checkpoint),
        ("synthetic.pretrained_path", cfg.synthetic.pretrained_path),
        ("cache.dir", None if _default_cache(cfg) else cfg.cache.dir),
    ):
        if value is not None and not Path(value).is_absolute():
            bad.append(f"{label} {value}")
    return bad


def submit(
    cfg, space: Path, overrides: list[str], args: dict, address: str, console, detach: bool = False
) -> int:
    """Submit ``tskd-tune launch`` as a Ray Job; stream its logs until it ends (or return at once with ``detach``).

    ``args`` are launch's own options (name, storage, tracking_uri, num_samples, max_concurrent, no_cache).
    The package and the YAML travel in the job's runtime_env (py_modules, working_dir); MLflow settings
    of this environment go along as the job's env vars, as Ray's token goes as a header.
    """
    import shutil
    import tempfile

    import tskd_tune

    storage = str(args["storage"])
    check_storage(storage)
    bad = _relative_paths(cfg, storage)
    if bad:
        raise TskdError(
            f"{bad[0]}: a Ray Job runs in a temporary folder on the cluster, where relative paths mean nothing; "
            "give an absolute path that every node mounts"
            + (" or a bucket URI" if bad[0].startswith("--") else "")
        )
    name = args["name"]
    argv = ["tskd-tune", "launch", space.name, "--address", "auto", "--name", name, "--storage", storage]
    if args.get("tracking_uri"):
        argv += ["--tracking-uri", args["tracking_uri"]]
    if args.get("num_samples") is not None:
        argv += ["--num-samples", str(args["num_samples"])]
    if args.get("max_concurrent") is not None:
        argv += ["--max-concurrent", str(args["max_concurrent"])]
    if args.get("no_cache"):
        argv.append("--no-cache")
    for item in overrides:
        argv += ["--set", item]
    if _default_cache(cfg) and not is_bucket(storage):
        # the job's working folder is temporary: keep the trial cache with the searches, for the next job too
        argv += ["--set", f"cache.dir={storage_dir(storage) / 'cache'}"]
    entrypoint = shlex.join(argv)
    client = job_client(address)
    staging = Path(tempfile.mkdtemp(prefix="tskd-job-"))
    try:
        shutil.copy2(space, staging / space.name)
        runtime_env = {
            "working_dir": str(staging),
            "py_modules": [str(Path(tskd_tune.__file__).parent)],
            "env_vars": {"PYTHONUNBUFFERED": "1", **mlflow_env()},
        }
        job_id = f"tskd-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        _call(address, client.submit_job, entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id,
              metadata={"tskd.search": name})  # fmt: skip
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.print(f"submitted Ray Job {job_id} to {address}: {entrypoint}", markup=False)
    follow = f"tskd-tune status {job_id} --address {address}"
    if detach:
        print(job_id)
        console.print(f"follow it with: {follow}  (stop it with: ray job stop {job_id} --address {address})",
                      markup=False)  # fmt: skip
        return 0
    try:
        _stream_logs(client, job_id)
    except KeyboardInterrupt:
        console.print(f"stopped following; the job goes on. {follow}", markup=False)
        return 130
    status = _wait_final(address, client, job_id)
    console.print(f"Ray Job {job_id}: {status}", markup=False)
    return 0 if status == "SUCCEEDED" else 1


def _stream_logs(client, job_id: str) -> None:
    import asyncio
    import sys

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())


def _wait_final(address: str, client, job_id: str, timeout: float = 60.0) -> str:
    # the log stream closes when the driver exits, a moment before the job's status is final
    deadline = time.monotonic() + timeout
    while True:
        status = str(_call(address, client.get_job_status, job_id).value)
        if status in ("SUCCEEDED", "FAILED", "STOPPED") or time.monotonic() > deadline:
            return status
        time.sleep(1)


def job_status(address: str, job_id: str, console, tail: int = 40) -> dict:
    """Print a Ray Job's status, entrypoint and the last lines of its log (the live trial table)."""
    client = job_client(address)
    jobs = {j.submission_id: j for j in _call(address, client.list_jobs) if j.submission_id}
    if job_id not in jobs:
        known = ", ".join(sorted(k for k in jobs if k.startswith("tskd-"))[-5:]) or "none"
        raise TskdError(f"{job_id}: no such job at {address} (tskd-tune jobs there: {known})")
    info = jobs[job_id]
    logs = _call(address, client.get_job_logs, job_id)
    secrets = secret_values()
    lines = [ln for ln in logs.splitlines() if not any(s in ln for s in secrets)][-tail:]
    console.print(f"Ray Job {job_id}: {info.status.value}", markup=False)
    console.print(f"  entrypoint: {info.entrypoint}", markup=False)
    if info.start_time:
        end = info.end_time or time.time() * 1000
        console.print(f"  running for {(end - info.start_time) / 1000:.0f} s" + (" (ended)" if info.end_time else ""),
                      markup=False)  # fmt: skip
    if info.message:
        console.print(f"  {info.message.strip().splitlines()[0][:300]}", markup=False)
    if lines:
        console.print(f"last {len(lines)} log line(s):", markup=False)
        print("\n".join(lines))
    return {"status": info.status.value, "entrypoint": info.entrypoint}
