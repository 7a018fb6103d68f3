"""A real two-node Ray cluster and a real MLflow server on PostgreSQL, all on loopback.

The head node and a second node (its own temp dir, a custom resource, and, where the machine allows
it, a private mount namespace in which one folder is node-local) form one Ray cluster with token
auth; MLflow runs as `mlflow server` with basic auth, a PostgreSQL backend started from Debian's
packages, and a proxied artifact store (`--serve-artifacts`). Searches go in with `--address auto`
and through the Jobs API. Every process is started in its own session and killed by its process
group at the end, also when a test fails: other users of this machine run Ray too, so `ray stop`
(which stops every Ray on the machine) is never called.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.conftest import free_port, wait_for

pytestmark = pytest.mark.cluster

BIN = Path(sys.executable).parent
PASSWORD = "pw-" + secrets.token_hex(8)  # the MLflow admin password: must never show up in runs or output


def wait_until(check, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1)
    tail = log.read_text()[-3000:] if log and log.is_file() else ""
    raise TimeoutError(f"{what} not up after {timeout:.0f} s\n{tail}")


def kill_session(proc: subprocess.Popen | None, pgid: int | None = None) -> None:
    """SIGTERM then SIGKILL to a process group we started (start_new_session=True)."""
    pgid = pgid or (proc.pid if proc is not None else None)
    if pgid is None:
        return
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return
            time.sleep(0.3)


def _group_alive(pgid: int) -> bool:
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def kill_leftovers(marker: str) -> None:
    """Any process whose command line names our temp dir (a Ray worker that left its group)."""
    for cmd in glob.glob("/proc/[0-9]*/cmdline"):
        try:
            if marker in Path(cmd).read_bytes().decode(errors="replace"):
                os.kill(int(cmd.split("/")[2]), signal.SIGKILL)
        except (OSError, ValueError):
            continue


# ----------------------------------------------------------------------------------------- services
@pytest.fixture(scope="module")
def workdir():
    # short and under /tmp: Ray's unix socket paths must stay under 108 characters
    path = Path(tempfile.mkdtemp(prefix="tskd-lb-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    kill_leftovers(str(path))
    shutil.rmtree(path, ignore_errors=True)


def _pg_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(versions[-1]).parent if versions else None


@pytest.fixture(scope="module")
def postgres(workdir):
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) on a free loopback port; trust auth, loopback only."""
    pg = _pg_bin()
    if pg is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "postgresql"], check=True, env=env, timeout=900)
        pg = _pg_bin()
    if pg is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="tskd-pg-", dir="/tmp"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(root, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data, log = root / "data", root / "postgres.log"
    subprocess.run(
        [*as_user, str(pg / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    ctl = [*as_user, str(pg / "pg_ctl"), "-D", str(data)]
    subprocess.run(
        [*ctl, "-o", f"-p {port} -k {root} -c listen_addresses=127.0.0.1", "-l", str(log), "-w", "start"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres")
        conn.autocommit = True
        with conn.cursor() as cur:
            for db in ("mlflow", "mlflow_auth", "optuna"):
                cur.execute(f"CREATE DATABASE {db}")
        conn.close()
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*ctl, "-m", "immediate", "-w", "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


class MlflowServer:
    """`mlflow server` on PostgreSQL with basic auth and a proxied artifact store, on a fixed port, that a test
    can kill and start again (a restart: same port, same database, same artifact folder)."""

    def __init__(self, workdir: Path, postgres: str):
        self.port, self.artifacts, self.log = (
            free_port(),
            workdir / "mlflow-artifacts",
            workdir / "mlflow.log",
        )
        self.uri, self.workdir, self.proc = f"http://127.0.0.1:{self.port}", workdir, None
        auth_ini = workdir / "basic_auth.ini"
        auth_ini.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {postgres}/mlflow_auth\n"
            f"admin_username = admin\nadmin_password = {PASSWORD}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # each uncached check hashes the password (PBKDF2): seconds per request on a busy 2-core machine,
            # enough to miss the launch's 10 s preflight; a checked credential is then reused
            "auth_cache_ttl_seconds = 3600\n"
        )
        self.env = os.environ | {
            "MLFLOW_AUTH_CONFIG_PATH": str(auth_ini),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
        }
        # one worker, so the warm-up below reaches the process that serves the search (a cold second worker
        # on a busy 2-core machine can miss the launch's 10 s preflight)
        self.cmd = [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"{postgres}/mlflow",
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.artifacts),
            "--app-name",
            "basic-auth",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def start(self) -> None:
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(
                self.cmd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,
            )
        wait_until(self.up, 240, "mlflow server", self.log)

    def up(self) -> bool:
        # an authenticated API call, not just /health: the auth app creates its admin on the first ones
        import base64

        auth = base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
        req = urllib.request.Request(
            f"{self.uri}/api/2.0/mlflow/experiments/search?max_results=1",
            headers={"Authorization": f"Basic {auth}"},
        )
        try:
            return urllib.request.urlopen(req, timeout=30).status == 200
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash or a pod eviction would: no request finishes, nothing is flushed."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        wait_until(lambda: not _group_alive(self.proc.pid) and not self.up(), 60, "mlflow server to be gone")


@pytest.fixture(scope="module")
def mlflow_proc(workdir, postgres):
    server = MlflowServer(workdir, postgres)
    try:
        server.start()
        yield server
    finally:
        if server.proc is not None:
            kill_session(server.proc)


@pytest.fixture(scope="module")
def mlflow_server(mlflow_proc):
    """The server's (uri, artifacts dir)."""
    return mlflow_proc.uri, mlflow_proc.artifacts


@pytest.fixture(scope="module")
def ray_cluster(workdir):
    """Head + one more node on loopback, token auth with a token of their own; yields a dict of addresses."""
    token = workdir / "ray_token"
    token.write_text(secrets.token_hex(16))
    nodelocal = workdir / "nodelocal"
    nodelocal.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_"))}
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "PATH": f"{BIN}:{env.get('PATH', '')}",
        "RAY_USAGE_STATS_ENABLED": "0",
        "XDG_CACHE_HOME": str(workdir / "xdg"),
    }
    gcs, dash = free_port(), free_port()

    def ports(*names: str) -> list[str]:
        return [a for n in names for a in (f"--{n}", str(free_port()))]

    common = [
        "--num-cpus",
        "1",
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(300 * 1024**2),
        "--disable-usage-stats",
    ]
    agent = (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    )
    head = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--port",
        str(gcs),
        "--node-ip-address",
        "127.0.0.1",
        "--temp-dir",
        str(workdir / "rh"),
        "--include-dashboard",
        "true",
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dash),
        *ports(*agent, "ray-client-server-port"),
        *common,
    ]
    second = [
        str(BIN / "ray"),
        "start",
        "--address",
        f"127.0.0.1:{gcs}",
        "--node-ip-address",
        "127.0.0.1",
        "--temp-dir",
        str(workdir / "rw"),
        "--resources",
        '{"second_node": 1}',
        *ports(*agent),
        *common,
    ]
    # The second node gets a private mount namespace in which `nodelocal` and the head's Ray temp dir are
    # empty tmpfs: folders of those names exist on both nodes, but each node sees its own, as on two real
    # machines (so a trial's files reach the search folder only through Ray's upload, not by accident).
    private = os.geteuid() == 0 and shutil.which("unshare") is not None
    if private:
        hide = " && ".join(f"mount -t tmpfs tmpfs {d}" for d in (nodelocal, workdir / "rh"))
        script = f"{hide} && exec " + " ".join(f"'{a}'" for a in second)
        second = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    groups: list[int] = []
    try:
        for name, cmd in (("head", head), ("second", second)):
            with open(workdir / f"ray-{name}.log", "w") as out:
                proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            groups.append(proc.pid)  # the daemons stay in this process group after `ray start` returns
            assert proc.wait(timeout=180) == 0, (workdir / f"ray-{name}.log").read_text()[-3000:]
        yield {
            "gcs": f"127.0.0.1:{gcs}",
            "dashboard": f"http://127.0.0.1:{dash}",
            "env": env,
            "token": token,
            "nodelocal": nodelocal if private else None,
        }
    finally:
        for pgid in groups:
            kill_session(None, pgid)
        kill_leftovers(str(workdir / "rh"))
        kill_leftovers(str(workdir / "rw"))


# ------------------------------------------------------------------------------------------ helpers
def space_yaml(workdir: Path) -> Path:
    from tests.conftest import tiny_raw

    raw = tiny_raw(workdir, student={"epochs": 2}, teacher={"epochs": 4})
    del raw["cache"]  # the default cache.dir, which cluster mode moves under the shared storage
    raw["name"] = "lb"
    raw["tracking"] = {"experiment": "loopback"}
    raw["resources"] = {"cpu": 1, "threads": 1}
    # only student-side knobs: every trial needs the same teacher, which one node trains and all reuse
    # no reference trials: these tests count the trials' runs
    raw["search"] = {
        "num_samples": 4,
        "max_concurrent": 2,
        "scheduler": "fifo",
        "baselines": [],
        "space": {
            "distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0},
            "distill.kd_weight": {"type": "uniform", "low": 0.2, "high": 2.0},
        },
    }
    path = workdir / "client" / "lb.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def tskd(*args, env: dict, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tskd_tune", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=timeout,
    )


def client_env(ray_cluster, **extra) -> dict:
    env = dict(ray_cluster["env"])
    env |= {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": PASSWORD, **extra}
    return env


def mlflow_client(uri: str):
    from mlflow.tracking import MlflowClient

    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = "admin", PASSWORD
    return MlflowClient(uri)


def children_of(client, parent_name: str):
    exp = client.get_experiment_by_name("loopback")
    runs = client.search_runs([exp.experiment_id], max_results=200)
    parent = next(
        r for r in runs if r.info.run_name == parent_name and "mlflow.parentRunId" not in r.data.tags
    )
    return parent, [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]


def assert_no_secret(client, runs, *texts: str) -> None:
    for run in runs:
        values = [*run.data.params.values(), *run.data.tags.values(), *run.data.params, *run.data.tags]
        assert not any(PASSWORD in v for v in values), run.info.run_id
    for text in texts:
        assert PASSWORD not in text


# -------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def searched(workdir, ray_cluster, mlflow_server, postgres):
    uri, _ = mlflow_server
    space = space_yaml(workdir)
    env = client_env(ray_cluster, RAY_ADDRESS=ray_cluster["gcs"])
    t0 = time.monotonic()
    proc = tskd(
        "launch",
        space,
        "--address",
        "auto",
        "--tracking-uri",
        uri,
        "--storage",
        workdir / "shared" / "runs",
        "--set",
        f"search.study_storage={postgres}/optuna",
        env=env,
        cwd=space.parent,
    )
    print(f"search on the loopback cluster: {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_search_spreads_over_both_nodes_and_logs_every_trial_to_the_server(searched, mlflow_server, workdir):
    uri, artifacts = mlflow_server
    assert "cluster: 2 nodes" in searched.stdout
    client = mlflow_client(uri)
    parent, children = children_of(client, "lb")
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert {"leaderboard.csv", "best.yaml", "search_config.yaml"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id)
    }
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"distill.temperature", "distill.kd_weight"} <= set(child.data.params)
        assert "val_dice" in child.data.metrics and "student_params" in child.data.metrics
        assert child.data.tags["device"] == "cpu" and child.data.tags["ray.node_ip"]
        listed = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"config.yaml", "trial_summary.json", "student.safetensors"} <= listed
        # uploaded through the server's proxy: the files sit in its --artifacts-destination
        assert list(artifacts.rglob(f"{child.info.run_id}/artifacts/student.safetensors"))
    assert len({c.data.tags["ray.node_id"] for c in children}) == 2  # trials ran on both nodes
    # every trial's outputs reached the shared search folder, also from the node that is not the driver's
    trial_dirs = [d for d in (workdir / "shared" / "runs" / "lb").iterdir() if (d / "params.json").is_file()]
    assert len(trial_dirs) == 4 and all((d / "outputs" / "metrics.json").is_file() for d in trial_dirs)
    assert_no_secret(client, [parent, *children], searched.stdout, searched.stderr)


