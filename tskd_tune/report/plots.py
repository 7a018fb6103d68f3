"""The report's plots (PNG): Optuna's own (history, importances, parallel coordinates, Pareto front), drawn
from an in-memory study of the trials in the order they ran, and every trial's val Dice per epoch."""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from tskd_tune import states
from tskd_tune.report.board import read_results, run_order, trial_label

FEW_TRIALS = 10
"""Below this many trials, importances are printed with a caveat: a random forest over a handful of points
(what Optuna's evaluator fits) ranks parameters mostly by chance."""


def study(board: pd.DataFrame, space: dict, objectives: list[tuple[str, str]]):
    """An in-memory Optuna study of the search's trials, added in the order they ran, so that trial
    number ``i`` is the i-th trial started. A finished trial with a value in every objective and every sampled
    parameter inside ``space`` is COMPLETE; one the scheduler stopped is PRUNED, its last value kept as the
    intermediate value of the epoch it reached (a score after fewer epochs is not a final result: importances
    and plots rest on the finished trials only); any other (running, pending, errored) is FAIL, kept so that
    numbers match the run order. Each trial's ``user_attrs`` hold its ``name`` (``t007``) and ``trial_id``."""
    import optuna

    from tskd_tune.space import to_optuna

    dists = to_optuna(space)
    names = [m for m, _ in objectives]
    st = optuna.create_study(directions=["maximize" if d == "max" else "minimize" for _, d in objectives])
    for _, row in run_order(board).iterrows():
        attrs = {"name": trial_label(row), "trial_id": str(row["trial_id"])}
        trial = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, user_attrs=attrs)
        if not row[names].isna().any() and all(p in row and not pd.isna(row[p]) for p in dists):
            params = {
                p: (int(row[p]) if isinstance(d, optuna.distributions.IntDistribution) else row[p])
                for p, d in dists.items()
            }
            # a value outside today's space (edited since the trial ran) leaves the trial without a point
            with contextlib.suppress(ValueError):
                if row.get("state") == states.FINISHED:
                    trial = optuna.trial.create_trial(
                        params=params,
                        distributions=dists,
                        user_attrs=attrs,
                        values=[float(row[m]) for m in names],
                    )
                elif row.get("state") == states.STOPPED_EARLY and len(names) == 1:
                    trial = optuna.trial.create_trial(
                        state=optuna.trial.TrialState.PRUNED,
                        params=params,
                        distributions=dists,
                        user_attrs=attrs,
                        intermediate_values={int(row["epoch"]): float(row[names[0]])},
                    )
        st.add_trial(trial)
    return st


def completed(st) -> int:
    """How many of ``st``'s trials have values (what importances and the other plots rest on)."""
    import optuna

    return sum(t.state == optuna.trial.TrialState.COMPLETE for t in st.trials)


