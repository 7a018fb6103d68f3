"""Faults injected into small real searches (`tskd-tune launch` on a local Ray, MLflow on SQLite or a
real `mlflow server`): killed workers and drivers, NaN / CUDA OOM / full disk, hangs, MLflow outages,
corrupt caches. Run with `make test-faults` (minutes)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.conftest import free_port, tiny_raw, wait_for

pytestmark = pytest.mark.faults

REPO = Path(__file__).resolve().parents[1]
SPACE = {"distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0}}


# ------------------------------------------------------------------------------------------ helpers
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache for the module: data and teacher are built by the first search, reused by the next."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def procs():
    """Processes a test started (each in its own session); whatever is left is killed at the end."""
    started: list[subprocess.Popen] = []
    yield started
    for p in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)


def write_space(folder: Path, cache: Path, uri: str, *, samples: int, concurrent: int, **search) -> Path:
    raw = tiny_raw(folder, student={"epochs": 3}, teacher={"epochs": 2}, resources={"threads": 1})
    raw["cache"] = {"dir": str(cache)}
    raw["tracking"] = {"uri": uri, "experiment": "faults"}
    # no reference trials unless asked: these tests count the trials' runs
    raw["search"] = {
        "num_samples": samples,
        "max_concurrent": concurrent,
        "scheduler": "fifo",
        "grace_period": 1,
        "space": SPACE,
        "baselines": [],
        **search,
    }
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def fault_env(folder: Path, *specs: dict) -> dict:
    """The environment of a search whose trials meet ``specs`` (see tskd_tune/faults.py)."""
    return os.environ | {
        "TSKD_FAULT_INJECT": json.dumps(list(specs)),
        "TSKD_FAULT_STATE": str(folder / "faults"),
    }


def cli(*args, cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tskd_tune", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=timeout,
    )


def start(procs: list, *args, cwd: Path, env: dict | None = None, log: str = "driver") -> subprocess.Popen:
    out = open(cwd / f"{log}.log", "w")  # noqa: SIM115 - closed with the process
    p = subprocess.Popen(
        [sys.executable, "-m", "tskd_tune", *map(str, args)],
        cwd=cwd,
        env=env,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    procs.append(p)
    return p


def results(search: Path) -> dict[str, list[dict]]:
    """Ray's result.json of every trial folder: trial id -> reported results (epoch, pid, ...)."""
    out = {}
    for f in search.glob("t[0-9]*_*/result.json"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip().endswith("}")]
        if rows:
            out[rows[0]["trial_id"]] = rows
    return out


def epochs_of(search: Path, at_least: int) -> list[str]:
    """Trials that reported epoch ``at_least`` or later."""
    return [t for t, rows in results(search).items() if max(r["epoch"] for r in rows) >= at_least]