def test_teacher_is_fine_tuned_once_and_reused_on_the_other_node(searched, mlflow_server, workdir):
    client = mlflow_client(mlflow_server[0])
    _, children = children_of(client, "lb")
    trained = [c for c in children if c.data.tags["tskd.teacher_cached"] == "False"]
    assert len(trained) == 1
    builder = trained[0].data.tags["ray.node_id"]
    assert any(
        c.data.tags["ray.node_id"] != builder and c.data.tags["tskd.teacher_cached"] == "True"
        for c in children
    )
    # the default cache.dir moved under the shared storage, not into the client's working directory
    shared_cache = workdir / "shared" / "runs" / "cache" / "teacher"
    assert len([p for p in shared_cache.iterdir() if p.is_dir() and not p.name.startswith(".")]) == 1
    assert not (workdir / "client" / "runs" / "cache").exists()
    assert {Path(c.data.tags["tskd.teacher_adapter"]).parent for c in children} == {shared_cache}  # its entry


def test_study_outlives_the_driver_in_postgres(searched, postgres):
    import optuna

    study = optuna.load_study(study_name="lb", storage=f"{postgres}/optuna")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 4 and {"distill.temperature", "distill.kd_weight"} <= set(done[0].params)


def test_node_local_paths_and_local_mlflow_are_refused(ray_cluster, mlflow_server, workdir):
    space = space_yaml(workdir)
    env = client_env(ray_cluster, RAY_ADDRESS=ray_cluster["gcs"])
    local = tskd(
        "launch",
        space,
        "--address",
        "auto",
        "--tracking-uri",
        f"sqlite:///{workdir}/local.db",
        "--storage",
        workdir / "shared" / "runs",
        "--name",
        "local-mlflow",
        env=env,
        cwd=space.parent,
    )
    assert local.returncode == 2 and "Traceback" not in local.stderr
    assert local.stderr.strip().splitlines()[-1].startswith("error: tracking.uri: sqlite:///")
    if ray_cluster["nodelocal"] is None:
        pytest.skip(
            "no private mount namespace here (needs root and unshare): no node-local folder to refuse"
        )
    proc = tskd(
        "launch",
        space,
        "--address",
        "auto",
        "--tracking-uri",
        mlflow_server[0],
        "--storage",
        ray_cluster["nodelocal"] / "runs",
        env=env,
        cwd=space.parent,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --storage: {ray_cluster['nodelocal']}/runs is not shared: node ")


def test_search_submitted_as_a_ray_job(searched, ray_cluster, mlflow_server, workdir):
    uri, _ = mlflow_server
    space = space_yaml(workdir)
    dash = ray_cluster["dashboard"]
    journal = workdir / "shared" / "study.journal"
    # storage as a URI (what a bucket goes through: Ray Tune's storage_path, pyarrow copies); the cache
    # named explicitly, the one the first search filled
    bucket = f"file://{workdir}/shared/bucket"
    env = client_env(ray_cluster)  # no RAY_ADDRESS: the Jobs API is reached over HTTP with the token
    t0 = time.monotonic()
    proc = tskd(
        "launch",
        space,
        "--address",
        dash,
        "--tracking-uri",
        uri,
        "--storage",
        bucket,
        "--name",
        "viajob",
        "--num-samples",
        "2",
        "--set",
        f"search.study_storage={journal}",
        "--set",
        f"cache.dir={workdir}/shared/runs/cache",
        env=env,
        cwd=space.parent,
    )
    print(f"search as a Ray Job: {time.monotonic() - t0:.0f} s")
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    job_id = next(w for w in proc.stdout.split() if w.startswith("tskd-viajob-"))
    assert "cluster: 2 nodes" in proc.stdout and "best trial" in proc.stdout  # the job's log, streamed back
    assert f"Ray Job {job_id}: SUCCEEDED" in proc.stdout

    client = mlflow_client(uri)
    parent, children = children_of(client, "viajob")
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.info.status == "FINISHED" and c.data.tags["tskd.teacher_cached"] == "True" for c in children)
    summary = json.loads((workdir / "shared" / "bucket" / "viajob" / "summary.json").read_text())
    assert summary["trials"] == 2
    assert [p.name for p in (workdir / "shared" / "bucket" / "viajob").glob("*/outputs/student.safetensors")]
    by_uri = tskd("status", f"{bucket}/viajob", env=env, cwd=space.parent)  # fetched to a local copy
    assert by_uri.returncode == 0, by_uri.stderr
    assert "2 trial(s): 2 finished" in by_uri.stdout

    import optuna
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(
        study_name="viajob", storage=optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    )
    assert len(study.trials) == 2

    status = tskd("status", job_id, "--address", dash, env=env, cwd=space.parent)
    assert status.returncode == 0, status.stderr
    assert f"Ray Job {job_id}: SUCCEEDED" in status.stdout and "tskd-tune launch lb.yaml" in status.stdout
    assert_no_secret(client, [parent, *children], proc.stdout, proc.stderr, status.stdout)

    # without the token the dashboard answers 401: one line that says where the token is
    no_token = client_env(
        ray_cluster, RAY_AUTH_TOKEN_PATH=str(workdir / "missing"), HOME=str(workdir / "nohome")
    )
    no_token.pop("RAY_AUTH_MODE")  # a laptop that never ran Ray
    denied = tskd("status", job_id, "--address", dash, env=no_token, cwd=space.parent)
    assert denied.returncode == 2 and "Traceback" not in denied.stderr
    assert denied.stderr.strip().splitlines() == [
        f"error: --address: {dash} asks for a token (401) and none was found here; the token is in "
        "~/.ray/auth_token on the head node (or set RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH here)"
    ]
    detached = tskd(
        "launch", space, "--address", dash, "--storage", "runs", "--detach", env=env, cwd=space.parent
    )
    assert detached.returncode == 2
    assert detached.stderr.strip().startswith("error: --storage runs: a Ray Job runs in a temporary folder")


