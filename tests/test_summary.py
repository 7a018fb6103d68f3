"""The end of a search as MLflow shows it: the best trial's own run, the searched ranges on the parent run,
the shared runs-table view, and the early-stopping line in words. A real SQLite MLflow store; the search
folder's trials are written as Ray Tune leaves them (params.json)."""

import json
import math

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tskd_tune import tracking
from tskd_tune.search.parent_view import VIEW_TAG, describe_parent
from tskd_tune.search.summary import trust_lines

SPACE = {
    "distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0},
    "student.lr": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2},
}


@pytest.fixture
def search(tmp_path, tiny):
    """(config, MLflow client, buffered client, experiment id, parent run id, a function adding a trial run)."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    parent = client.create_run(exp, run_name="s").info.run_id

    def trial(number: int, val_dice: float, kind: str = "trial") -> dict:
        run = client.create_run(
            exp, run_name=f"t{number:03d}", tags={"mlflow.parentRunId": parent, tracking.KIND_TAG: kind}
        )
        client.log_metric(run.info.run_id, "val_dice", val_dice)
        folder = tmp_path / "s" / f"t{number:03d}_id{number}"
        folder.mkdir(parents=True)
        (folder / "params.json").write_text(
            json.dumps({"distill.temperature": 2.0 + number, "student.lr": 0.001})
        )
        return {
            "trial_id": f"id{number}",
            "trial_dir": str(folder),
            "mlflow_run_id": run.info.run_id,
            "state": "finished",
            "val_dice": val_dice,
            "gain_vs_scratch": val_dice - 0.5,
            "val_hd95": 4.0,
            "epoch": 3,
        }

    cfg = tiny(search={"space": SPACE})
    buffered = tracking.BufferedClient(uri, tracking.journal_path(tmp_path / "s", "parent"))
    return cfg, client, buffered, exp, parent, trial


def test_the_best_trials_run_says_so_and_holds_its_test_dice(search):
    cfg, client, c, exp, parent, trial = search
    board = pd.DataFrame([trial(2, 0.8), trial(1, 0.7)])
    summary = {"test_dice": 0.75, "test_dice_kidney": 0.75, "test_hd95": 3.5, "best_val_dice": 0.8}
    describe_parent(c, parent, cfg, "s", board, board.iloc[0], summary)
    best, other = (client.get_run(board["mlflow_run_id"][i]) for i in (0, 1))
    assert best.data.tags["tskd.best"] == "true" and "tskd.best" not in other.data.tags
    assert best.data.tags["mlflow.note.content"].startswith(
        "**Best trial** of search `s`: val_dice 0.8000; test Dice 0.7500"
    )
    assert best.data.metrics == {
        "val_dice": 0.8,
        "test_dice": 0.75,
        "test_dice_kidney": 0.75,
        "test_hd95": 3.5,
    }
    assert client.get_run(parent).data.tags["tskd.best_run_id"] == best.info.run_id


def test_a_resumed_search_moves_the_best_tag(search):
    cfg, client, c, exp, parent, trial = search
    first, second = trial(1, 0.7), trial(2, 0.8)
    describe_parent(c, parent, cfg, "s", pd.DataFrame([first]), pd.Series(first), {"test_dice": 0.7})
    board = pd.DataFrame([second, first])  # resumed, with a new best
    describe_parent(c, parent, cfg, "s", board, board.iloc[0], {"test_dice": 0.8})
    old, new = client.get_run(first["mlflow_run_id"]), client.get_run(second["mlflow_run_id"])
    assert new.data.tags["tskd.best"] == "true" and old.data.tags["tskd.best"] == "false"
    assert "the best is now t002" in old.data.tags["mlflow.note.content"]


def test_a_choice_too_long_for_an_mlflow_param_is_cut():
    from pydantic import TypeAdapter

    from tskd_tune.space import PARAM_LIMIT, Distribution, space_params

    many = TypeAdapter(Distribution).validate_python(
        {"type": "choice", "values": [f"v{i:05d}" for i in range(2000)]}
    )
    value = space_params({"student.model_kwargs.x": many})["space.student.model_kwargs.x"]
    assert len(value) == PARAM_LIMIT and value.endswith("…") and value.startswith("choice(values=['v00000'")


def test_the_shared_view_ranks_the_trials_without_the_reference_runs(search):
    cfg, client, c, exp, parent, trial = search
    board = pd.DataFrame([trial(2, 0.8), trial(1, 0.7)])
    teacher = trial(3, 0.9, kind="reference")  # scores above every student: it must not top the table
    describe_parent(c, parent, cfg, "s", board, board.iloc[0], {"test_dice": 0.75})
    state = json.loads(client.get_experiment(exp).tags[f"{VIEW_TAG}tskd-{parent}"])
    shown = client.search_runs([exp], state["searchFilter"], order_by=[f"{state['orderByKey']} DESC"])
    assert [r.info.run_id for r in shown] == list(board["mlflow_run_id"])
    assert teacher["mlflow_run_id"] not in {r.info.run_id for r in shown}
    assert "metrics.`test_dice`" in state["selectedColumns"]


def test_rank_correlations_that_are_undefined_are_said_in_words_never_nan():
    two = [{"epoch": 1, "spearman": math.nan, "trials": 2}, {"epoch": 2, "spearman": math.nan, "trials": 2}]
    (line,) = trust_lines(two, "val_dice")
    assert "nan" not in line and line.startswith("early stopping: 2 trial(s) ran to the end, too few")
    tied = [{"epoch": 1, "spearman": math.nan, "trials": 5}, {"epoch": 2, "spearman": 0.9, "trials": 5}]
    (line,) = trust_lines(tied, "val_dice")
    assert "nan" not in line and "epoch 1: undefined (5 trials; their scores tie" in line
    assert "epoch 2: 0.90 (5 trials)" in line


def test_the_parent_run_holds_the_searched_ranges_from_its_start_and_again_on_resume(tmp_path, tiny):
    import io

    from rich.console import Console

    from tskd_tune.reporter import Reporter
    from tskd_tune.search.folder import SearchOptions
    from tskd_tune.search.launch import parent_run

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg, opts = tiny(search={"space": SPACE}), SearchOptions("s", tmp_path / "runs", uri)
    say = Reporter(Console(file=io.StringIO()))
    parent = parent_run(cfg, opts, False, say)
    expected = {
        "space.distill.temperature": "uniform(low=1.0, high=8.0)",
        "space.student.lr": "loguniform(low=0.0001, high=0.01)",
    }
    assert MlflowClient(uri).get_run(parent).data.params == expected
    # resumed: the same parent, the same values logged again (MLflow refuses a changed value, not an equal one)
    assert parent_run(cfg, opts, True, say) == parent
    assert MlflowClient(uri).get_run(parent).data.params == expected
