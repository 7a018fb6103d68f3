"""Warm start (``tskd-tune launch SPACE --warm-start NAME_OR_PATH``): the finished trials of earlier searches
join the new study as completed trials before any new proposal (optuna#1930, #3104), so the sampler
starts from what is known instead of from nothing.

A trial joins when it reported the new search's metric and has a value for every dotted path of the
new space, each one the new distribution can propose; every other trial is listed with the reason.
"""

from __future__ import annotations

import pandas as pd

from tskd_tune.config import Config
from tskd_tune.errors import TskdError


def warm_trials(cfg: Config, sources: list[str]) -> tuple[list[tuple[dict, float]], list[str], list[str]]:
    """(params and metric value of every trial that joins, one line per source saying what joined and
    what was skipped and why, the resolved source folders)."""
    from tskd_tune.report import leaderboard
    from tskd_tune.search.folder import resolve_search_path

    if len(cfg.search.objective_items()) > 1:
        raise TskdError(
            "--warm-start: a multi-objective study is not warm-started (Ray's OptunaSearch takes one value)"
        )
    if cfg.search.strategy == "staged":
        raise TskdError("--warm-start: a staged search is not warm-started yet; use search.strategy: joint")
    metric, mode = cfg.search.metric, cfg.search.mode
    joined, lines, folders = [], [], []
    for source in sources:
        folder = resolve_search_path(source)
        folders.append(str(folder))
        board = leaderboard(folder, metric, mode)
        done = board[board["state"] == "finished"] if not board.empty else board
        took, skipped = [], []
        for _, row in done.iterrows():
            params, why = _fit(row, cfg)
            if why is None and pd.notna(row.get(metric)):
                took.append((params, float(row[metric])))
            else:
                skipped.append(f"{row['trial_id']} ({why or f'no {metric}'})")
        joined += took
        lines.append(
            f"warm start from {folder}: {len(took)} finished trial(s) added to the study"
            + (f"; skipped {len(skipped)}: {', '.join(skipped)}" if skipped else "")
        )
    return joined, lines, folders


def _fit(row, cfg: Config) -> tuple[dict, str | None]:
    """The row's values on the new space's paths, or why the trial does not fit the new space."""
    params = {}
    for path, dist in cfg.search.space.items():
        value = row.get(path)
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return {}, f"no {path}"
        value = value.item() if hasattr(value, "item") else value
        if not dist.contains(value):
            return {}, f"{path}={value} outside {dist.describe()}"
        params[path] = value
    return params, None