def optuna_axes(board: pd.DataFrame, space: dict, objectives: list[tuple[str, str]]) -> dict:
    """Optuna's plots of the first objective (and the Pareto front of several), ``name -> Axes``, axes named
    after the metrics; a plot Optuna cannot draw (too few trials, no variation) is left out."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")
    import optuna
    import optuna.visualization.matplotlib as ovm
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    metric = objectives[0][0]
    first = study(board, space, objectives[:1])
    names = [t.user_attrs["name"] for t in first.trials]
    n = completed(first)
    plots = {
        "history": (first, partial(ovm.plot_optimization_history, target_name=metric)),
        "parallel_coordinates": (first, partial(ovm.plot_parallel_coordinate, target_name=metric)),
    }
    if n >= 2 and len(space) >= 2:
        plots["importances"] = (first, partial(ovm.plot_param_importances, target_name=metric))
    if len(objectives) > 1:
        shown = objectives if len(objectives) <= 3 else objectives[:2]
        front = study(board, space, shown)
        plots["pareto_front"] = (front, partial(ovm.plot_pareto_front, target_names=[m for m, _ in shown]))
    drawn = {}
    for name, (st, fn) in plots.items():
        if not completed(st):
            continue
        try:
            ax = fn(st)
        except (ValueError, RuntimeError) as exc:  # e.g. importances of a space with no variation
            print(f"skipped plot {name}: {exc}")
            continue
        ax = ax.flat[0] if isinstance(ax, np.ndarray) else ax
        if name == "history":
            # the x axis in trial names (t007), the names of the leaderboard and the curves
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
            ax.xaxis.set_major_formatter(
                FuncFormatter(
                    lambda x, _: names[int(x)] if float(x).is_integer() and 0 <= x < len(names) else ""
                )
            )
            ax.set_xlabel("trial, in the order they ran")
            ax.set_title(f"{metric} of each trial and the best so far")
        elif name == "importances":
            few = f" (fewer than {FEW_TRIALS}: a rough hint, not a finding)" if n < FEW_TRIALS else ""
            ax.set_title(f"Hyperparameter importances for {metric}\nfrom {n} trials{few}", loc="left")
        elif name == "parallel_coordinates":
            # Optuna's Blues fades the worst trials to white on its grey background: viridis keeps every line
            for lines in ax.collections:
                lines.set_cmap("viridis_r" if objectives[0][1] == "min" else "viridis")
            ax.set_title(f"Each line a trial, coloured by {metric}", y=1.03)
        drawn[name] = ax
    return drawn


def optuna_plots(board: pd.DataFrame, space: dict, objectives: list[tuple[str, str]], out_dir: Path) -> dict:
    """:func:`optuna_axes` as PNGs in ``out_dir``; returns ``name -> path``."""
    import matplotlib.pyplot as plt

    written = {}
    for name, ax in optuna_axes(board, space, objectives).items():
        fig = ax.figure
        fig.set_size_inches(9, 5)
        fig.tight_layout()
        written[name] = out_dir / f"{name}.png"
        fig.savefig(written[name], dpi=100)
        plt.close(fig)
    return written


def curves_axes(board: pd.DataFrame, best_id: str, refs: dict, metric: str = "val_dice"):
    """``metric`` over epochs, one line per trial in run order, labelled with its name as in the leaderboard,
    the best trial black and thick, the reference trials dashed; None when no trial has reported ``metric``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = []
    for _, row in run_order(board).iterrows():
        points = [
            (r["epoch"], r[metric])
            for r in read_results(Path(row["trial_dir"]))
            if r.get(metric) is not None and r.get("epoch") is not None
        ]
        if points:
            lines.append((trial_label(row), str(row["trial_id"]) == str(best_id), points))
    if not lines:
        return None
    entries = len(lines) + len(refs)
    many = entries > 24  # the legend takes two columns: a wider figure keeps the plot itself as wide
    fig, ax = plt.subplots(figsize=(12.5 if many else 10, 6 if many else 5.5))
    colours = plt.get_cmap("tab20" if len(lines) > 10 else "tab10")
    for i, (label, best, points) in enumerate(lines):
        x, y = zip(*points, strict=True)
        text = f"{label}  {y[-1]:.4f}" + ("  (best)" if best else "")
        if best:
            ax.plot(x, y, color="black", lw=3.2, marker="o", ms=5, label=text, zorder=10)
        else:
            ax.plot(x, y, color=colours(i % colours.N), lw=1.4, alpha=0.8, marker=".", label=text)
    for method, style in (("scratch", ":"), ("teacher", "--")):
        value = refs.get(method, {}).get(metric)
        if value is not None:
            ax.axhline(value, color="dimgray", ls=style, lw=1.5, label=f"{method} reference  {value:.4f}")
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per epoch of every trial")
    ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=8 if many else 9,
        ncol=2 if many else 1,
        title="trial  last value",
        title_fontsize=9,
        frameon=False,
    )
    return ax


def curves_plot(
    board: pd.DataFrame, best_id: str, refs: dict, path: Path, metric: str = "val_dice"
) -> Path | None:
    """:func:`curves_axes` as a PNG at ``path``; None (and no file) when there is nothing to draw."""
    import matplotlib.pyplot as plt

    ax = curves_axes(board, best_id, refs, metric)
    if ax is None:
        return None
    ax.figure.tight_layout()
    ax.figure.savefig(path, dpi=100)
    plt.close(ax.figure)
    return path
