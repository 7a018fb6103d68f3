"""tskd_tune.cluster without a cluster: addresses, credentials, Ray tokens, study storage, one-line errors.

The real two-node cluster, MLflow server and Jobs API are exercised in tests/cluster/ (marker `cluster`).
"""

from __future__ import annotations

import pickle

import pytest
import yaml

from tests.conftest import free_port
from tskd_tune import cluster
from tskd_tune.errors import TskdError


@pytest.fixture
def cli(capsys, monkeypatch, tmp_path):
    """Run the real CLI in this process (no interpreter start-up); returns (exit code, stdout, stderr)."""
    from tskd_tune.cli import main

    monkeypatch.chdir(tmp_path)

    def run(*args):
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def one_line(result) -> str:
    code, out, err = result
    assert code == 2 and "Traceback" not in err, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def space(tmp_path):
    from tests.conftest import tiny_raw

    raw = tiny_raw(tmp_path)
    raw["search"]["space"] = {"distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_addresses_and_buckets():
    assert cluster.is_job_address("http://head:8265") and cluster.is_job_address("HTTPS://head:8265")
    assert not any(cluster.is_job_address(a) for a in (None, "auto", "ray://head:10001", "10.0.0.1:6379"))
    assert cluster.is_bucket("s3://b/runs") and cluster.is_bucket("gs://b/runs")
    assert not cluster.is_bucket("/mnt/shared/runs") and not cluster.is_bucket("file:///tmp/x")


def test_mask_uri_hides_only_the_password():
    assert cluster.mask_uri("http://alice:s3cret@mlflow:5000/x") == "http://alice:***@mlflow:5000/x"
    assert cluster.mask_uri("postgresql+psycopg2://u:pw@db/optuna") == "postgresql+psycopg2://u:***@db/optuna"
    for plain in ("http://mlflow:5000", "sqlite:///runs/mlflow.db", "/mnt/shared/study.journal", ""):
        assert cluster.mask_uri(plain) == plain


def test_password_in_tracking_uri_is_refused_without_echoing_it(cli, space, tmp_path):
    result = cli(
        "launch", space, "--tracking-uri", "http://alice:hunter2@127.0.0.1:9/", "--storage", tmp_path / "r"
    )
    line = one_line(result)
    assert line.startswith("error: tracking.uri: http://alice:***@127.0.0.1:9/ holds a password")
    assert "MLFLOW_TRACKING_PASSWORD" in line and "hunter2" not in result[1] + result[2]
    assert not (tmp_path / "r").exists()
    with pytest.raises(TskdError, match=r"search.study_storage: postgresql://u:\*\*\*@db/x holds a password"):
        cluster.refuse_embedded_password("postgresql://u:pw@db/x", "search.study_storage", "use PGPASSWORD")


def test_mlflow_env_carries_settings_and_secret_values_are_known(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter2")
    monkeypatch.setenv("MLFLOW_TRACKING_INSECURE_TLS", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN", raising=False)
    monkeypatch.setenv("UNRELATED", "x")
    assert cluster.mlflow_env() == {
        "MLFLOW_TRACKING_USERNAME": "alice",
        "MLFLOW_TRACKING_PASSWORD": "hunter2",
        "MLFLOW_TRACKING_INSECURE_TLS": "true",
    }
    assert sorted(cluster.secret_values()) == ["alice", "hunter2"]


def test_ray_token_is_found_where_ray_looks(monkeypatch, tmp_path):
    home = tmp_path / "home"
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "tok").write_text("from-path")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert cluster.ray_token() == "from-home"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "tok"))
    assert cluster.ray_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert cluster.ray_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    assert cluster.ray_token() is None


def test_job_flags_fail_in_one_line(cli, space):
    detach = one_line(cli("launch", space, "--detach"))
    assert detach.startswith("error: --detach: only with --address http(s)://")
    relative = one_line(cli("launch", space, "--address", "http://127.0.0.1:9", "--storage", "runs"))
    assert relative.startswith("error: --storage runs: a Ray Job runs in a temporary folder on the cluster")
    status = one_line(cli("status", "some-job", "--address", "auto"))
    assert status.startswith("error: --address auto: status reads Ray Jobs through the dashboard")


def test_unreachable_jobs_api_is_one_line(cli, space, tmp_path):
    port = free_port()  # a port nobody listens on
    proc = cli("launch", space, "--address", f"http://127.0.0.1:{port}", "--storage", tmp_path / "r")
    assert (
        one_line(proc) == f"error: --address: cannot reach the Ray Jobs API at http://127.0.0.1:{port} "
        f"(Failed to connect to Ray at address: http://127.0.0.1:{port}.)"
    )


