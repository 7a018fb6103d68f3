"""The leaderboard's one "best trial" rule: the best trial that ran to the end; each trial's state, in the
words of tskd_tune.states."""

import json

import pandas as pd

from tskd_tune.report import best_trial, trial_state


def board(*rows: tuple[str, str, float]) -> pd.DataFrame:
    """A leaderboard as objective_board returns it: best first, with a state per trial."""
    return pd.DataFrame(
        [{"trial_id": t, "state": s, "val_dice": d, "trial_dir": f"/runs/s/{t}"} for t, s, d in rows]
    )


def test_a_finished_trial_beats_better_scores_of_stopped_ones():
    b = board(("a", "stopped_early", 0.9), ("b", "running", 0.8), ("c", "finished", 0.7),
              ("d", "finished", 0.6))  # fmt: skip
    best = best_trial(b)
    assert best["trial_id"] == "c" and best["trial_dir"] == "/runs/s/c" and best["val_dice"] == 0.7


def test_ties_keep_the_board_order():
    b = board(("a", "stopped_early", 0.9), ("b", "finished", 0.7), ("c", "finished", 0.7))
    assert best_trial(b)["trial_id"] == "b"
    assert best_trial(b.iloc[[0, 2, 1]].reset_index(drop=True))["trial_id"] == "c"


def test_with_no_finished_trial_the_first_row_is_best():
    b = board(("a", "stopped_early", 0.9), ("b", "failed", 0.8), ("c", "stopped_early", 0.5))
    assert best_trial(b)["trial_id"] == "a"
    assert best_trial(board(("only", "running", float("nan"))))["trial_id"] == "only"


def test_a_trials_state_reads_its_folder_in_the_words_of_its_mlflow_run(tmp_path):
    def trial(name: str, *files: str) -> object:
        folder = tmp_path / name
        for f in files:
            (folder / f).parent.mkdir(parents=True, exist_ok=True)
            (folder / f).write_text("{}")
        folder.mkdir(exist_ok=True)
        return folder

    epochs = [{"epoch": 1, "done": False}]
    assert trial_state(trial("t001_a", "outputs/metrics.json"), epochs, ended=False) == "finished"
    assert trial_state(trial("t002_b"), [], ended=False) == "pending"
    assert trial_state(trial("t003_c"), epochs, ended=False) == "running"
    assert trial_state(trial("t003_c"), epochs, ended=True) == "stopped_early"
    # Ray marks the result on which the scheduler stopped the trial
    assert trial_state(trial("t004_d"), [{"epoch": 1, "done": True}], ended=False) == "stopped_early"
    assert trial_state(trial("t005_e", "error.txt"), epochs, ended=False) == "failed"
    (tmp_path / "failed_trials").mkdir()
    (tmp_path / "failed_trials" / "f.json").write_text(json.dumps({"status": "timed_out", "error": "hung"}))
    assert trial_state(trial("t006_f", "error.txt"), epochs, ended=True) == "timed_out"
