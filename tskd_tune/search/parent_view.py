"""What MLflow shows of a finished search: the parent run described by a markdown leaderboard and tagged with
its best child, the best child's own run (its tag, description and test score), and the shared runs-table view
that lists the trials with their scores."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from types import SimpleNamespace

from tskd_tune import tracking
from tskd_tune.config import Config
from tskd_tune.search.tuner import trial_name

VIEW_TAG = "mlflow.sharedViewState."
"""The experiment tag MLflow's "share" button writes a runs-table view to (the key follows)."""
TRAINING_UI = "workflowType=machine_learning"
"""Opens MLflow's UI on its model-training pages (its default is GenAI, where runs are "evaluation runs")."""


def describe_parent(c, parent: str, cfg: Config, name: str, board, best, summary: dict) -> str | None:
    """Tag the parent run with its best child (``tskd.best_run_id``, ``tskd.best_run_name``) and describe it
    with a markdown leaderboard (``mlflow.note.content``: the description MLflow's run page shows); returns
    the link of :func:`leaderboard_view` (None while MLflow is unreachable)."""
    from mlflow.entities import RunTag

    view = leaderboard_view(c, parent, cfg)
    tags = {"mlflow.note.content": leaderboard_note(cfg, name, board, best, summary, view)}
    best_run, best_name = best.get("mlflow_run_id"), run_name(best, cfg)
    if isinstance(best_run, str):
        tags |= {"tskd.best_run_id": best_run, "tskd.best_run_name": best_name}
    c.log_batch(parent, tags=[RunTag(k, v) for k, v in tags.items()])
    if not isinstance(best_run, str):
        return view
    # the best trial's own run says so (tag tskd.best, its description) and holds the test score measured for it
    metric = cfg.search.objective_items()[0][0]
    note = (
        f"**Best trial** of search `{name}`: {metric} {score_text(best[metric])}; test Dice {score_text(summary.get('test_dice'))} "
        "(its student on the test split, once, when the search ended). The search's leaderboard is the "
        "description of its parent run."
    )
    test = tracking.numeric({k: v for k, v in summary.items() if k.startswith("test_")})
    c.log_batch(
        best_run,
        metrics=[mlflow_metric(k, v) for k, v in test.items()],
        tags=[RunTag("tskd.best", "true"), RunTag("mlflow.note.content", note)],
    )
    try:  # a resumed search may have found a better trial than the one tagged best before
        flt = f"tags.`mlflow.parentRunId` = '{parent}' and tags.`tskd.best` = 'true'"
        before = c.search_runs([c.get_run(parent).info.experiment_id], filter_string=flt)
    except Exception as exc:  # noqa: BLE001 - the journal delivers the writes above; the old tag stays
        if not tracking.unreachable(exc):
            raise
        before = []
    for run in before:
        if run.info.run_id != best_run:
            was = f"Was the best trial of search `{name}` until the search was resumed; the best is now {best_name}."
            c.log_batch(
                run.info.run_id, tags=[RunTag("tskd.best", "false"), RunTag("mlflow.note.content", was)]
            )
    return view


def run_name(row, cfg: Config) -> str:
    """The MLflow run name of a leaderboard row's trial (``t007 T=3.7 kd=1.6``), from its folder and params."""
    folder = Path(row["trial_dir"])
    try:
        params = json.loads((folder / "params.json").read_text())
    except (OSError, ValueError):
        params = {}
    values = {k: params[k] for k in cfg.search.space if k in params}  # in the order the searcher samples them
    number = folder.name.split("_", 1)[0].lstrip("t")
    return trial_name(SimpleNamespace(experiment_tag=number, evaluated_params=values))


