"""The leaderboard's one "best trial" rule: the best trial that ran to the end."""

import pandas as pd

from tskd_tune.report import best_trial


def board(*rows: tuple[str, str, float]) -> pd.DataFrame:
    """A leaderboard as objective_board returns it: best first, with a state per trial."""
    return pd.DataFrame(
        [{"trial_id": t, "state": s, "val_dice": d, "trial_dir": f"/runs/s/{t}"} for t, s, d in rows]
    )


def test_a_finished_trial_beats_better_scores_of_stopped_ones():
    b = board(("a", "stopped early", 0.9), ("b", "running or stopped", 0.8), ("c", "finished", 0.7),
              ("d", "finished", 0.6))  # fmt: skip
    best = best_trial(b)
    assert best["trial_id"] == "c" and best["trial_dir"] == "/runs/s/c" and best["val_dice"] == 0.7


def test_ties_keep_the_board_order():
    b = board(("a", "stopped early", 0.9), ("b", "finished", 0.7), ("c", "finished", 0.7))
    assert best_trial(b)["trial_id"] == "b"
    assert best_trial(b.iloc[[0, 2, 1]].reset_index(drop=True))["trial_id"] == "c"


def test_with_no_finished_trial_the_first_row_is_best():
    b = board(("a", "stopped early", 0.9), ("b", "error", 0.8), ("c", "stopped early", 0.5))
    assert best_trial(b)["trial_id"] == "a"
    assert best_trial(board(("only", "running or stopped", float("nan"))))["trial_id"] == "only"