def test_study_storage_journal_and_rdb(tmp, tiny):
    import optuna
    from optuna.storages import JournalStorage, RDBStorage

    from tskd_tune.search import study_storage

    journal = tmp / "shared" / "study.journal"
    cfg = tiny(search={"study_storage": str(journal)})
    storage = study_storage(cfg, "s1", fresh=True)
    assert isinstance(storage, JournalStorage) and journal.parent.is_dir()
    optuna.create_study(study_name="s1", storage=storage).optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=2
    )
    with pytest.raises(TskdError, match="already holds a study named 's1'; pick another --name"):
        study_storage(cfg, "s1", fresh=True)
    again = pickle.loads(pickle.dumps(study_storage(cfg, "s1", fresh=False)))  # Tune pickles the searcher
    assert len(optuna.load_study(study_name="s1", storage=again).trials) == 2

    rdb = tiny(search={"study_storage": f"sqlite:///{tmp}/optuna.db"})
    assert isinstance(study_storage(rdb, "s2", fresh=True), RDBStorage)
    bad = tiny(search={"study_storage": "nosuchdialect://x/y"})
    with pytest.raises(TskdError, match=r"^search.study_storage: cannot use nosuchdialect://x/y: "):
        study_storage(bad, "s3", fresh=True)


@pytest.fixture
def tmp(tmp_path):
    return tmp_path


def test_uri_storage_round_trip(tmp_path, monkeypatch):
    """pull/push through pyarrow (file:// here, s3:// or gs:// on a cluster); checkpoints stay remote."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    remote = tmp_path / "bucket" / "s1"
    (remote / "trial_a" / "checkpoint_000001").mkdir(parents=True)
    (remote / "trial_a" / "checkpoint_000001" / "state.pt").write_bytes(b"big")
    (remote / "trial_a" / "result.json").write_text('{"val_dice": 0.5}\n')
    (remote / "search.json").write_text("{}")
    location = f"file://{remote}"
    local = cluster.local_copy(location)
    assert local == tmp_path / "xdg" / "tskd-tune" / "storage" / "file" / str(remote).strip("/")
    assert cluster.pull(location, local, only=("search.json", "tuner.pkl"))
    assert sorted(p.name for p in local.rglob("*") if p.is_file()) == ["search.json"]
    assert cluster.pull(location, local)
    assert (local / "trial_a" / "result.json").read_text() == '{"val_dice": 0.5}\n'
    assert not (local / "trial_a" / "checkpoint_000001").exists()
    (local / "summary.json").write_text('{"trials": 1}')
    cluster.push(local, location, ["summary.json", "missing.csv"])
    assert (remote / "summary.json").read_text() == '{"trials": 1}' and not (remote / "missing.csv").exists()
    assert not cluster.pull(f"file://{tmp_path}/nothing", tmp_path / "x")
    assert cluster.storage_dir(location) == remote and cluster.storage_dir("gs://b/runs") is None
    with pytest.raises(
        TskdError, match=r"^--storage: ftp://x/y: expected a folder, file:///PATH or a bucket URI"
    ):
        cluster.check_storage("ftp://x/y")


def test_a_job_says_every_launch_option_again_on_the_cluster():
    """`launch --address http://...` re-creates the command line for the job's driver: every option of
    `launch` (but where to submit) has a JobLaunch field, and its argv parses back to the same values."""
    import dataclasses
    import inspect

    import typer

    from tskd_tune.cli.app import app
    from tskd_tune.cli.search import launch

    client_only = {"address", "detach"}  # this machine's business: the job's driver joins its own cluster
    fields = {f.name for f in dataclasses.fields(cluster.JobLaunch)}
    assert set(inspect.signature(launch).parameters) - client_only == fields
    job = cluster.JobLaunch(
        "s.yaml",
        "n1",
        "/mnt/shared/runs",
        "http://mlflow:5000",
        12,
        3,
        True,
        True,
        ("earlier", "/mnt/shared/runs/other"),
        ("seed=3", "student.lr=0.001"),
    )
    argv = job.to_argv()
    assert argv[:2] == ["tskd-tune", "launch"]
    command = typer.main.get_command(app).commands["launch"]
    params = command.make_context("launch", argv[2:]).params
    assert params.pop("address") == "auto" and params.pop("detach") is False
    parsed = {k: tuple(v) if isinstance(v, list) else v for k, v in params.items()} | {
        "space": str(params["space"])
    }
    assert parsed == dataclasses.asdict(job)
    bare = cluster.JobLaunch("s.yaml", "n1", "/mnt/shared/runs").to_argv()
    assert bare == [
        "tskd-tune",
        "launch",
        "s.yaml",
        "--address",
        "auto",
        "--name",
        "n1",
        "--storage",
        "/mnt/shared/runs",
    ]


def test_what_trials_know_of_the_search_is_typed_and_hides_credentials(tmp_path):
    """SearchRun crosses into every Ray trial (through the object store): a typed, picklable value whose repr,
    as a traceback or log would show it, leaves out the MLflow credentials it carries."""
    import dataclasses

    from tskd_tune.search.folder import SearchRun

    run = SearchRun("http://mlflow:5000", "p" * 32, tmp_path, 1.0, {"MLFLOW_TRACKING_PASSWORD": "hunter2"})
    assert "hunter2" not in repr(run) and pickle.loads(pickle.dumps(run)) == run
    student = dataclasses.replace(run, stage="student", teachers={"a": {"teacher.lr": 1e-3}})
    assert (student.stage, run.stage, student.mlflow_env) == ("student", None, run.mlflow_env)
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.stage = "teacher"
