"""Trial schedulers by name (``search.scheduler``), and the grace period taken from the search's own trials.

``asha`` and ``hyperband`` are Ray's asynchronous successive halving: one bracket (ASHA), or every bracket
that fits between the grace period and the last epoch (asynchronous Hyperband, Li et al. 2020: each
trial joins a bracket whose first rung is ``grace * reduction_factor**s``, so some trials are judged
late). ``fifo`` runs every trial to the end.

With ``search.grace_period`` unset, the grace period comes from the data: the first
``search.pilot_trials`` trials to finish run to the end, and the grace period is the first epoch from
which their scores rank them like their final scores (Spearman >= :data:`AUTO_TRUST` at every later
epoch). Their curves fill the rungs, so the trials after them are judged at once. When no epoch ranks
them that well, no trial is stopped. A hand-set grace period wins; the ``protect`` first trials still
run to the end (the staged search's teachers: it needs ``top_teachers`` finished ones).
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from tskd_tune import fidelity
from tskd_tune.cache import write_json
from tskd_tune.config import Config
from tskd_tune.search.folder import GRACE_FILE, trial_id_of

AUTO_TRUST = 0.9
"""Rank correlation a grace period from the data needs at every epoch from it on. Not fidelity's 0.6 floor:
on the demo space the least grace at 0.6 (14 of 40 epochs, 10 trials) let ASHA stop the best config, and the
hand-set periods that kept it sit where the correlation reaches 0.9 (docs/BENCHMARKS.md, grace periods)."""


def brackets(grace: int, reduction_factor: float, max_t: int) -> int:
    """Hyperband's brackets over ``grace..max_t``: one per rung a trial could start being judged at."""
    return max(1, int(math.log(max_t / grace) / math.log(reduction_factor) + 1e-9) + 1)


def successive_halving(cfg: Config, max_t: int, grace: int, hyperband: bool) -> AsyncHyperBandScheduler:
    s = cfg.search  # config validation refuses ASHA and Hyperband with several objectives
    grace = min(grace, max_t)
    return AsyncHyperBandScheduler(
        time_attr="epoch",
        metric=s.metric,
        mode=s.mode,
        max_t=max_t,
        grace_period=grace,
        reduction_factor=s.reduction_factor,
        brackets=brackets(grace, s.reduction_factor, max_t) if hyperband else 1,
    )


