"""Leaderboard and plots of a search, read from its folder (works while the search runs)."""

from __future__ import annotations

import html
import json
import os
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from tskd_tune import states
from tskd_tune.errors import TskdError
from tskd_tune.faults import FAILED_DIR


def _read_results(trial_dir: Path) -> list[dict]:
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
        results = _read_results(trial_dir)
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
        return pd.DataFrame(columns=list(dict.fromkeys(["trial_id", "state", "epoch", metric, "val_hd95", *extra,
                                                        "val_dice", "mlflow_run_id", "trial_dir"])))  # fmt: skip
    return board.sort_values(metric, ascending=(mode == "min"), na_position="last").reset_index(drop=True)


def trial_state(trial_dir: Path, results: list[dict], ended: bool) -> str:
    """The trial's state, in the words of :mod:`tskd_tune.states` (its MLflow run's ``tskd.status``).

    ``results``: its reported results (Ray's result.json); ``ended``: the search has ended.
    """
    if (trial_dir / "error.txt").is_file() or (trial_dir / "error.pkl").is_file():
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
    board.insert(board.columns.get_loc(objectives[0][0]) + 1, "gain_vs_scratch",
                 pd.to_numeric(board["val_dice"], errors="coerce") - scratch)  # fmt: skip
    return board


def best_trial(board: pd.DataFrame) -> pd.Series:
    """The search's best trial: the first row of ``board`` (best first, as :func:`objective_board` sorts
    it) whose ``state`` is ``finished``, or the first row when no trial ran to the end.

    A trial stopped early (by ASHA) scored after fewer epochs and has no student to test or export, so
    it is passed over while a finished one exists. ``board`` must have a row.
    """
    done = board[board["state"] == states.FINISHED]
    return (done if not done.empty else board).iloc[0]


def _study(board: pd.DataFrame, space: dict, objectives: list[tuple[str, str]]):
    """An in-memory Optuna study holding the finished trials, for Optuna's own plots."""
    import optuna

    from tskd_tune.space import to_optuna

    dists = to_optuna(space)
    names = [m for m, _ in objectives]
    study = optuna.create_study(directions=["maximize" if d == "max" else "minimize" for _, d in objectives])
    for _, row in board.iterrows():
        if row[names].isna().any() or not all(p in row and not pd.isna(row[p]) for p in dists):
            continue
        params = {
            p: (int(row[p]) if isinstance(d, optuna.distributions.IntDistribution) else row[p])
            for p, d in dists.items()
        }
        study.add_trial(
            optuna.trial.create_trial(
                params=params, distributions=dists, values=[float(row[m]) for m in names]
            )
        )
    return study


def write_report(search_path: Path, out_dir: Path, space: dict, objectives: list[tuple[str, str]]) -> dict:
    """leaderboard.csv, Optuna plots (PNG) and report.html in ``out_dir``; returns what was written.

    With several objectives the history, importance and parallel-coordinate plots show the first one,
    and a Pareto-front plot shows all of them (the first two when there are more than three).
    """
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    import optuna.visualization.matplotlib as ovm

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    board = objective_board(search_path, objectives)
    if board.empty:
        raise TskdError(f"{search_path}: no trials yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {"leaderboard": out_dir / "leaderboard.csv"}
    board.drop(columns=["trial_dir", "mlflow_run_id"]).to_csv(written["leaderboard"], index=False)
    study = _study(board, space, objectives[:1])
    plots = {"history": (study, ovm.plot_optimization_history),
             "parallel_coordinates": (study, ovm.plot_parallel_coordinate)}  # fmt: skip
    if len(study.trials) >= 2 and len(space) >= 2:
        plots["importances"] = (study, ovm.plot_param_importances)
    if len(objectives) > 1:
        shown = objectives if len(objectives) <= 3 else objectives[:2]
        front = _study(board, space, shown)
        plots["pareto_front"] = (front, partial(ovm.plot_pareto_front, target_names=[m for m, _ in shown]))
    for name, (st, fn) in plots.items():
        if not st.trials:
            continue
        try:
            ax = fn(st)
        except (ValueError, RuntimeError) as exc:  # e.g. importances of a space with no variation
            print(f"skipped plot {name}: {exc}")
            continue
        fig = (ax.flat[0] if isinstance(ax, np.ndarray) else ax).figure
        fig.set_size_inches(9, 5)
        fig.tight_layout()
        written[name] = out_dir / f"{name}.png"
        fig.savefig(written[name], dpi=100)
        plt.close(fig)
    images = "".join(
        f'<h2>{html.escape(k)}</h2><img src="{p.name}">' for k, p in written.items() if p.suffix == ".png"
    )
    refs = references(search_path)
    ref_rows = "".join(f"<li>reference <b>{html.escape(m)}</b>: val Dice {r.get('val_dice', float('nan')):.4f}, "
                       f"test Dice {r.get('test_dice', float('nan')):.4f}</li>" for m, r in refs.items())  # fmt: skip
    ref_html = (f"<p>Reference trials (outside the search; <code>gain_vs_scratch</code> is each trial's val Dice "
                f"minus the scratch student's):</p><ul>{ref_rows}</ul>") if refs else ""  # fmt: skip
    page = (f"<html><head><meta charset='utf-8'><title>{html.escape(Path(search_path).name)}</title></head><body>"
            f"<h1>search {html.escape(Path(search_path).name)}</h1>{ref_html}"
            f"{board.drop(columns=['trial_dir', 'mlflow_run_id']).to_html(index=False)}"
            f"{images}</body></html>")  # fmt: skip
    written["html"] = out_dir / "report.html"
    tmp = written["html"].with_name(".report.html.tmp")
    tmp.write_text(page)
    os.replace(tmp, written["html"])
    return written
