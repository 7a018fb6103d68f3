"""Hyperparameter importances next to the runs (ray#25522): per objective, by Optuna's default evaluator."""

from __future__ import annotations

import warnings

import pandas as pd

from tskd_tune.report.plots import FEW_TRIALS, completed, study


def importances(board: pd.DataFrame, space: dict, objectives: list[tuple[str, str]]) -> dict:
    """``{"evaluator", "trials", "objectives": {metric: {path: importance}}}``, the importances of the searched
    paths for each objective over the completed trials (empty when there are fewer than two, or no
    variation to attribute). ``caveat`` is set below :data:`FEW_TRIALS` trials."""
    import optuna

    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    st = study(board, space, objectives)
    n = completed(st)
    out = {"evaluator": type(evaluator).__name__, "trials": n, "objectives": {}}
    if n < FEW_TRIALS:
        out["caveat"] = f"from {n} trials: too few to rank the parameters; read them as a hint"
    if n < 2 or not space:
        return out
    for i, (metric, mode) in enumerate(objectives):
        # PED-ANOVA ranks what leads to *low* target values (it warns so): a maximised metric is negated
        sign = -1.0 if mode == "max" else 1.0
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="PedAnovaImportanceEvaluator computes")
                values = optuna.importance.get_param_importances(
                    st, evaluator=evaluator, target=lambda t, i=i, s=sign: s * t.values[i]
                )
        except (ValueError, RuntimeError):  # no variation, or a parameter that never changed
            continue
        out["objectives"][metric] = {k: float(v) for k, v in values.items()}
    return out


def top(result: dict, k: int = 3) -> list[tuple[str, float]]:
    """The ``k`` most important paths of the first objective."""
    first = next(iter(result.get("objectives", {}).values()), {})
    return sorted(first.items(), key=lambda kv: -kv[1])[:k]