class PilotScheduler(FIFOScheduler):
    """ASHA or async Hyperband that lets its first ``pilot`` trials run to the end and, without a hand-set
    ``grace``, takes the grace period from their curves once ``pilot`` trials have finished.

    It runs in the driver and is pickled with the Tuner (``tuner.pkl``): a restored search starts from
    the pickled, empty state and reads the finished trials' curves back from ``folder``."""

    def __init__(
        self,
        cfg: Config,
        max_t: int,
        *,
        hyperband: bool,
        pilot: int,
        folder: Path | None,
        grace: int | None = None,
        stage: str = "search",
    ):
        super().__init__()
        self.cfg, self.max_t, self.hyperband, self.pilot = cfg, max_t, hyperband, pilot
        self.folder, self.stage = Path(folder) if folder else None, stage
        # Tune's TrialScheduler.metric reads these
        self._metric, self._mode = cfg.search.metric, cfg.search.mode
        self.order: list[str] = []  # trial ids in the order they were added: the first `pilot` are protected
        self.curves: dict[str, dict[int, float]] = {}
        self.finished: list[str] = []
        self.inner = successive_halving(cfg, max_t, grace, hyperband) if grace is not None else None
        self.decided = grace is not None
        self.seeded = False

    # ------------------------------------------------------------------------------------------ Tune's calls
    def set_search_properties(self, metric, mode, **spec) -> bool:
        return True  # metric and mode come from the config

    def on_trial_add(self, tune_controller, trial) -> None:
        self._seed()
        if trial.trial_id not in self.order:
            self.order.append(trial.trial_id)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._seed()
        epoch, value = result.get("epoch"), result.get(self._metric)
        if not isinstance(epoch, int | float) or not isinstance(value, int | float):
            return TrialScheduler.CONTINUE
        self.curves.setdefault(trial.trial_id, {})[int(epoch)] = float(value)
        if self.inner is None:
            return TrialScheduler.CONTINUE
        if trial.trial_id not in self.inner._trial_info:
            self.inner.on_trial_add(tune_controller, trial)
        action = self.inner.on_trial_result(tune_controller, trial, result)
        # a protected trial's scores fill the rungs, but it runs on (it ends by itself at max_t)
        return TrialScheduler.CONTINUE if self._protected(trial.trial_id) else action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._seed()
        if (
            isinstance(result, dict)
            and isinstance(result.get(self._metric), int | float)
            and "epoch" in result
        ):
            self.curves.setdefault(trial.trial_id, {})[int(result["epoch"])] = float(result[self._metric])
        if self.inner is not None and trial.trial_id in self.inner._trial_info:
            self.inner.on_trial_complete(tune_controller, trial, result)
        if self.max_t in self.curves.get(trial.trial_id, {}) and trial.trial_id not in self.finished:
            self.finished.append(trial.trial_id)
        if not self.decided and len(self.finished) >= self.pilot:
            self._decide()

    def on_trial_error(self, tune_controller, trial) -> None:
        self.on_trial_remove(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial) -> None:
        if self.inner is not None and trial.trial_id in self.inner._trial_info:
            self.inner.on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return (
            self.inner.debug_string()
            if self.inner is not None
            else f"pilot: {len(self.finished)}/{self.pilot} finished"
        )

    # ------------------------------------------------------------------------------------------ the decision
    def _protected(self, trial_id: str) -> bool:
        return trial_id in self.order[: self.pilot]

    def _decide(self) -> None:
        """The grace period from the finished trials' curves; their scores fill the new rungs."""
        self.decided = True
        curves = [self.curves[t] for t in self.finished]
        grace, corr = fidelity.grace_from_data(curves, self.max_t, trust=AUTO_TRUST)
        at = next((r["spearman"] for r in corr if r["epoch"] == grace), None)
        note = {
            "stage": self.stage,
            "grace_period": grace,
            "pilot_trials": len(curves),
            "max_t": self.max_t,
            "trust": AUTO_TRUST,
            "spearman_at_grace": at,
            "rank_correlation": {r["epoch"]: r["spearman"] for r in corr if not math.isnan(r["spearman"])},
        }
        if grace is not None:
            self.inner = successive_halving(self.cfg, self.max_t, grace, self.hyperband)
            for trial_id in self.finished:  # the finished curves fill the rungs the next trials are judged at
                self._replay(trial_id)
        if self.folder is not None:
            write_json(self.folder / GRACE_FILE, note)
        print(grace_line(note), flush=True)

    def _replay(self, trial_id: str) -> None:
        ghost = SimpleNamespace(trial_id=trial_id)
        self.inner.on_trial_add(None, ghost)
        for epoch, value in sorted(self.curves[trial_id].items()):
            self.inner.on_trial_result(None, ghost, {"epoch": epoch, self._metric: value})
        self.inner.on_trial_remove(None, ghost)

    def _seed(self) -> None:
        """Once, on the first call: a restored search's finished trials, read back from their result.json."""
        if self.seeded:
            return
        self.seeded = True
        if self.folder is None or not self.folder.is_dir():
            return
        for name, curve in sorted(fidelity.histories(self.folder, self._metric).items()):
            trial_id = trial_id_of(name)
            self.order.append(trial_id)
            self.curves[trial_id] = dict(curve)
            if self.max_t in curve:
                self.finished.append(trial_id)
        if self.inner is not None:
            for trial_id in self.finished:
                self._replay(trial_id)
        elif not self.decided and len(self.finished) >= self.pilot:
            self._decide()


def grace_line(note: dict) -> str:
    """The one line a search prints when it has taken its grace period from its pilot trials."""
    where = "" if note.get("stage", "search") == "search" else f" ({note['stage']} stage)"
    if note["grace_period"] is None:
        return (
            f"early stopping{where}: off; over the first {note['pilot_trials']} finished trials no epoch before "
            f"{note['max_t']} ranks them like their final score (rank correlation >= {note['trust']}), so every "
            f"trial runs to the end"
        )
    return (
        f"early stopping{where}: grace period {note['grace_period']} of {note['max_t']} epochs, from the first "
        f"{note['pilot_trials']} finished trials (rank correlation with their final score >= {note['trust']} "
        f"from epoch {note['grace_period']} on; {note['spearman_at_grace']:.2f} there)"
    )


def make_scheduler(
    cfg: Config, max_t: int, *, folder: Path | None = None, protect: int = 0, stage: str = "search"
):
    """The Tune scheduler of ``search.scheduler`` over ``max_t`` reported epochs. ``protect``: this many first
    trials run to the end whatever the scheduler (at least ``search.pilot_trials`` when the grace period comes
    from the data); ``folder``: the experiment's folder, where the decision is written and read back."""
    s = cfg.search
    if s.scheduler == "fifo" or max_t < 2:
        return FIFOScheduler()
    hyperband = s.scheduler == "hyperband"
    if s.grace_period is not None and protect == 0:
        return successive_halving(cfg, max_t, s.grace_period, hyperband)
    pilot = max(protect, s.pilot_trials) if s.grace_period is None else protect
    return PilotScheduler(
        cfg, max_t, hyperband=hyperband, pilot=pilot, folder=folder, grace=s.grace_period, stage=stage
    )
