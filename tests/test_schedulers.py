"""The schedulers by name, and the grace period a search takes from its first finished trials (driven here
call by call, as Ray Tune's controller calls a scheduler; the end-to-end search runs one in test_search)."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler, TrialScheduler

from tests.test_search_parts import write_trial
from tskd_tune.search import schedulers
from tskd_tune.search.schedulers import PilotScheduler, make_scheduler

STOP, CONTINUE = TrialScheduler.STOP, TrialScheduler.CONTINUE


def run_curve(sched, trial_id: str, curve: list[float], complete: bool = True) -> list[str]:
    """Report ``curve`` (val Dice per epoch) for one trial; the scheduler's answer to each report."""
    trial = SimpleNamespace(trial_id=trial_id)
    sched.on_trial_add(None, trial)
    actions = []
    for epoch, value in enumerate(curve, 1):
        actions.append(sched.on_trial_result(None, trial, {"epoch": epoch, "val_dice": value}))
        if actions[-1] == STOP:
            break
    if complete or actions[-1] == STOP:
        sched.on_trial_complete(None, trial, {"epoch": epoch, "val_dice": value})
    return actions


def agreeing(final: float) -> list[float]:
    """Six epochs whose ranking is reversed at epoch 1 and matches the final one from epoch 2 on."""
    return [1.0 - final, final - 0.3, final - 0.2, final - 0.1, final - 0.05, final]


def test_schedulers_by_name(tiny, tmp_path):
    assert type(make_scheduler(tiny(search={"scheduler": "fifo"}), 6)) is FIFOScheduler
    asha = make_scheduler(tiny(search={"scheduler": "asha", "grace_period": 1}), 27)
    assert isinstance(asha, AsyncHyperBandScheduler) and len(asha._brackets) == 1
    hyper = make_scheduler(
        tiny(search={"scheduler": "hyperband", "grace_period": 1, "reduction_factor": 3}), 27
    )
    # brackets whose first rungs are at 1, 3 and 9 epochs, and one whose trials all run to the end
    assert len(hyper._brackets) == 4 and [b._rungs[-1][0] for b in hyper._brackets] == [1, 3, 9, 27]
    assert schedulers.brackets(2, 3, 40) == 3 and schedulers.brackets(30, 3, 40) == 1
    auto = make_scheduler(tiny(search={"scheduler": "hyperband", "grace_period": None}), 6, folder=tmp_path)
    assert isinstance(auto, PilotScheduler) and auto.pilot == 5 and auto.inner is None
    # a staged search's teacher stage protects top_teachers trials, also with a hand-set grace period
    staged = make_scheduler(tiny(search={"grace_period": 2, "top_teachers": 3}), 6, protect=3)
    assert isinstance(staged, PilotScheduler) and staged.pilot == 3 and staged.inner is not None


def test_the_grace_period_comes_from_the_pilot_trials(tiny, tmp_path, capsys):
    sched = make_scheduler(
        tiny(search={"scheduler": "asha", "grace_period": None, "pilot_trials": 5}), 6, folder=tmp_path
    )
    finals = [0.5, 0.6, 0.7, 0.8, 0.9]
    for i, final in enumerate(finals):  # the pilot: never stopped, however they rank
        assert set(run_curve(sched, f"p{i}", agreeing(final))) == {CONTINUE}
    note = json.loads((tmp_path / "grace.json").read_text())
    assert (
        note["grace_period"] == 2
        and note["pilot_trials"] == 5
        and note["spearman_at_grace"] == pytest.approx(1)
    )
    line = capsys.readouterr().out
    assert "early stopping: grace period 2 of 6 epochs, from the first 5 finished trials" in line
    # the pilot's curves already fill the rungs: a weak trial is stopped at epoch 2, a strong one runs on
    assert run_curve(sched, "weak", agreeing(0.45)) == [CONTINUE, STOP]
    assert STOP not in run_curve(sched, "strong", agreeing(0.95))[:-1]


def test_no_early_stopping_when_no_epoch_ranks_the_pilot_like_the_end(tiny, tmp_path, capsys):
    sched = make_scheduler(
        tiny(search={"scheduler": "hyperband", "grace_period": None, "pilot_trials": 4}), 4, folder=tmp_path
    )
    for i, final in enumerate([0.5, 0.6, 0.7, 0.8]):  # the ranking flips at the last epoch
        run_curve(sched, f"p{i}", [1 - final, 1 - final, 1 - final, final])
    assert json.loads((tmp_path / "grace.json").read_text())["grace_period"] is None
    assert "early stopping: off" in capsys.readouterr().out
    assert set(run_curve(sched, "late", [0.01, 0.01, 0.01, 0.01])) == {CONTINUE}


def test_protected_trials_run_to_the_end_with_a_hand_set_grace_period(tiny, tmp_path):
    sched = make_scheduler(
        tiny(search={"scheduler": "asha", "grace_period": 1}), 3, folder=tmp_path, protect=2
    )
    assert run_curve(sched, "a", [0.9, 0.9, 0.9]) == [CONTINUE] * 3
    assert run_curve(sched, "b", [0.1, 0.1, 0.1]) == [CONTINUE] * 3  # below the rung, but protected
    assert run_curve(sched, "c", [0.05, 0.05, 0.05]) == [STOP]
    assert not (tmp_path / "grace.json").exists()  # nothing was decided from the data


def test_a_restored_search_reads_its_pilot_back(tiny, tmp_path):
    """A resumed search unpickles the scheduler as it was built: the finished trials come from result.json."""
    for i, final in enumerate([0.5, 0.6, 0.7, 0.8, 0.9]):
        write_trial(tmp_path, i + 1, {"x": i}, agreeing(final))
    write_trial(tmp_path, 6, {"x": 6}, [0.2, 0.3], finished=False)  # running when the driver died
    sched = make_scheduler(tiny(search={"scheduler": "asha", "grace_period": None}), 6, folder=tmp_path)
    assert run_curve(sched, "new", agreeing(0.4)) == [CONTINUE, STOP]
    assert sched.inner is not None and sched.finished == ["id1", "id2", "id3", "id4", "id5"]
    assert json.loads((tmp_path / "grace.json").read_text())["grace_period"] == 2


def test_the_teacher_stage_protects_top_teachers(tiny, tmp_path):
    from tskd_tune.search.folder import SearchOptions, SearchRun
    from tskd_tune.search.tuner import _scheduler

    cfg = tiny(search={"grace_period": 1, "top_teachers": 2})
    opts = SearchOptions("s", tmp_path, "sqlite:///x.db")
    run = SearchRun("sqlite:///x.db", "p" * 32, tmp_path / "s", 0.0)
    assert _scheduler(cfg, opts, dataclasses.replace(run, stage="teacher"), 3).pilot == 2
    assert isinstance(_scheduler(cfg, opts, run, 3), AsyncHyperBandScheduler)  # a joint search: plain ASHA