def runs(uri: str, name: str):
    """(client, the search's parent run, its children by ray.trial_id)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("faults")
    every = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in every if r.info.run_name == name and "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, f"{len(parents)} parent runs named {name}"  # resume reuses the parent
    parent = parents[0]
    kids = [r for r in every if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    by_trial = {r.data.tags["ray.trial_id"]: r for r in kids}
    assert len(by_trial) == len(kids), "two child runs for one trial"
    return client, parent, by_trial


def steps(client, run, metric: str = "val_dice") -> list[int]:
    return [m.step for m in client.get_metric_history(run.info.run_id, metric)]


def optuna_states(search: Path) -> dict[str, str]:
    """What the searcher was told about each trial (Ray trial id -> Optuna state), from its saved state."""
    state = pickle.loads(max(search.glob("searcher-state-*.pkl")).read_bytes())
    study = state["_ot_study"]
    return {tid: study.trials[t.number].state.name for tid, t in state["_ot_trials"].items()}


# --------------------------------------------------------------- NaN, CUDA OOM, full disk (raising)
def test_failing_trials_are_recorded_with_the_reason_and_told_to_optuna_as_failed(tmp_path, cache):
    """Three of four trials fail at epoch 2 (NaN loss, CUDA OOM, disk full mid-checkpoint): the search
    goes on, each failure is in MLflow with its reason, Optuna is told FAIL (no made-up score), and the
    deterministic failures are not retried."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = write_space(tmp_path, cache, uri, samples=4, concurrent=2)
    faults = ({"fault": f, "phase": "student", "epoch": 2, "once": True} for f in ("nan", "oom", "enospc"))
    env = fault_env(tmp_path, *faults)
    t0 = time.monotonic()
    proc = cli("launch", space, "--storage", tmp_path / "runs", "--name", "fail", cwd=tmp_path, env=env)
    wall = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    search = tmp_path / "runs" / "fail"
    assert json.loads((search / "summary.json").read_text())["errored"] == 3

    client, parent, kids = runs(uri, "fail")
    assert parent.info.status == "FINISHED" and "best_val_dice" in parent.data.metrics
    assert sorted(r.info.status for r in kids.values()) == ["FAILED", "FAILED", "FAILED", "FINISHED"]
    errors = sorted(r.data.tags["tskd.error"] for r in kids.values() if r.info.status == "FAILED")
    assert errors[0].startswith("OutOfMemoryError: CUDA out of memory"), errors
    assert errors[1].startswith("StorageError: ") and "No space left on device" in errors[1], errors
    assert "previous state.safetensors is kept" in errors[1]
    assert errors[2].startswith("TrialFailed: student: loss became nan at epoch 2"), errors
    for run in kids.values():
        if run.info.status == "FAILED":
            assert run.data.tags["tskd.status"] == "failed"
            assert steps(client, run) == [1]  # epoch 2 never reached MLflow, nor the searcher
            assert run.data.tags["resumed"] == "False"  # the retries stopped before reopening the run
        else:
            assert steps(client, run) == [1, 2, 3]

    told = optuna_states(search)
    assert sorted(told.values()) == ["COMPLETE", "FAIL", "FAIL", "FAIL"]
    assert all(told[t] == ("COMPLETE" if r.info.status == "FINISHED" else "FAIL") for t, r in kids.items())
    board = (search / "leaderboard.csv").read_text()
    assert board.count(",failed,") == 3 and board.count(",finished,") == 1
    # the disk-full trial's last good checkpoint is what Ray holds for it: epoch 1, whole
    disk = next(t for t, r in kids.items() if r.data.tags.get("tskd.error", "").startswith("StorageError"))
    trial_dir = next(search.glob(f"t*_{disk}"))
    from tskd_tune.train import load_checkpoint

    assert load_checkpoint(next(trial_dir.glob("checkpoint_*")))["epoch"] == 1
    errors_txt = (trial_dir / "error.txt").read_text()
    assert "not retried" in errors_txt  # its retries failed at once, from the failure record
    print(f"\nfailing-trials search: {wall:.0f} s")


