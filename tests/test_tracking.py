"""MLflow records that survive an outage: the journal of a RunTracker, its replay, `tskd-tune sync`.

The store is a real SQLite MLflow store; "MLflow down" is a real HTTP address nobody listens on
(connection refused). The outage of a real `mlflow server` during a search is in test_search_faults.py.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import free_port
from tskd_tune import tracking
from tskd_tune.config import TrackingConfig


@pytest.fixture
def store(tmp_path):
    """A real SQLite store holding a search's parent run: (uri, client, parent run id)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("x")
    return uri, client, client.create_run(exp, run_name="search").info.run_id


def _child(client, parent):
    runs = client.search_runs(
        [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
    )
    assert len(runs) == 1, [r.info.run_name for r in runs]
    return runs[0]


def test_writes_while_mlflow_is_down_are_journaled_in_order_and_replayed(store, tmp_path):
    uri, client, parent = store
    down = f"http://127.0.0.1:{free_port()}"
    search = tmp_path / "search"
    journal = tracking.journal_path(search, "t1")
    t = tracking.RunTracker(down, journal=journal, parent_run_id=parent, trial_id="t1", run_name="trial-1")
    assert t.start() is False and t.run_id is None  # the trial trains on without a run id
    t.log_params({"distill.temperature": 2.0})
    for epoch in (1, 2):
        t.log_metrics({"epoch": epoch, "val_dice": 0.1 * epoch, "val_hd95": float("nan")}, step=epoch)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    t.log_artifact(tmp_path / "config.yaml")
    t.set_tags({"tskd.status": "finished"})
    t.finish("FINISHED")
    # the driver's finalizer writes behind the trial's queued writes: it must not overtake them
    tracking.RunTracker(down, journal=journal, parent_run_id=parent, trial_id="t1").finalize(
        "KILLED", {"tskd.status": "stopped_early"}
    )
    ops = [json.loads(line)["op"] for line in journal.read_text().splitlines()[1:]]
    assert ops == ["start", "params", "metrics", "metrics", "artifact", "tags", "finish", "finalize"]
    (tmp_path / "config.yaml").unlink()  # e.g. Ray's session folder was cleaned: the journal kept a copy

    assert tracking.sync_journals(search, uri=uri) == (1, 8, 0)
    assert not journal.exists()
    run = _child(client, parent)
    assert run.info.run_name == "trial-1" and run.data.tags[tracking.TRIAL_TAG] == "t1"
    assert run.info.status == "FINISHED" and run.data.tags["tskd.status"] == "finished"
    assert run.data.params == {"distill.temperature": "2.0"}
    history = client.get_metric_history(run.info.run_id, "val_dice")
    assert [(m.step, m.value) for m in history] == [(1, 0.1), (2, 0.2)]
    assert "val_hd95" not in run.data.metrics  # non-finite values never reach MLflow
    assert "epoch" not in run.data.metrics  # the epoch is the step
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]
    assert tracking.sync_journals(search, uri=uri) == (0, 0, 0)  # nothing twice
    assert list(journal.parent.iterdir()) == [journal.with_name("t1.jsonl.lock")]  # copies removed


def test_a_resumed_trial_does_not_log_an_epoch_twice(store, tmp_path):
    uri, client, parent = store
    journal = tracking.journal_path(tmp_path, "t1")
    first = tracking.RunTracker(uri, journal=journal, parent_run_id=parent, trial_id="t1", run_name="t")
    assert first.start() is False
    for epoch in (1, 2):
        first.log_metrics({"epoch": epoch, "val_dice": 0.5}, step=epoch)
    # the worker died after logging epoch 2 but before Ray recorded its checkpoint: the retry
    # resumes from epoch 1 and runs epoch 2 again (exact resume: the same values)
    retry = tracking.RunTracker(uri, journal=journal, parent_run_id=parent, trial_id="t1", run_name="t")
    assert retry.start() is True and retry.run_id == first.run_id
    for epoch in (2, 3):
        retry.log_metrics({"epoch": epoch, "val_dice": 0.5}, step=epoch)
    retry.log_metrics({"student_params": 1234}, step=3)
    history = client.get_metric_history(first.run_id, "val_dice")
    assert [m.step for m in history] == [1, 2, 3]
    assert client.get_run(first.run_id).data.metrics["student_params"] == 1234
    assert client.get_run(first.run_id).info.status == "RUNNING"  # start() reopened it


def test_a_write_mlflow_refuses_for_good_is_set_aside_not_dropped(store, tmp_path):
    uri, client, parent = store
    down = f"http://127.0.0.1:{free_port()}"
    journal = tracking.journal_path(tmp_path, "parent")
    t = tracking.RunTracker(down, parent, journal=journal)
    t.log_metrics({"best_val_dice": 0.7}, step=0)
    t.log_artifact(tmp_path / "gone.csv")  # the file is deleted before MLflow comes back
    t.finish("FINISHED")
    assert tracking.sync_journals(tmp_path, uri=uri) == (1, 3, 0)
    rejected = [json.loads(line) for line in journal.with_suffix(".rejected").read_text().splitlines()]
    assert [r["op"] for r in rejected] == ["artifact"] and "is gone" in rejected[0]["error"]
    run = client.get_run(parent)
    assert run.data.metrics == {"best_val_dice": 0.7} and run.info.status == "FINISHED"