def leaderboard_note(
    cfg: Config, name: str, board, best, summary: dict, view: str | None, top: int = 10
) -> str:
    """The parent run's description, in markdown: the top trials with their scores and gain over the scratch
    student (the best in bold, each linked to its run), the reference trials, the best config's searched values.

    ``view``: the link of :func:`leaderboard_view`, or None (MLflow unreachable: no links).
    """
    objectives = cfg.search.objective_items()
    metric = objectives[0][0]
    columns = [m for m, _ in objectives[1:]] + ([] if "val_hd95" in dict(objectives) else ["val_hd95"])
    gain = board["gain_vs_scratch"].notna().any()
    counts = ", ".join(f"{n} {s}" for s, n in board["state"].value_counts().items())
    best_name = run_name(best, cfg)
    gains = f", {score_text(best['gain_vs_scratch'], sign=True)} over scratch" if gain else ""
    lines = [
        f"### Search `{name}`: {len(board)} trials ({counts})",
        "",
        f"Objective: {', '.join(f'{m} ({d})' for m, d in objectives)}. Best trial: **{best_name}**, {metric} "
        f"{score_text(best[metric])}{gains}; test Dice {score_text(summary.get('test_dice'))}.",
        "",
    ]
    if view:
        lines += [f"[This search's runs in one table]({view}), with their scores and searched values.", ""]
    lines += ["**Trials, best first**", ""]
    header = ["trial", "state", metric, *(["gain vs scratch"] if gain else []), *columns, "epochs"]
    lines += ["| " + " | ".join(header) + " |", "|:--|:--|" + "--:|" * (len(header) - 2)]
    for _, row in board.head(top).iterrows():
        label = run_name(row, cfg)
        if view and isinstance(row.get("mlflow_run_id"), str):
            label = f"[{label}]({view.split('/runs?', 1)[0]}/runs/{row['mlflow_run_id']}?{TRAINING_UI})"
        label = f"**{label}**" if row["trial_id"] == best["trial_id"] else label
        cells = [
            label,
            str(row["state"]),
            score_text(row[metric]),
            *([score_text(row["gain_vs_scratch"], sign=True)] if gain else []),
            *(score_text(row.get(m)) for m in columns),
            str(row["epoch"]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if len(board) > top:
        lines += ["", f"{len(board) - top} more in leaderboard.csv (this run's artifacts)."]
    refs = [m for m in cfg.search.baselines if f"reference_{m}_val_dice" in summary]
    if refs:
        lines += [
            "",
            "**Reference trials** (outside the search; scored on val and test)",
            "",
            "| reference | val_dice | test_dice | val_hd95 |",
            "|:--|--:|--:|--:|",
        ]
        lines += [
            "| "
            + " | ".join(
                [
                    m,
                    *(
                        score_text(summary.get(f"reference_{m}_{k}"))
                        for k in ("val_dice", "test_dice", "val_hd95")
                    ),
                ]
            )
            + " |"
            for m in refs
        ]
    searched = json.loads((Path(best["trial_dir"]) / "params.json").read_text())
    lines += ["", "**Best config**: the searched values", ""]
    lines += [f"- `{k}`: {_value(searched[k])}" for k in cfg.search.space if k in searched]
    lines += [
        "",
        "The whole config is `best.yaml` in this run's artifacts; every trial's is `config.yaml` in its run's.",
    ]
    return "\n".join(lines)


def leaderboard_view(c, parent: str, cfg: Config) -> str | None:
    """A link to the experiment's runs table showing this search's runs with the columns that
    compare them, as an MLflow shared view (the experiment tag ``mlflow.sharedViewState.<key>`` that MLflow's
    own "share" button writes); None while MLflow is unreachable."""
    objectives = cfg.search.objective_items()
    metric, mode = objectives[0]
    extra = [m for m, _ in objectives[1:]]
    columns = [
        *(
            f"metrics.`{m}`"
            for m in dict.fromkeys([metric, "gain_vs_scratch", *extra, "val_hd95", "test_dice"])
        ),
        *(f"params.`{p}`" for p in cfg.search.space),
        "tags.`tskd.status`",
    ]
    state = {  # the facets and the runs table's state, as MLflow's UI keeps them
        # the ranked trials only: a reference teacher (or a staged search's teacher stage) would top the students
        "searchFilter": f"tags.`mlflow.parentRunId` = '{parent}' and tags.`{tracking.KIND_TAG}` = 'trial'",
        "orderByKey": f"metrics.`{metric}`",
        "orderByAsc": mode == "min",
        "selectedColumns": [*columns, "attributes.`Duration`"],
        # the UI sizes columns by their values, which cuts the names: wide enough for the name
        "columnOrder": ["attributes.`Run Name`", *columns],
        "columnWidths": {"attributes.`Run Name`": 200}
        | {c: max(110, 8 * len(c.split("`")[1]) + 40) for c in columns},
        "runsHiddenMode": "SHOW_ALL",
    }
    key = f"tskd-{parent}"
    try:
        experiment = c.get_run(parent).info.experiment_id
        c.set_experiment_tag(experiment, f"{VIEW_TAG}{key}", json.dumps(state))
    except Exception as exc:  # noqa: BLE001 - a convenience: the note goes without the link
        if not tracking.unreachable(exc):
            raise
        return None
    return f"#/experiments/{experiment}/runs?viewStateShareKey={key}&{TRAINING_UI}"


def _value(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def score_text(value, sign: bool = False) -> str:
    if value is None or isinstance(value, float) and math.isnan(value):
        return "–"
    value = float(value)
    return f"{value:+.4f}" if sign else f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"


def mlflow_metric(key: str, value: float):
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), 0)
