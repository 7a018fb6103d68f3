"""The Ray Jobs API: a whole ``tskd-tune launch`` submitted to a cluster's dashboard, followed, and
looked up later (``tskd-tune status``), with Ray's token sent as a header."""

from __future__ import annotations

import dataclasses
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tskd_tune.cluster.storage import check_storage, is_bucket, storage_dir
from tskd_tune.errors import TskdError
from tskd_tune.secrets import mlflow_env, secret_values

if TYPE_CHECKING:
    from rich.console import Console

TOKEN_HELP = (
    "the token is in ~/.ray/auth_token on the head node (or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH here)"
)


@dataclass(frozen=True)
class JobLaunch:
    """What ``launch`` was told on this machine, to be said again on the cluster as a Ray Job's entrypoint.

    One field per ``launch`` option that the job's driver needs (``--address`` and ``--detach`` are this
    machine's business); tests/test_cluster.py checks that every option of the command is here and that
    :meth:`to_argv` parses back to the same values through the real CLI.
    """

    space: str  # the YAML's file name: it travels in the job's working_dir
    name: str
    storage: str
    tracking_uri: str | None = None
    num_samples: int | None = None
    max_concurrent: int | None = None
    no_cache: bool = False
    verbose: bool = False
    warm_start: tuple[str, ...] = ()
    set_: tuple[str, ...] = ()

    def to_argv(self) -> list[str]:
        """``tskd-tune launch SPACE --address auto ...``: the job's driver joins the cluster it runs on."""
        argv = [
            "tskd-tune",
            "launch",
            self.space,
            "--address",
            "auto",
            "--name",
            self.name,
            "--storage",
            self.storage,
        ]
        for flag, value in (
            ("--tracking-uri", self.tracking_uri),
            ("--num-samples", self.num_samples),
            ("--max-concurrent", self.max_concurrent),
        ):
            if value is not None:
                argv += [flag, str(value)]
        argv += [flag for flag, on in (("--no-cache", self.no_cache), ("--verbose", self.verbose)) if on]
        argv += [a for w in self.warm_start for a in ("--warm-start", w)]
        return argv + [a for item in self.set_ for a in ("--set", item)]


def is_job_address(address: str | None) -> bool:
    """True for a dashboard address (``http(s)://HOST:8265``): the search goes in as a Ray Job."""
    return bool(address) and address.split("://", 1)[0].lower() in ("http", "https")


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
    from tskd_tune.config import path_values

    for label, value in path_values(cfg).items():
        if label == "cache.dir" and _default_cache(cfg):
            continue  # the default cache moves under --storage on the cluster
        if not Path(value).is_absolute():
            bad.append(f"{label} {value}")
    return bad


def submit(cfg, space: Path, job: JobLaunch, address: str, console: Console, detach: bool = False) -> int:
    """Submit ``tskd-tune launch`` as a Ray Job; stream its logs until it ends (or return at once with ``detach``).

    The package and the YAML travel in the job's runtime_env (py_modules, working_dir); MLflow settings
    of this environment go along as the job's env vars, as Ray's token goes as a header.
    """
    import shutil
    import tempfile

    import tskd_tune

    storage = job.storage
    check_storage(storage)
    bad = _relative_paths(cfg, storage)
    if bad:
        raise TskdError(
            f"{bad[0]}: a Ray Job runs in a temporary folder on the cluster, where relative paths mean nothing; "
            "give an absolute path that every node mounts"
            + (" or a bucket URI" if bad[0].startswith("--") else "")
        )
    name = job.name
    if _default_cache(cfg) and not is_bucket(storage):
        # the job's working folder is temporary: keep the trial cache with the searches, for the next job too
        job = dataclasses.replace(job, set_=(*job.set_, f"cache.dir={storage_dir(storage) / 'cache'}"))
    argv = job.to_argv()
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
        _call(
            address,
            client.submit_job,
            entrypoint=entrypoint,
            runtime_env=runtime_env,
            submission_id=job_id,
            metadata={"tskd.search": name},
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.print(f"submitted Ray Job {job_id} to {address}: {entrypoint}", markup=False)
    follow = f"tskd-tune status {job_id} --address {address}"
    if detach:
        print(job_id)
        console.print(
            f"follow it with: {follow}  (stop it with: ray job stop {job_id} --address {address})",
            markup=False,
        )
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


def job_status(address: str, job_id: str, console: Console, tail: int = 40) -> dict:
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
        console.print(
            f"  running for {(end - info.start_time) / 1000:.0f} s" + (" (ended)" if info.end_time else ""),
            markup=False,
        )
    if info.message:
        console.print(f"  {info.message.strip().splitlines()[0][:300]}", markup=False)
    if lines:
        console.print(f"last {len(lines)} log line(s):", markup=False)
        print("\n".join(lines))
    return {"status": info.status.value, "entrypoint": info.entrypoint}
