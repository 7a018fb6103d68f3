"""The leaderboard of a search, read from its folder (works while the search runs): one row per trial, the
best trial, the reference trials, and the order the trials ran in."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tskd_tune import states
from tskd_tune.faults import FAILED_DIR

# ``t007_<trial id>`` (search/tuner.py names folders so); ``_trainable_<trial id>_7_<values>`` before that
_NUMBERED = re.compile(r"^t(\d+)_|^_trainable_[0-9a-f]+_(\d+)_")


def read_results(trial_dir: Path) -> list[dict]:
    """The rows a trial reported (Ray Tune's ``result.json``, one per epoch); a row being written is left out."""
    path = trial_dir / "result.json"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the line being written right now
            break
    return rows


def leaderboard(
    search_path: Path, metric: str = "val_dice", mode: str = "max", extra: tuple[str, ...] | list[str] = ()
) -> pd.DataFrame:
    """One row per trial: id, epochs reported, last metric values (``metric``, val_hd95, ``extra``) and
    sampled params; best first."""
    rows = []
    ended = (Path(search_path) / "summary.json").is_file()
    for trial_dir in sorted(
        p for p in Path(search_path).iterdir() if p.is_dir() and (p / "params.json").is_file()
    ):
        params = json.loads((trial_dir / "params.json").read_text())
        results = read_results(trial_dir)
        last = results[-1] if results else {}
        rows.append(
            {
                "trial_id": last.get("trial_id", trial_dir.name),
                "state": trial_state(trial_dir, results, ended),
                "epoch": last.get("epoch", 0),
                metric: last.get(metric, np.nan),
                "val_hd95": last.get("val_hd95", np.nan),
                **{m: last.get(m, np.nan) for m in extra if m not in (metric, "val_hd95")},
                "val_dice": last.get("val_dice", np.nan),
                "mlflow_run_id": last.get("mlflow_run_id"),
                **{k: v for k, v in params.items()},
                "trial_dir": str(trial_dir),
            }
        )
    board = pd.DataFrame(rows)
    if board.empty:
        extra = [m for m in extra if m not in (metric, "val_hd95")]
        return pd.DataFrame(
            columns=list(
                dict.fromkeys(
                    [
                        "trial_id",
                        "state",
                        "epoch",
                        metric,
                        "val_hd95",
                        *extra,
                        "val_dice",
                        "mlflow_run_id",
                        "trial_dir",
                    ]
                )
            )
        )
    return board.sort_values(metric, ascending=(mode == "min"), na_position="last").reset_index(drop=True)


def trial_state(trial_dir: Path, results: list[dict], ended: bool) -> str:
    """The trial's state, in the words of :mod:`tskd_tune.states` (its MLflow run's ``tskd.status``).

    ``results``: its reported results (Ray's result.json); ``ended``: the search has ended.
    """
    if _failed_last(trial_dir, results):
        # the record an attempt left (see faults.py) tells a hang from other failures; "timeout": older searches
        record = Path(trial_dir).parent / FAILED_DIR / f"{trial_dir.name.rsplit('_', 1)[-1]}.json"
        try:
            recorded = json.loads(record.read_text()).get("status")
        except (OSError, ValueError):
            recorded = None
        return states.TIMED_OUT if recorded in (states.TIMED_OUT, "timeout") else states.FAILED
    if (trial_dir / "outputs" / "metrics.json").is_file():
        return states.FINISHED
    if not results:
        return states.PENDING
    # Ray marks the result on which the scheduler stopped a trial as done; a trial without outputs in a search
    # that has ended was stopped too
    return states.STOPPED_EARLY if results[-1].get("done") or ended else states.RUNNING


def last_failure(error_file: Path) -> tuple[float | None, str] | None:
    """The last failure Ray Tune recorded in a trial's ``error.txt`` ("Failure # 2 (occurred at
    2026-12-05_18-17-29)" then the error's text): (when, in epoch seconds, or None; its text); None when the
    file is missing."""
    try:
        text = Path(error_file).read_text()
    except (OSError, TypeError):
        return None
    last = text.rsplit("Failure # ", 1)[-1]
    stamp = re.match(r"\d+ \(occurred at (\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d)\)", last)  # Ray's local time
    when = time.mktime(time.strptime(stamp.group(1), "%Y-%m-%d_%H-%M-%S")) if stamp else None
    return when, last


def _failed_last(trial_dir: Path, results: list[dict]) -> bool:
    """Whether the trial's last attempt failed: an error record (Ray's error.txt) and no result reported after
    its last failure. A trial Ray retried (its node was lost, its worker killed) that reported again is not."""
    failure = last_failure(trial_dir / "error.txt")
    if failure is None:
        return (trial_dir / "error.pkl").is_file()
    when = failure[0]
    if when is None or not results or "timestamp" not in results[-1]:
        return True
    return results[-1]["timestamp"] <= when


def pareto_front(board: pd.DataFrame, objectives: list[tuple[str, str]]) -> pd.Series:
    """True for the trials no other trial beats in every objective (NaN rows are never on the front)."""
    names = [m for m, _ in objectives]
    # flip maximised objectives so that smaller is better everywhere
    values = board[names].to_numpy(dtype=float) * np.array(
        [-1.0 if d == "max" else 1.0 for _, d in objectives]
    )
    valid = ~np.isnan(values).any(axis=1)
    front = np.zeros(len(board), dtype=bool)
    for i in np.flatnonzero(valid):
        others = values[valid]
        dominated = ((others <= values[i]).all(axis=1) & (others < values[i]).any(axis=1)).any()
        front[i] = not dominated
    return pd.Series(front, index=board.index, name="pareto")


def references(search_path: Path) -> dict[str, dict]:
    """The finished reference trials of a search (``scratch``, ``teacher``): method -> final metrics."""
    out = {}
    for f in sorted(Path(search_path).glob("baselines/*/outputs/metrics.json")):
        try:
            out[f.parent.parent.name] = json.loads(f.read_text())
        except (OSError, ValueError):  # being written
            continue
    return out


def objective_board(search_path: Path, objectives: list[tuple[str, str]]) -> pd.DataFrame:
    """The leaderboard, best first in the first objective, with a column per other objective, for
    several objectives a ``pareto`` column after ``epoch``, and ``gain_vs_scratch`` (val Dice over the
    scratch reference trial, once it has finished) after the first objective."""
    board = leaderboard(search_path, *objectives[0], extra=[m for m, _ in objectives[1:]])
    if len(objectives) > 1:
        board.insert(board.columns.get_loc("epoch") + 1, "pareto", pareto_front(board, objectives))
    scratch = references(search_path).get("scratch", {}).get("val_dice", np.nan)
    board.insert(
        board.columns.get_loc(objectives[0][0]) + 1,
        "gain_vs_scratch",
        pd.to_numeric(board["val_dice"], errors="coerce") - scratch,
    )
    return board


def best_trial(board: pd.DataFrame) -> pd.Series:
    """The search's best trial: the first row of ``board`` (best first, as :func:`objective_board` sorts
    it) whose ``state`` is ``finished``, or the first row when no trial ran to the end.

    A trial stopped early (by ASHA) scored after fewer epochs and has no student to test or export, so
    it is passed over while a finished one exists. ``board`` must have a row.
    """
    done = board[board["state"] == states.FINISHED]
    return (done if not done.empty else board).iloc[0]


def trial_number(trial_dir: Path | str) -> int | None:
    """The trial's number in its search (``t007_...`` -> 7), counted as Ray Tune started them."""
    m = _NUMBERED.match(Path(trial_dir).name)
    return int(m.group(1) or m.group(2)) if m else None


def trial_label(row: pd.Series) -> str:
    """A trial's short name, as in its folder and MLflow run name: ``t007`` (the trial id without a number)."""
    number = trial_number(row["trial_dir"])
    return f"t{number:03d}" if number is not None else str(row["trial_id"])


def test_dice(search_path: Path, board: pd.DataFrame, summary: dict | None = None) -> dict[str, float]:
    """Test Dice where known: a trial's own metrics.json (rare: tests run only once), and the best trial's
    from ``summary`` or summary.json, which the search writes at its end."""
    out = {}
    for _, r in board.iterrows():
        try:
            value = json.loads((Path(r["trial_dir"]) / "outputs" / "metrics.json").read_text()).get(
                "test_dice"
            )
        except (OSError, ValueError):
            value = None
        if value is not None:
            out[str(r["trial_id"])] = float(value)
    try:
        summary = (
            summary if summary is not None else json.loads((Path(search_path) / "summary.json").read_text())
        )
        if summary.get("test_dice") is not None:
            out[str(summary["best_trial"])] = float(summary["test_dice"])
    except (OSError, ValueError, KeyError):
        pass
    return out


def leaderboard_csv(board: pd.DataFrame, tests: dict[str, float]) -> pd.DataFrame:
    """The leaderboard as leaderboard.csv holds it: each trial's short name first (``t007``, as in its folder and
    MLflow run), its test Dice where known (``tests``: trial id -> test Dice; the best trial's, at the end),
    then the scores, the sampled values and the MLflow run id."""
    out = board.copy()
    out.insert(0, "trial", [trial_label(row) for _, row in board.iterrows()])
    after = out.columns.get_loc("gain_vs_scratch") + 1 if "gain_vs_scratch" in out else len(out.columns)
    out.insert(after, "test_dice", [tests.get(str(t), float("nan")) for t in board["trial_id"]])
    return out


def run_order(board: pd.DataFrame) -> pd.DataFrame:
    """``board``'s rows in the order the trials ran: by the number in their folder's name, then by the
    timestamp of their first report (a trial that has not reported yet last)."""

    def key(trial_dir: str) -> tuple:
        number = trial_number(trial_dir)
        first = read_results(Path(trial_dir))[:1]
        started = first[0].get("timestamp", math.inf) if first else math.inf
        return (number is None, number or 0, started, Path(trial_dir).name)

    order = sorted(board.index, key=lambda i: key(board.at[i, "trial_dir"]))
    return board.loc[order].reset_index(drop=True)