def test_sync_command_reports_an_unreachable_store_in_one_line(tmp_path):
    search = tmp_path / "runs" / "s"
    search.mkdir(parents=True)
    down = f"http://127.0.0.1:{free_port()}"
    from tskd_tune.config import validate

    (search / "search.json").write_text(
        json.dumps(
            {
                "config": validate({}).model_dump(mode="json"),
                "options": {
                    "name": "s",
                    "storage": str(tmp_path / "runs"),
                    "tracking_uri": down,
                    "address": None,
                    "use_cache": True,
                    "space_file": "",
                },
                "parent_run_id": "p",
            }
        )
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tskd_tune", "sync", str(search)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[-1]]
    assert proc.stderr.startswith(f"error: tracking.uri: cannot use MLflow at {down}")


def test_runs_of_trials_lost_with_a_killed_driver_are_closed(store):
    uri, client, parent = store
    exp = client.get_run(parent).info.experiment_id
    ids = {}
    for trial in ("known1", "lost22", "done33"):
        run = client.create_run(exp, tags={"mlflow.parentRunId": parent, tracking.TRIAL_TAG: trial})
        ids[trial] = run.info.run_id
    client.set_terminated(ids["done33"], "FINISHED")
    assert tracking.close_lost_children(uri, parent, lambda t: t == "known1") == ["lost22"]
    lost = client.get_run(ids["lost22"])
    assert lost.info.status == "KILLED" and lost.data.tags["tskd.status"] == "lost"
    assert client.get_run(ids["known1"]).info.status == "RUNNING"  # the resumed search continues it
    assert client.get_run(ids["done33"]).info.status == "FINISHED"


# ------------------------------------------------------------------- a trial's run as one `with` block
def test_a_trial_run_that_raises_ends_failed_with_its_masked_error_and_re_raises(
    store, tmp_path, monkeypatch
):
    uri, client, parent = store
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "hunter22")
    message = "diverged at http://bob:hunter22@host/ " + "x" * 1000
    with (
        pytest.raises(RuntimeError, match="diverged"),
        tracking.trial_run(uri, parent, "t1", "trial-1", search_path=tmp_path) as run,
    ):
        assert run.resumed is False and run.run_id is not None
        run.tracker.log_params({"distill.temperature": 2.0})
        raise RuntimeError(message)
    child = _child(client, parent)
    assert child.info.run_id == run.run_id and child.info.status == "FAILED"
    assert child.data.tags["tskd.status"] == "failed"
    # cut to 480 characters as raised, then masked
    assert child.data.tags["tskd.error"] == "RuntimeError: " + message[:480].replace("hunter22", "***")
    assert child.data.params == {"distill.temperature": "2.0"}


def test_a_trial_run_that_raises_while_mlflow_is_down_is_journaled_and_replayed_failed(store, tmp_path):
    uri, client, parent = store
    down = f"http://127.0.0.1:{free_port()}"
    with (
        pytest.raises(ValueError, match="bad batch"),
        tracking.trial_run(
            down, parent, "t1", "trial-1", search_path=tmp_path, tracking_cfg=TrackingConfig()
        ) as run,
    ):
        assert run.run_id is None and run.monitor is None  # the sampler needs a run id
        raise ValueError("bad batch")
    journal = tracking.journal_path(tmp_path, "t1")
    ops = [json.loads(line)["op"] for line in journal.read_text().splitlines()[1:]]
    assert ops == ["start", "tags", "finish"]  # the flush at the end found MLflow still down
    assert tracking.sync_journals(tmp_path, uri=uri) == (1, 3, 0)
    child = _child(client, parent)
    assert child.info.status == "FAILED" and child.data.tags["tskd.error"] == "ValueError: bad batch"


def test_a_trial_run_ends_finished_and_a_second_entry_continues_it(store, tmp_path):
    uri, client, parent = store
    sampled = TrackingConfig(system_metrics=True, system_metrics_interval_s=1)
    with tracking.trial_run(uri, parent, "t1", "trial-1", search_path=tmp_path, tracking_cfg=sampled) as run:
        assert run.resumed is False and run.monitor is not None
        run.tracker.log_metrics({"epoch": 1, "val_dice": 0.5}, step=1)
        run.stop_monitor()  # before the final metrics and artifacts, as a trial does
        assert run.monitor is None
    first = client.get_run(run.run_id)
    assert first.info.status == "FINISHED" and first.data.tags["tskd.status"] == "finished"
    # the same trial id again (a retried trial): the same run, reopened, then finished again
    with tracking.trial_run(uri, parent, "t1", "trial-1", search_path=tmp_path) as again:
        assert again.resumed is True and again.run_id == run.run_id and again.monitor is None
        assert client.get_run(run.run_id).info.status == "RUNNING"
        again.tracker.log_metrics({"epoch": 2, "val_dice": 0.6}, step=2)
    child = _child(client, parent)  # still one run for the trial
    assert child.info.run_id == run.run_id and child.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.run_id, "val_dice")] == [1, 2]
    assert not tracking.journal_path(tmp_path, "t1").exists()  # nothing was left queued


