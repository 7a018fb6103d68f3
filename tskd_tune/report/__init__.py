"""A search's report, read from its folder (works while the search runs).

- ``board``: the leaderboard (one best-trial rule), the reference trials, the order the trials ran in
- ``plots``: Optuna's plots from a study of the trials in run order; every trial's val Dice per epoch
- ``page``: ``write_report``: the CSV, the plots, ``importances.json`` and a self-contained ``report.html``
- ``importance``: hyperparameter importances per objective (Optuna's default evaluator, named)
"""

from tskd_tune.report.board import (
    best_trial,
    last_failure,
    leaderboard,
    leaderboard_csv,
    objective_board,
    pareto_front,
    read_results,
    references,
    run_order,
    test_dice,
    trial_label,
    trial_number,
    trial_state,
)
from tskd_tune.report.importance import importances, top
from tskd_tune.report.links import run_links
from tskd_tune.report.page import write_report
from tskd_tune.report.plots import curves_axes, curves_plot, optuna_axes, optuna_plots, study

__all__ = [
    "best_trial",
    "importances",
    "top",
    "curves_axes",
    "curves_plot",
    "last_failure",
    "leaderboard",
    "leaderboard_csv",
    "objective_board",
    "optuna_axes",
    "optuna_plots",
    "pareto_front",
    "read_results",
    "references",
    "run_links",
    "run_order",
    "study",
    "test_dice",
    "trial_label",
    "trial_number",
    "trial_state",
    "write_report",
]