# ------------------------------------------------------------------------------------------ node loss
@pytest.fixture
def doomed_node(workdir, ray_cluster):
    """A third node joined to the cluster for one test, to be killed in it; yields (node id, the address Ray
    gives it, process group)."""
    env = ray_cluster["env"]
    agent = (
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "metrics-export-port",
        "runtime-env-agent-port",
    )
    cmd = [
        str(BIN / "ray"),
        "start",
        "--address",
        ray_cluster["gcs"],
        "--node-ip-address",
        "127.0.0.1",
        "--temp-dir",
        str(workdir / "rd"),
        "--resources",
        '{"doomed": 1}',
        "--num-cpus",
        "1",
        "--num-gpus",
        "0",
        "--object-store-memory",
        str(300 * 1024**2),
        "--disable-usage-stats",
        *[a for n in agent for a in (f"--{n}", str(free_port()))],
    ]
    with open(workdir / "ray-doomed.log", "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        assert proc.wait(timeout=180) == 0, (workdir / "ray-doomed.log").read_text()[-3000:]
        find = (
            "import ray; ray.init(address='%s', logging_level='ERROR'); "
            "n = next(n for n in ray.nodes() if n['Alive'] and 'doomed' in n['Resources']); "
            "print(n['NodeID'], n['NodeManagerAddress'])"
        )
        node, address = subprocess.run(
            [sys.executable, "-c", find % ray_cluster["gcs"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout.split()[-2:]
        yield node, address, proc.pid
    finally:
        kill_session(None, proc.pid)
        kill_leftovers(str(workdir / "rd"))


def test_a_lost_node_costs_one_line_and_its_trial_is_retried_elsewhere(
    ray_cluster, mlflow_server, workdir, doomed_node
):
    """The raylet of the node running a trial is killed mid-trial: the search goes on by itself, retries that
    trial from its last checkpoint on a surviving node, says so in one line, and ends with one finished child
    run per trial and no resume needed."""
    node, address, pgid = doomed_node
    uri, _ = mlflow_server
    space = space_yaml(workdir)
    raw = yaml.safe_load(space.read_text())
    raw["name"] = "nodeloss"
    raw["student"]["epochs"] = 12  # long enough to be killed mid-trial, after a checkpoint or two
    raw["search"] |= {"num_samples": 3, "max_concurrent": 3}  # three trials on three 1-CPU nodes: one each
    space.with_name("nodeloss.yaml").write_text(yaml.safe_dump(raw))
    env = client_env(ray_cluster, RAY_ADDRESS=ray_cluster["gcs"])
    out, err = workdir / "nodeloss.out", workdir / "nodeloss.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tskd_tune",
                "launch",
                space.with_name("nodeloss.yaml"),
                "--address",
                "auto",
                "--tracking-uri",
                uri,
                "--storage",
                workdir / "shared" / "runs",
            ],
            stdout=o,
            stderr=e,
            env=env,
            cwd=space.parent,
            start_new_session=True,
        )
    client = mlflow_client(uri)

    def on_doomed_node_with_a_checkpoint():
        if proc.poll() is not None:
            raise AssertionError(f"the search ended before the node was killed:\n{out.read_text()[-3000:]}")
        try:
            _, children = children_of(client, "nodeloss")
        except (StopIteration, AttributeError):  # the experiment or the parent run is not there yet
            return None
        for child in children:
            if child.data.tags.get("ray.node_id") == node and child.info.status == "RUNNING":
                history = client.get_metric_history(child.info.run_id, "val_dice")
                if len(history) >= 2:
                    return child
        return None

    try:
        victim = wait_for(
            "a trial on the doomed node past its second epoch",
            on_doomed_node_with_a_checkpoint,
            timeout=600,
            every=1,
        )
        os.killpg(pgid, signal.SIGKILL)  # the raylet, its workers, its object store: the node is gone
        kill_leftovers(str(workdir / "rd"))
        code = proc.wait(timeout=900)
    finally:
        kill_session(proc)
    stdout, stderr = out.read_text(), err.read_text()
    assert code == 0, stdout[-3000:] + stderr[-5000:]
    lost = [line for line in stdout.splitlines() if " lost; " in line]
    said = rf"node {re.escape(address)} lost; t\d+ retried from epoch (?:[2-9]|[1-9]\d+)"
    log = workdir / "shared" / "runs" / "nodeloss" / "driver.log"
    assert len(lost) == 1 and re.fullmatch(said, lost[0]), (
        stdout[-5000:] + stderr[-3000:] + log.read_text()[-5000:]
    )
    noise = [w for w in ("[state-dump]", "Traceback") if w in stdout + stderr]
    assert not noise, stdout[-3000:] + stderr[-3000:]
    _, children = children_of(client, "nodeloss")
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    retried = next(c for c in children if c.info.run_id == victim.info.run_id)
    assert retried.data.tags["ray.node_id"] != node and retried.data.tags["resumed"] == "True"
    # no epoch lost or counted twice
    assert len(client.get_metric_history(retried.info.run_id, "val_dice")) == 12
    summary = json.loads((workdir / "shared" / "runs" / "nodeloss" / "summary.json").read_text())
    assert summary["trials"] == 3 and summary.get("failed", 0) == 0


# ---------------------------------------------------------------------------------- MLflow restart
def test_mlflow_server_killed_and_restarted_mid_search_loses_and_duplicates_nothing(
    ray_cluster, mlflow_proc, workdir
):
    """The team's MLflow server (PostgreSQL behind it) is killed while trials train and comes back 15 s later:
    the trials train on, their writes wait in the journal and reach the server once it is back, with no
    command. In the end every trial has one run, every epoch once, and the search's own run is complete."""
    uri = mlflow_proc.uri
    raw = yaml.safe_load(space_yaml(workdir).read_text())
    raw["name"], raw["student"]["epochs"] = "restart", 10
    raw["search"] |= {"num_samples": 3, "max_concurrent": 2}
    space = workdir / "client" / "restart.yaml"
    space.write_text(yaml.safe_dump(raw))
    env = client_env(ray_cluster, RAY_ADDRESS=ray_cluster["gcs"])
    out, err = workdir / "restart.out", workdir / "restart.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tskd_tune",
                "launch",
                space,
                "--address",
                "auto",
                "--tracking-uri",
                uri,
                "--storage",
                workdir / "shared" / "runs",
            ],
            stdout=o,
            stderr=e,
            env=env,
            cwd=space.parent,
            start_new_session=True,
        )
    client = mlflow_client(uri)

    def training():
        assert proc.poll() is None, out.read_text()[-3000:] + err.read_text()[-3000:]
        try:
            _, children = children_of(client, "restart")
        except (StopIteration, AttributeError):
            return False
        return any(len(client.get_metric_history(c.info.run_id, "val_dice")) >= 2 for c in children)

    try:
        wait_for("a trial past its second epoch", training, timeout=600, every=1)
        mlflow_proc.kill()
        time.sleep(15)  # trials write on: into their journals
        mlflow_proc.start()
        code = proc.wait(timeout=900)
    finally:
        kill_session(proc)
    stdout, stderr = out.read_text(), err.read_text()
    assert code == 0, stdout[-3000:] + stderr[-5000:]
    assert "Traceback" not in stdout + stderr, stdout[-3000:] + stderr[-3000:]
    search = workdir / "shared" / "runs" / "restart"
    if list((search / "mlflow_journal").glob("*.jsonl")):  # what the search could not deliver before it ended
        synced = tskd("sync", search, env=env, cwd=space.parent)
        assert synced.returncode == 0, synced.stderr
    assert not list((search / "mlflow_journal").glob("*.jsonl"))
    parent, children = children_of(client, "restart")
    assert parent.info.status == "FINISHED" and "best_val_dice" in parent.data.metrics
    assert (
        len(children) == 3 and len({c.data.tags["ray.trial_id"] for c in children}) == 3
    )  # one run per trial
    for child in children:
        assert child.info.status == "FINISHED" and child.data.tags["tskd.status"] == "finished"
        for metric in ("val_dice", "train_loss"):
            steps = [m.step for m in client.get_metric_history(child.info.run_id, metric)]
            assert steps == list(range(1, 11)), (metric, steps)  # every epoch once: none lost, none twice
        assert {"config.yaml", "trial_summary.json"} <= {
            a.path for a in client.list_artifacts(child.info.run_id)
        }