# ------------------------------------------------------------------ what a run holds, where its artifacts live
def test_a_trials_run_holds_the_curves_and_end_metrics_runs_are_compared_on(store, tmp_path):
    from tskd_tune.trial import TrialResult

    uri, client, parent = store
    t = tracking.RunTracker(uri, parent_run_id=parent, trial_id="t1", run_name="t001 T=3.7 kd=1.6")
    t.start()
    for epoch in (1, 2):
        t.log_metrics(
            {
                "epoch": epoch,
                "train_loss": 1.0 / epoch,
                "lr": 1e-3,
                "val_dice": 0.3 * epoch,
                "val_dice_liver": 0.4,
                "val_hd95": 5.0,
                "epoch_s": 1.5,
            },
            step=epoch,
        )
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "metrics.json").write_text("{}")
    result = TrialResult(
        {
            "val_dice": 0.6,
            "student_params": 12462,
            "student_latency_ms": 0.5,
            "teacher_val_dice": 0.7,
            "teacher_features_cached": True,
            "logits_cached": False,
            "total_s": 7.0,
            "labeled": 8,
            "synth_gate_reasons": "",
            "method": "ts_kd",
        },
        [tmp_path / "config.yaml", tmp_path / "metrics.json"],
        teacher_cached=True,
    )
    tracking.record_result(t, result, step=2)
    run = client.get_run(t.run_id)
    assert set(run.data.metrics) == {
        "train_loss",
        "lr",
        "val_dice",
        "val_dice_liver",
        "val_hd95",
        "student_params",
        "student_latency_ms",
        "teacher_val_dice",
    }
    assert run.data.metrics["val_dice"] == pytest.approx(0.6)  # the last epoch's: the final score
    assert run.data.tags["tskd.teacher_cached"] == "True" and run.data.tags["tskd.features_cached"] == "True"
    assert run.data.tags["tskd.logits_cached"] == "False"
    assert sorted(a.path for a in client.list_artifacts(t.run_id)) == ["config.yaml", "trial_summary.json"]
    summary = Path(client.download_artifacts(t.run_id, "trial_summary.json", str(tmp_path)))
    assert json.loads(summary.read_text()) == dict(result)  # everything run_trial returned


def test_a_trials_summary_artifact_is_strict_json_with_null_for_an_undefined_score(store, tmp_path):
    from tskd_tune.trial import TrialResult

    uri, client, parent = store
    t = tracking.RunTracker(uri, parent_run_id=parent, trial_id="t1", run_name="t001")
    t.start()
    tracking.record_result(
        t, TrialResult({"val_dice": 0.6, "val_hd95": float("nan"), "method": "ts_kd"}), step=1
    )
    summary = Path(client.download_artifacts(t.run_id, tracking.SUMMARY_FILE, str(tmp_path)))
    strict = json.loads(summary.read_text(), parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert strict == {"val_dice": 0.6, "val_hd95": None, "method": "ts_kd"}


def test_experiment_artifacts_sit_beside_the_store_and_follow_it_when_moved(tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)  # MLflow's default would be ./mlruns here
    uri = f"sqlite:///{tmp_path}/runs/mlflow.db"
    exp = tracking.experiment_id(uri, "kidney us/v2")
    client = MlflowClient(uri)
    experiment = client.get_experiment(exp)
    assert experiment.artifact_location == str(tmp_path / "runs" / "mlartifacts" / "kidney_us_v2")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens its runs
    run = client.create_run(exp, run_name="t001").info.run_id
    (tmp_path / "best.yaml").write_text("seed: 0\n")
    client.log_artifact(run, str(tmp_path / "best.yaml"))
    client.set_terminated(run)
    assert not (tmp_path / "mlruns").exists()
    assert tracking.reroot(uri) == []  # not moved: nothing to do

    shutil.move(tmp_path / "runs", tmp_path / "moved")
    moved = f"sqlite:///{tmp_path}/moved/mlflow.db"
    assert tracking.reroot(moved) == ["kidney us/v2"]
    client = MlflowClient(moved)
    assert client.get_experiment(exp).artifact_location == str(
        tmp_path / "moved" / "mlartifacts" / "kidney_us_v2"
    )
    assert [a.path for a in client.list_artifacts(run)] == ["best.yaml"]
    assert Path(client.download_artifacts(run, "best.yaml", str(tmp_path))).read_text() == "seed: 0\n"
    assert tracking.reroot(moved) == []  # once
    # an experiment made before (MLflow's default location) is left where it is, and opened as training runs
    other = MlflowClient(moved).create_experiment("old", artifact_location=str(tmp_path / "elsewhere"))
    assert tracking.experiment_id(moved, "old") == other
    assert (
        MlflowClient(moved).get_experiment(other).tags["mlflow.experimentKind"] == "custom_model_development"
    )
    assert tracking.reroot(moved) == [] and tracking.artifact_location("http://host:5000", "x") is None