# ------------------------------------------------------------------------- worker SIGKILL, a hang
def test_killed_worker_resumes_from_its_checkpoint_and_a_hung_trial_is_stopped(tmp_path, cache, procs):
    """Trial 1's worker is SIGKILLed during epoch 2: Ray retries it from the epoch-1 checkpoint, it ends
    with 3 epochs and its one MLflow run is continued. Trial 2 hangs in epoch 2: after
    search.trial_timeout_s without progress it is stopped and marked timeout."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = write_space(tmp_path, cache, uri, samples=2, concurrent=1, trial_timeout_s=30)
    env = fault_env(
        tmp_path,
        {"fault": "sleep", "seconds": 15, "phase": "student", "epoch": 2, "once": True},
        {"fault": "sleep", "seconds": 3600, "phase": "student", "epoch": 2, "once": True},
    )
    search = tmp_path / "runs" / "kill"
    t0 = time.monotonic()
    driver = start(
        procs, "launch", space, "--storage", tmp_path / "runs", "--name", "kill", cwd=tmp_path, env=env
    )
    first = wait_for("trial 1 at epoch 1", lambda: epochs_of(search, 1), timeout=900)[0]
    pid = results(search)[first][-1]["pid"]
    os.kill(pid, signal.SIGKILL)  # in its 15 s sleep at the start of epoch 2
    assert driver.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-4000:]
    wall = time.monotonic() - t0
    said = (tmp_path / "driver.log").read_text()
    # one line for the retry; Ray's traceback of the dead worker went to the search's own log
    notice = rf"^t\d{{3}}: its worker process on \S+ died; retried from epoch 1 \(details: {re.escape(str(search))}/driver.log\)$"
    assert len(re.findall(notice, said, re.M)) == 1, said[-3000:]  # the killed worker's; the hung one raised
    failed = r"^t\d{3} .*failed: TrialFailed: no progress for \d+ s \(search.trial_timeout_s: 30\)"
    assert len(re.findall(failed, said, re.M)) == 1 and "Restored on" not in said, said[-3000:]
    assert "Traceback" not in said and "Trial task failed" in (search / "driver.log").read_text()

    client, parent, kids = runs(uri, "kill")
    assert parent.info.status == "FINISHED" and len(kids) == 2
    rows = results(search)[first]
    assert [r["epoch"] for r in rows] == [1, 2, 3]  # epoch 1 was not run again: resumed from its checkpoint
    assert rows[0]["pid"] == pid and rows[1]["pid"] != pid  # epochs 2 and 3 ran in the retry's worker
    killed = kids[first]
    assert killed.info.status == "FINISHED" and killed.data.tags["tskd.status"] == "finished"
    assert killed.data.tags["resumed"] == "True" and steps(client, killed) == [1, 2, 3]
    assert "student_params" in killed.data.metrics

    hung_id = next(t for t in kids if t != first)
    hung = kids[hung_id]
    assert hung.info.status == "KILLED" and hung.data.tags["tskd.status"] == "timed_out"
    assert "search.trial_timeout_s: 30" in hung.data.tags["tskd.error"]
    assert steps(client, hung) == [1]
    assert optuna_states(search)[hung_id] == "FAIL"
    assert ",timed_out," in (search / "leaderboard.csv").read_text()
    assert wall < 600  # the hang cost its timeout, not its hour
    print(f"\nkilled-worker + hang search: {wall:.0f} s")


# ------------------------------------------------------------------------------- driver SIGKILL
def test_search_whose_driver_was_killed_is_resumed_without_loss_or_duplicates(tmp_path, cache, procs):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = write_space(tmp_path, cache, uri, samples=2, concurrent=2)
    env = fault_env(tmp_path, {"fault": "sleep", "seconds": 3, "phase": "student"})  # slow epochs
    search = tmp_path / "runs" / "crash"
    t0 = time.monotonic()
    driver = start(
        procs, "launch", space, "--storage", tmp_path / "runs", "--name", "crash", cwd=tmp_path, env=env
    )
    wait_for("both trials at epoch 1", lambda: len(epochs_of(search, 1)) == 2, timeout=900)
    workers = {rows[-1]["pid"] for rows in results(search).values()}
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)

    def alive(pid):
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    # the local Ray instance shares the driver's fate: no orphaned worker keeps writing
    wait_for("the trial workers to exit", lambda: not any(alive(p) for p in workers), timeout=120)
    _, parent, kids = runs(uri, "crash")
    assert parent.info.status == "RUNNING" and len(kids) == 2
    resumed = cli("resume", search, cwd=tmp_path, env=env)
    wall = time.monotonic() - t0
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    client, parent, kids = runs(uri, "crash")  # asserts one parent (reused) and one child per trial
    final = results(search)
    assert set(kids) == set(final) and len(final) == 2
    assert parent.info.status == "FINISHED" and "best_val_dice" in parent.data.metrics
    for tid, run in kids.items():
        assert run.info.status == "FINISHED", (tid, run.info.status)
        assert steps(client, run) == [1, 2, 3]  # no epoch lost, none logged twice
        assert final[tid][-1]["epoch"] == 3
    board = (search / "leaderboard.csv").read_text()
    assert board.count(",finished,") == 2
    print(f"\ndriver-kill + resume: {wall:.0f} s")


def test_a_trial_proposed_but_never_recorded_is_proposed_again_on_resume(tmp_path, cache, procs):
    """A driver killed between a proposal and the next save of the experiment (the start of a stage) leaves
    Tune's searcher state counting a trial, holding a concurrency slot and an Optuna trial for it, that the
    experiment state never recorded. That state is made here from a real interrupted search (the race itself
    is a matter of milliseconds); `resume` must run exactly the trials asked for: none lost, none twice."""
    import optuna

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    study = f"sqlite:///{tmp_path}/optuna.db"
    space = write_space(tmp_path, cache, uri, samples=3, concurrent=1, study_storage=study)
    env = fault_env(tmp_path, {"fault": "sleep", "seconds": 2, "phase": "student"})
    search = tmp_path / "runs" / "lost"
    driver = start(
        procs, "launch", space, "--storage", tmp_path / "runs", "--name", "lost", cwd=tmp_path, env=env
    )
    wait_for("the first trial to report", lambda: len(results(search)) == 1, timeout=900)
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    # what the race leaves: a proposal the searcher state holds and the experiment state lacks
    (gen_file,) = search.glob("search_gen_state-*.json")
    gen = pickle.loads(gen_file.read_bytes())
    gen["counter"] += 1
    gen["name:ConcurrencyLimiter"]["live_trials"].add("phantom1")
    gen_file.write_bytes(pickle.dumps(gen))
    (searcher_file,) = search.glob("searcher-state-*.pkl")
    searcher = pickle.loads(searcher_file.read_bytes())
    searcher["_ot_trials"]["phantom1"] = searcher["_ot_study"].ask()
    searcher_file.write_bytes(pickle.dumps(searcher))
    resumed = cli("resume", search, cwd=tmp_path, env=env, timeout=600)  # unreconciled, it never ends
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resume: 1 trial(s) proposed just before the driver stopped were never recorded" in resumed.stdout
    final = results(search)
    assert len(final) == 3 and all(rows[-1]["epoch"] == 3 for rows in final.values())
    _, parent, kids = runs(uri, "lost")
    assert set(kids) == set(final) and parent.info.status == "FINISHED"
    states = sorted(t.state.name for t in optuna.load_study(study_name="lost", storage=study).trials)
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "FAIL"]  # the phantom ends FAIL, not RUNNING


def test_a_staged_search_killed_after_its_teacher_stage_resumes_with_its_students(tmp_path, cache, procs):
    """Teachers first (judged per teacher epoch), then students of the best one: the driver is killed once
    the teacher stage has chosen; `resume` runs the student stage without fine-tuning any teacher again."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = write_space(
        tmp_path,
        cache,
        uri,
        samples=2,
        concurrent=2,
        strategy="staged",
        teacher_trials=2,
        top_teachers=1,
        space=SPACE | {"teacher.lr": {"type": "choice", "values": [0.001, 0.003]}},
    )
    env = fault_env(tmp_path, {"fault": "sleep", "seconds": 2, "phase": "student"})  # slow student epochs
    search = tmp_path / "runs" / "staged"
    driver = start(
        procs, "launch", space, "--storage", tmp_path / "runs", "--name", "staged", cwd=tmp_path, env=env
    )
    wait_for("the teacher stage to choose", lambda: (search / "teachers.json").is_file(), timeout=900)
    # killed once both students have reported: a kill at the very start of a stage can leave Ray Tune's
    # searcher state counting a trial its experiment state never recorded, which a restore does not run
    wait_for(
        "both students to report",
        lambda: len([p for p in search.glob("t0*_*/result.json") if p.stat().st_size]) == 2,
        timeout=900,
    )
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait(timeout=60)
    teachers = json.loads((search / "teachers.json").read_text())["teachers"]
    assert len(teachers) == 1 and len(results(search / "teacher_stage")) == 2
    resumed = cli("resume", search, cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (
        "teacher stage:" not in resumed.stdout
        and "student stage: distilling the best 1 teacher(s)" in resumed.stdout
    )
    students = [json.loads(p.read_text()) for p in search.glob("t*_*/outputs/metrics.json")]
    assert len(students) == 2 and all(
        m["teacher_cached"] is True for m in students
    )  # no teacher trained twice
    client, parent, kids = runs(uri, "staged")
    stages = sorted(r.data.tags.get("tskd.stage") for r in kids.values())
    assert stages == ["student", "student", "teacher", "teacher"] and parent.info.status == "FINISHED"
    board = (search / "leaderboard.csv").read_text()
    assert board.count(",finished,") == 2 and list(teachers)[0] in board  # the choice is a searched value


def test_a_spent_time_budget_ends_the_search_with_its_results(tmp_path, cache):
    """search.time_budget_s: no trial after the budget, and the search still writes what it found."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = write_space(tmp_path, cache, uri, samples=8, concurrent=2, time_budget_s=90)
    # 11 s more per student epoch: a trial takes over 33 s however fast the machine, so at concurrency 2 a
    # fourth pair of trials cannot start within the 90 s budget
    env = fault_env(tmp_path, {"fault": "sleep", "seconds": 11, "phase": "student"})
    t0 = time.monotonic()
    done = cli("launch", space, "--storage", tmp_path / "runs", "--name", "budget", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    search = tmp_path / "runs" / "budget"
    summary = json.loads((search / "summary.json").read_text())
    assert summary["trials"] < 8 and (search / "leaderboard.csv").is_file()
    assert (search / "best.yaml").is_file() and "test_dice" in summary  # a finished trial is the best, tested
    print(f"\nbudget 90 s: {summary['trials']} trial(s) in {time.monotonic() - t0:.0f} s")


# -------------------------------------------------------------------------------- MLflow outage
class MlflowServer:
    """A real `mlflow server` on SQLite, on a free port, that the test can stop and start again."""

    def __init__(self, folder: Path, procs: list):
        self.port = free_port()
        self.folder, self.procs, self.proc = folder, procs, None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.folder}/server.db",
            "--artifacts-destination",
            str(self.folder / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        log = open(self.folder / "mlflow-server.log", "a")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(self.proc)
        wait_for("mlflow server", self.up, timeout=300, every=1)

    def up(self) -> bool:
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=60)
        wait_for("mlflow server to stop", lambda: not self.up(), timeout=60)


def test_mlflow_outage_mid_search_loses_no_write(tmp_path, cache, procs):
    """The MLflow server stops while trial 1 trains: it trains on, its writes wait in the journal and
    reach MLflow once the server is back, without any command. The server stops again while trial 2
    trains and stays down until the search has ended: `tskd-tune sync` then delivers the rest. In the
    end MLflow holds every epoch of every trial once, the params, tags, artifacts and final statuses."""
    server = MlflowServer(tmp_path, procs)
    server.start()
    space = write_space(tmp_path, cache, server.uri, samples=2, concurrent=1)
    gates = [tmp_path / "gate-1", tmp_path / "gate-2"]
    # each trial waits at the start of epoch 3 until its gate opens (the server may take a while to
    # restart); every other epoch starts with a 6 s sleep, so the test can stop the server in time
    waits = ({"fault": "sleep", "until": str(g), "phase": "student", "epoch": 3, "once": True} for g in gates)
    env = fault_env(tmp_path, *waits, {"fault": "sleep", "seconds": 6, "phase": "student"})
    search = tmp_path / "runs" / "outage"
    t0 = time.monotonic()
    driver = start(
        procs, "launch", space, "--storage", tmp_path / "runs", "--name", "outage", cwd=tmp_path, env=env
    )
    first = wait_for("trial 1 at epoch 1", lambda: epochs_of(search, 1), timeout=900)[0]
    server.stop()
    wait_for("trial 1 to train on while MLflow is down", lambda: first in epochs_of(search, 2), timeout=300)
    journal = search / "mlflow_journal" / f"{first}.jsonl"
    assert '"step": 2,' in journal.read_text()  # epoch 2's metrics wait in the journal
    server.start()
    gates[0].touch()

    def delivered(trial: str, epochs: list[int]):
        _, _, kids = runs(server.uri, "outage")
        return trial in kids and steps(MlflowClient(server.uri), kids[trial]) == epochs

    wait_for("the journaled epochs to reach MLflow", lambda: delivered(first, [1, 2, 3]), timeout=300)
    second = wait_for(
        "trial 2 at epoch 2", lambda: [t for t in epochs_of(search, 2) if t != first], timeout=600
    )[0]
    server.stop()  # down again, until the search is over
    gates[1].touch()
    assert driver.wait(timeout=900) == 0, (tmp_path / "driver.log").read_text()[-4000:]
    log = (tmp_path / "driver.log").read_text()
    assert "write(s) are kept in" in log and "tskd-tune sync" in log
    assert (search / "mlflow_journal" / f"{second}.jsonl").is_file()
    server.start()
    synced = cli("sync", search, cwd=tmp_path)
    wall = time.monotonic() - t0
    assert synced.returncode == 0, synced.stderr
    assert synced.stdout.startswith("delivered ") and not list((search / "mlflow_journal").glob("*.jsonl"))

    client, parent, kids = runs(server.uri, "outage")
    assert parent.info.status == "FINISHED" and "best_val_dice" in parent.data.metrics
    assert {"leaderboard.csv", "best.yaml"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert set(kids) == {first, second}
    for run in kids.values():
        assert run.info.status == "FINISHED" and run.data.tags["tskd.status"] == "finished"
        assert steps(client, run) == [1, 2, 3] and steps(client, run, "train_loss") == [1, 2, 3]
        assert "distill.temperature" in run.data.params and "student_params" in run.data.metrics
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "trial_summary.json", "student.safetensors"} <= artifacts
    print(f"\nMLflow outage search: {wall:.0f} s")
