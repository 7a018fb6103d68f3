"""End to end: `tskd-tune launch` with a real local Ray and a real MLflow SQLite store."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def run(*args, cwd, env=None):
    return subprocess.run(
        [sys.executable, "-m", "tskd_tune", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=900,
        env=os.environ | (env or {}),
    )


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    from tests.conftest import tiny_raw

    tmp = tmp_path_factory.mktemp("search")
    raw = tiny_raw(tmp, student={"epochs": 3}, teacher={"epochs": 5})
    raw["tracking"] = {
        "uri": f"sqlite:///{tmp}/mlflow.db",
        "experiment": "e2e",
        "system_metrics": True,
        "system_metrics_interval_s": 1,
    }
    # asynchronous Hyperband: ASHA's brackets, of which one judges trials at epoch 1
    raw["search"] = {
        "num_samples": 4,
        "max_concurrent": 2,
        "grace_period": 1,
        "scheduler": "hyperband",
        "study_storage": f"sqlite:///{tmp}/optuna.db",
        "space": {
            "distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0},
            "distill.kd_weight": {"type": "uniform", "low": 0.2, "high": 2.0},
        },
    }
    space = tmp / "e2e.yaml"
    space.write_text(yaml.safe_dump(raw))
    first = run("launch", space, "--storage", tmp / "runs", "--name", "first", cwd=tmp)
    assert first.returncode == 0, first.stderr[-3000:]
    # the second search is multi-objective (Dice up, latency down): same teacher key, so a cache hit
    second = run(
        "launch",
        space,
        "--storage",
        tmp / "runs",
        "--name",
        "second",
        "--num-samples",
        "3",
        "--set",
        "search.scheduler=fifo",
        "--set",
        "search.objectives={val_dice: max, student_latency_ms: min}",
        "--set",
        "search.baselines=[]",
        cwd=tmp,
    )
    assert second.returncode == 0, second.stderr[-3000:]
    return tmp, raw, first, second


def test_the_study_holds_finished_trials_as_complete_and_stopped_ones_as_pruned(searched):
    import optuna

    tmp, raw, _, _ = searched
    st = optuna.load_study(study_name="first", storage=raw["search"]["study_storage"])
    _, runs = runs_of(raw["tracking"]["uri"], "e2e")
    # each trial's MLflow run, found by its sampled temperature
    status = {
        round(float(r.data.params["distill.temperature"]), 6): r.data.tags.get("tskd.status")
        for r in runs
        if "distill.temperature" in r.data.params and "tskd.status" in r.data.tags
    }
    assert len(st.trials) == 4
    for t in st.trials:
        # every epoch's val Dice reached the study as an intermediate value, as Ray reported it
        assert t.intermediate_values and set(t.intermediate_values) == set(
            range(1, len(t.intermediate_values) + 1)
        )
        name = round(t.params["distill.temperature"], 6)
        if status[name] == "finished":
            assert t.state.name == "COMPLETE" and len(t.intermediate_values) == 3
            assert t.value == pytest.approx(t.intermediate_values[3], abs=1e-3)  # the final report's val Dice
        else:  # the scheduler stopped it: a score after fewer epochs is not a final result
            assert status[name] == "stopped_early" and t.state.name == "PRUNED"
            assert len(t.intermediate_values) < 3


def runs_of(uri: str, experiment: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, client.search_runs([exp.experiment_id], max_results=100)


def test_mlflow_has_one_parent_per_search_and_a_child_per_trial(searched):
    tmp, raw, first, _ = searched
    client, runs = runs_of(raw["tracking"]["uri"], "e2e")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert sorted(r.info.run_name for r in parents) == ["first", "second"]
    parent = next(r for r in parents if r.info.run_name == "first")
    assert parent.info.status == "FINISHED" and "best_val_dice" in parent.data.metrics
    assert parent.data.tags["search.space_file"].endswith("e2e.yaml")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    references = {r.data.tags["tskd.baseline"]: r for r in children if "tskd.baseline" in r.data.tags}
    children = [r for r in children if "tskd.baseline" not in r.data.tags]
    assert len(children) == 4 and sorted(references) == ["scratch", "teacher"]
    for method, ref in references.items():  # reference trials: outside the study, scored on val and test
        assert ref.info.status == "FINISHED" and ref.data.params["distill.method"] == method
        assert {"val_dice", "test_dice", "student_params"} <= set(ref.data.metrics)
        assert not any(k.startswith("final_") for k in ref.data.metrics)
        assert parent.data.metrics[f"reference_{method}_val_dice"] == pytest.approx(
            ref.data.metrics["val_dice"]
        )
        assert ref.data.tags["teacher.pretrained"] == "false"
    for child in children:
        # never left RUNNING; a trial stopped early is not a failure: FINISHED too, told apart by its tag
        assert child.info.status == "FINISHED" and child.data.tags["tskd.status"] in {
            "finished",
            "stopped_early",
        }
        assert {"distill.temperature", "distill.kd_weight"} <= set(child.data.params)
        assert "val_dice" in child.data.metrics and "ray.node_ip" in child.data.tags
        history = client.get_metric_history(child.info.run_id, "val_dice")
        assert [m.step for m in history] == list(range(1, len(history) + 1))
        artifacts = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert "config.yaml" in artifacts
        # what runs are compared on: curves per epoch and a few end-of-trial metrics; the rest in trial_summary.json
        # (the best trial also holds the test score the search measured for it)
        assert set(child.data.metrics) - {"gain_vs_scratch"} <= {
            "val_dice",
            "val_hd95",
            "train_loss",
            "lr",
            "student_params",
            "student_latency_ms",
            "teacher_val_dice",
            *(k for k in child.data.metrics if k.startswith(("val_dice_", "system/", "test_"))),
        }
        # a trial stopped early has its student's size and speed too (measured when it started)
        assert child.data.metrics["student_params"] > 0 and child.data.metrics["student_latency_ms"] > 0
        assert child.data.metrics["lr"] > 0  # the rate the last epoch used, not the cosine's 0 after it
        assert child.data.tags["tskd.kind"] == "trial"
        if child.data.tags["tskd.status"] == "finished":
            assert {"student.safetensors", "trial_summary.json", "val_overlays.png"} <= artifacts
            assert child.data.metrics["system/cpu_utilization_percentage"] >= 0  # MLflow's system metrics
            assert len(history) == 3
            assert (Path(child.data.tags["tskd.teacher_adapter"]) / "head.safetensors").is_file()
            scratch = parent.data.metrics["reference_scratch_val_dice"]
            gain = child.data.metrics["gain_vs_scratch"]
            assert gain == pytest.approx(child.data.metrics["val_dice"] - scratch, abs=1e-6)
        else:
            assert len(history) < 3 and child.data.tags["tskd.stopped_at_epoch"] == str(len(history))
    # the parent names its best child and describes the search with a markdown leaderboard
    best = next(c for c in children if c.info.run_id == parent.data.tags["tskd.best_run_id"])
    assert best.info.run_name == parent.data.tags["tskd.best_run_name"] and best.info.run_name.startswith(
        "t00"
    )
    note = parent.data.tags["mlflow.note.content"]
    assert f"**[{best.info.run_name}](#/experiments/" in note and "**Reference trials**" in note
    # the best run says so itself and holds its test Dice; no other run is tagged best
    assert (
        best.data.tags["tskd.best"] == "true"
        and "**Best trial** of search `first`" in best.data.tags["mlflow.note.content"]
    )
    summary = json.loads((tmp / "runs" / "first" / "summary.json").read_text())
    assert best.data.metrics["test_dice"] == pytest.approx(summary["test_dice"])
    assert all(c.data.tags.get("tskd.best") is None for c in children if c is not best)
    assert all(r.data.tags["tskd.kind"] == "reference" for r in references.values())
    # the searched ranges are the parent's params
    assert parent.data.params == {
        "space.distill.temperature": "uniform(low=1.0, high=8.0)",
        "space.distill.kd_weight": "uniform(low=0.2, high=2.0)",
    }
    # the shared runs-table view ranks the trials only: no reference teacher above the best trial
    view = client.get_experiment(parent.info.experiment_id).tags[
        f"mlflow.sharedViewState.tskd-{parent.info.run_id}"
    ]
    shown = client.search_runs([parent.info.experiment_id], json.loads(view)["searchFilter"])
    assert sorted(r.info.run_id for r in shown) == sorted(c.info.run_id for c in children)
    parent_artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"leaderboard.csv", "best.yaml", "search_config.yaml"} <= parent_artifacts


def test_search_folder_has_leaderboard_best_config_and_test_score(searched):
    tmp, _, first, _ = searched
    import json

    import pandas as pd

    folder = tmp / "runs" / "first"
    board = pd.read_csv(folder / "leaderboard.csv")
    assert len(board) == 4  # the trials; the reference trials are not among them
    summary = json.loads((folder / "summary.json").read_text())
    scratch = summary["reference_scratch_val_dice"]
    assert board["gain_vs_scratch"].to_numpy() == pytest.approx((board["val_dice"] - scratch).to_numpy())
    assert summary["best_gain_vs_scratch"] == pytest.approx(
        board.loc[board["trial_id"] == summary["best_trial"], "gain_vs_scratch"].iloc[0]
    )
    assert "reference scratch: val_dice" in first.stdout and "val Dice over scratch" in first.stdout
    # the CSV names trials as everything else does, carries their MLflow runs and the best one's test Dice
    assert board["trial"].str.fullmatch(r"t\d{3}").all() and board["mlflow_run_id"].notna().all()
    best_row = board[board["trial_id"] == summary["best_trial"]].iloc[0]
    assert best_row["test_dice"] == pytest.approx(summary["test_dice"])
    # a teacher below scratch is named (once both references are in, and again at the end), and only then
    below = summary["reference_teacher_val_dice"] < scratch
    assert ("warning: the teacher (val Dice" in first.stdout) == below
    assert summary.get("teacher_below_scratch", False) == below
    # the references and every trial read the teacher features the driver filled before the trials
    assert "teacher features of images (2 frozen blocks)" in first.stdout  # tiny: not worth workers
    assert summary["teacher_features_filled"] == 80  # every image of the tiny phantom, once
    finished = [json.loads(p.read_text()) for p in folder.glob("*/outputs/metrics.json")]
    for result in folder.glob("t0*_*/result.json"):  # every report says what the trial has spent so far
        cpu = [json.loads(line)["cpu_s"] for line in result.read_text().splitlines()]
        assert cpu[0] > 0 and cpu == sorted(cpu), result
    assert finished and all(m["teacher_features_cached"] is True for m in finished)
    best = yaml.safe_load((folder / "best.yaml").read_text())
    assert 1.0 <= best["distill"]["temperature"] <= 8.0
    assert "test_dice" in (folder / "summary.json").read_text()
    # strict JSON: an undefined rank correlation is null, not NaN
    json.loads(
        (folder / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"summary.json has {c}")
    )
    assert not [
        line for line in first.stdout.splitlines() if line.startswith("early stopping") and "nan" in line
    ]
    assert "Ray dashboard: http://127.0.0.1:" in first.stdout
    assert "open it with: tskd-tune ui --uri sqlite:///" in first.stdout
    # the runs table with the scores and values, which MLflow's default table lacks, is one link away
    assert re.search(
        r"compare the trials in MLflow: `tskd-tune ui --uri sqlite:///\S+`, then "
        r"http://127\.0\.0\.1:5000/#/experiments/\d+/runs\?viewStateShareKey=tskd-\w+",
        first.stdout,
    )


def test_second_search_reuses_the_teacher(searched):
    tmp, raw, _, _ = searched
    _, runs = runs_of(raw["tracking"]["uri"], "e2e")
    second = next(r for r in runs if r.info.run_name == "second")
    finished = [
        r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == second.info.run_id and r.info.status == "FINISHED"
    ]
    assert finished and all(r.data.tags["tskd.teacher_cached"] == "True" for r in finished)


def test_multi_objective_search_reports_the_pareto_front(searched):
    import json

    import pandas as pd

    tmp, _, _, second = searched
    folder = tmp / "runs" / "second"
    board = pd.read_csv(folder / "leaderboard.csv")
    assert len(board) == 3 and (board["state"] == "finished").all()  # FIFO: nobody is stopped early
    front = board[board["pareto"]]
    summary = json.loads((folder / "summary.json").read_text())
    assert (
        sorted(summary["pareto_front"])
        == sorted(front["trial_id"])
        == sorted(pd.read_csv(folder / "pareto.csv")["trial_id"])
    )
    for _, a in front.iterrows():  # no trial beats a front member in both objectives
        better = (board["val_dice"] >= a["val_dice"]) & (
            board["student_latency_ms"] <= a["student_latency_ms"]
        )
        strictly = (board["val_dice"] > a["val_dice"]) | (
            board["student_latency_ms"] < a["student_latency_ms"]
        )
        assert not (better & strictly).any()
    assert "Pareto front (val_dice max, student_latency_ms min)" in second.stdout
    report = run("report", folder, "--out", tmp / "report2", cwd=tmp)
    assert report.returncode == 0, report.stderr
    assert (tmp / "report2" / "pareto_front.png").read_bytes()[:4] == b"\x89PNG"
    status = run("status", folder, cwd=tmp)
    assert status.returncode == 0, status.stderr
    line = next(
        x
        for x in status.stdout.splitlines()
        if x.startswith("Pareto front (val_dice max, student_latency_ms min): ")
    )
    assert sorted(line.split(": ", 1)[1].split(", ")) == sorted(front["trial"])  # t003, as everywhere


def test_status_and_report(searched):
    tmp, _, _, _ = searched
    status = run("status", tmp / "runs" / "first", cwd=tmp, env={"COLUMNS": "80"})
    assert status.returncode == 0, status.stderr
    assert "4 trial(s)" in status.stdout and "best so far: t0" in status.stdout
    rows = [x.split() for x in status.stdout.splitlines() if re.match(r"\s*t\d{3} ", x)]
    assert len(rows) == 4 and "…" not in status.stdout  # one line per trial, named t001.., nothing cut at 80
    assert (
        max(len(x.rstrip()) for x in status.stdout.splitlines() if re.match(r"\s*(trial|t\d{3}) ", x)) <= 80
    )
    assert (
        "reference scratch: val_dice" in status.stdout and "gain: a trial's val_dice minus" in status.stdout
    )
    report = run("report", tmp / "runs" / "first", "--out", tmp / "report", cwd=tmp)
    assert report.returncode == 0, report.stderr
    assert (tmp / "report" / "history.png").read_bytes()[:4] == b"\x89PNG"
    assert "<table" in (tmp / "report" / "report.html").read_text()
    again = run("launch", tmp / "e2e.yaml", "--storage", tmp / "runs", "--name", "first", cwd=tmp)
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_unreachable_mlflow_fails_before_any_trial(tmp_path):
    from tests.conftest import tiny_raw

    raw = tiny_raw(tmp_path)
    raw["search"]["space"] = {"distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0}}
    raw["tracking"] = {"uri": "http://127.0.0.1:9/", "experiment": "x"}
    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump(raw))
    proc = run("launch", space, "--storage", tmp_path / "runs", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: tracking.uri: cannot use MLflow at http://127.0.0.1:9/")
    )
    assert not (tmp_path / "runs").exists()


def test_export_best_trial_registers_it_in_mlflow(searched):
    tmp, raw, _, _ = searched
    proc = run(
        "export", tmp / "runs" / "first", "--register", "e2e-student", "--out", tmp / "exported", cwd=tmp
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(raw["tracking"]["uri"])
    versions = client.search_model_versions("name='e2e-student'")
    assert [str(v.version) for v in versions] == ["1"]
    assert (tmp / "exported" / "model.onnx").is_file()
    card = json.loads((tmp / "exported" / "model_card.json").read_text())
    origin = card["trial"]
    assert origin["search"] == "first" and re.fullmatch(r"t\d{3}", origin["name"]) and "test_dice" in card
    # the version points to its trial and search; the run that logged it sits under the search's run
    version = client.get_model_version("e2e-student", "1")
    assert (
        f"trial {origin['name']} of search first" in version.description
        and "test_dice" in version.description
    )
    assert version.tags["tskd.mlflow_run_id"] == origin["mlflow_run_id"] and version.tags["tskd.teacher"]
    assert f"teacher {version.tags['tskd.teacher']}" in version.description
    logged_by = client.get_run(version.run_id)
    assert logged_by.data.tags["mlflow.parentRunId"] == origin["search_run_id"]
    assert set(logged_by.data.metrics) <= {
        "val_dice",
        "test_dice",
        "val_hd95",
        "test_hd95",
        "student_params",
        "student_latency_ms",
    }
    import mlflow

    mlflow.set_tracking_uri(raw["tracking"]["uri"])
    signature = mlflow.models.get_model_info("models:/e2e-student/1").signature
    assert signature is not None and signature.inputs.to_dict()[0]["tensor-spec"]["shape"][1:] in (
        [1, 32, 32],
        (1, 32, 32),
    )


def test_a_staged_search_distils_top_teachers_finished_teachers(tmp_path):
    """The teacher stage's first top_teachers trials run to the end whatever the scheduler, so the student
    stage always has that many finished teachers (with ASHA at a grace period of one teacher epoch, which
    may stop the third and fourth teachers)."""
    import json

    from tests.conftest import tiny_raw

    raw = tiny_raw(tmp_path, student={"epochs": 2}, teacher={"epochs": 3})
    raw["search"] = {
        "num_samples": 2,
        "max_concurrent": 2,
        "scheduler": "asha",
        "baselines": [],
        "grace_period": 1,
        "strategy": "staged",
        "teacher_trials": 4,
        "top_teachers": 2,
        "space": {
            "teacher.lr": {"type": "choice", "values": [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]},
            "distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0},
        },
    }
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "staged"}
    space = tmp_path / "staged.yaml"
    space.write_text(yaml.safe_dump(raw))
    proc = run("launch", space, "--storage", tmp_path / "runs", "--name", "staged", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "runs" / "staged"
    teachers = json.loads((folder / "teachers.json").read_text())["teachers"]
    assert len(teachers) == 2 and "note: search.top_teachers" not in proc.stdout
    for first in ("t001", "t002"):  # the protected two ran to the end
        (trial,) = (folder / "teacher_stage").glob(f"{first}_*")
        assert (trial / "outputs" / "metrics.json").is_file()
    assert "student stage: distilling the best 2 teacher(s)" in proc.stdout
    assert len(list(folder.glob("t00*_*/result.json"))) == 2


def test_a_search_with_augmented_views_keeps_the_cache_under_max_gb_sparing_what_it_uses(tmp_path):
    """cache.max_gb: entries no trial of the search has used go, least recently used first; the search's own
    (data, teacher features, teacher) stay. The same search has augmented teacher views, which the driver
    computes (MONAI transforms) for the feature fill while it also preloads MONAI for the summary: the two
    imports must not overlap (they failed with a partially initialised monai.transforms). One search for
    both, as each launch costs a Ray start."""
    import os
    import time

    from tests.conftest import tiny_raw
    from tskd_tune.cache import Store, entries

    raw = tiny_raw(tmp_path, student={"epochs": 1}, teacher={"epochs": 1, "augment_views": 2})
    raw["cache"]["max_gb"] = 1e-9  # below anything: every entry the search has not used is over the limit
    raw["search"] = {
        "num_samples": 1,
        "max_concurrent": 1,
        "scheduler": "fifo",
        "baselines": [],
        "space": {"distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0}},
    }
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "cache"}
    stale = Store(raw["cache"]["dir"]).get_or_build(
        "logits", {"old": 1}, lambda tmp: (tmp / "x").write_bytes(b"0" * 4096)
    )
    week = time.time() - 7 * 86400
    os.utime(stale.path / "MANIFEST.json", (week, week))
    space = tmp_path / "cache.yaml"
    space.write_text(yaml.safe_dump(raw))
    proc = run("launch", space, "--storage", tmp_path / "runs", "--name", "cache", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not stale.path.exists() and "cache: removed 1 least recently used entry" in proc.stdout
    assert "augmented views" in proc.stdout and "partially initialized" not in proc.stderr
    kinds = {e.kind for e in entries(raw["cache"]["dir"]) if e.complete}
    assert {"data", "features", "teacher"} <= kinds  # what the search used is kept, although over the limit
