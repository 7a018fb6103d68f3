"""Ray's OptunaSearch telling the study what happened to each trial (a module of its own: Tune pickles the
searcher, so its class must be importable by name, and this module imports Ray at the top)."""

from __future__ import annotations

import warnings

from ray.tune.result import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch


def finished(result: dict | None) -> bool:
    """Whether a trial's last result is its final one (``trainable.Reporter.final`` adds the ``final_*``
    metrics to it); a trial the scheduler stopped ended on an intermediate epoch's result."""
    return bool(result) and any(k.startswith("final_") for k in result)


class StudySearch(OptunaSearch):
    """COMPLETE only for a trial that ran to its end; PRUNED for one the scheduler stopped (with the per-epoch
    values it reported, which Optuna keeps as intermediate values and TPE reads as such); FAIL for an error.
    Ray's own OptunaSearch tells COMPLETE with a stopped (or failed) trial's last score, which the sampler, the
    study storage, optuna-dashboard and ``--warm-start`` would all take for a final result."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        # Ray hands the result a trial ended on to on_trial_complete only (not on_trial_result): it is the
        # last intermediate value, of a stopped trial in particular
        if result and not error and trial_id in self._ot_trials and not isinstance(self.metric, list):
            step, value = result.get(TRAINING_ITERATION), result.get(self.metric)
            if step is not None and value is not None:
                with warnings.catch_warnings():  # a step reported already is kept as it was (Optuna warns)
                    warnings.simplefilter("ignore")
                    self._ot_trials[trial_id].report(value, step)
        # without a value, Ray's OptunaSearch tells FAIL for an error and PRUNED otherwise
        super().on_trial_complete(trial_id, result if not error and finished(result) else None, error)
