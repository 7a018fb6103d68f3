"""Parts of the search that need no Ray run: the early-stopping rank correlation, warm starts, the staged
search's two configs and its choice of teachers. Search folders are written here as Ray Tune and the
trials write them (params.json, result.json, outputs/metrics.json)."""

import json
import math
from pathlib import Path

import pytest

from tskd_tune import fidelity
from tskd_tune.errors import TskdError


def write_trial(search: Path, number: int, params: dict, curve: list[float], finished: bool = True) -> Path:
    """A trial folder as Ray Tune and run_trial leave it: params, one result line per epoch, outputs."""
    folder = search / f"t{number:03d}_id{number}"
    folder.mkdir(parents=True)
    (folder / "params.json").write_text(json.dumps(params))
    rows = [
        {"trial_id": f"id{number}", "epoch": e, "val_dice": v, "timestamp": 1000 + number * 100 + e}
        for e, v in enumerate(curve, 1)
    ]
    (folder / "result.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if finished:
        (folder / "outputs").mkdir()
        (folder / "outputs" / "metrics.json").write_text(json.dumps({"val_dice": curve[-1]}))
    return folder


def test_rungs_are_asha_milestones():
    assert fidelity.rungs(2, 3, 30) == [2, 6, 18]
    assert fidelity.rungs(4, 2, 8) == [4]


def test_rank_correlation_at_each_rung_over_finished_trials(tmp_path):
    # early ranks agree with final ranks at epoch 2, and are reversed at epoch 1
    finals = [0.5, 0.6, 0.7, 0.8]
    for i, final in enumerate(finals):
        write_trial(tmp_path, i + 1, {"x": i}, [1.0 - final, final - 0.1, final - 0.05, final])
    write_trial(tmp_path, 9, {"x": 9}, [0.9], finished=False)  # stopped at the first rung: not counted
    out = fidelity.rank_correlations(tmp_path, "val_dice", [1, 2], max_t=4)
    assert out == [
        {"epoch": 1, "spearman": pytest.approx(-1.0), "trials": 4},
        {"epoch": 2, "spearman": pytest.approx(1.0), "trials": 4},
    ]
    line = fidelity.warning(out, "val_dice")
    assert (
        line.startswith("warning: early stopping may stop the wrong trials here") and "-1.00 over 4" in line
    )
    assert fidelity.warning(out[1:], "val_dice") is None
    assert fidelity.warning([out[0] | {"trials": 3}], "val_dice") is None  # three trials: noise, no warning
    few = fidelity.rank_correlations(tmp_path, "val_dice", [1], max_t=9)
    assert math.isnan(few[0]["spearman"]) and few[0]["trials"] == 0


def _earlier_search(tmp_path: Path) -> Path:
    folder = tmp_path / "runs" / "old"
    folder.mkdir(parents=True)
    (folder / "search.json").write_text("{}")
    write_trial(folder, 1, {"distill.temperature": 2.0, "student.lr": 0.001}, [0.5, 0.6])
    write_trial(
        folder, 2, {"distill.temperature": 9.0, "student.lr": 0.001}, [0.5, 0.7]
    )  # outside the new range
    write_trial(folder, 3, {"distill.temperature": 3.0}, [0.5, 0.65])  # lacks student.lr
    write_trial(folder, 4, {"distill.temperature": 4.0, "student.lr": 0.002}, [0.4], finished=False)
    return folder


def test_warm_start_takes_the_finished_trials_that_fit_the_new_space(tiny, tmp_path):
    from tskd_tune.search.warm import warm_trials

    folder = _earlier_search(tmp_path)
    space = {
        "distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0},
        "student.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    }
    joined, lines, folders = warm_trials(tiny(search={"space": space}), [str(folder)])
    assert joined == [({"distill.temperature": 2.0, "student.lr": 0.001}, 0.6)] and folders == [str(folder)]
    assert lines == [
        f"warm start from {folder}: 1 finished trial(s) added to the study; skipped 2: "
        "id2 (distill.temperature=9.0 outside uniform(low=1.0, high=8.0)), id3 (no student.lr)"
    ]
    with pytest.raises(TskdError, match=r"^.*no search found"):
        warm_trials(tiny(search={"space": space}), [str(tmp_path / "nothing")])


def test_warm_trials_join_the_study_before_any_proposal(tiny, tmp_path):
    import optuna

    from tskd_tune.search.folder import SearchOptions
    from tskd_tune.search.tuner import make_searcher

    journal = tmp_path / "study.log"
    cfg = tiny(
        search={
            "space": {"distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0}},
            "study_storage": str(journal),
        }
    )
    opts = SearchOptions("warm", tmp_path, "sqlite:///x.db")
    make_searcher(
        cfg,
        opts,
        resume=False,
        warm=[({"distill.temperature": 2.5}, 0.61), ({"distill.temperature": 7.0}, 0.4)],
    )
    study = optuna.load_study(
        study_name="warm",
        storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal))),
    )
    assert [(t.params, t.value, t.state.name) for t in study.trials] == [
        ({"distill.temperature": 2.5}, 0.61, "COMPLETE"),
        ({"distill.temperature": 7.0}, 0.4, "COMPLETE"),
    ]


def test_distribution_contains():
    from pydantic import TypeAdapter

    from tskd_tune.space import Distribution

    dist = lambda d: TypeAdapter(Distribution).validate_python(d)  # noqa: E731
    q = dist({"type": "quniform", "low": 0.0, "high": 2.0, "q": 0.5})
    assert q.contains(1.5) and not q.contains(1.2) and not q.contains(2.5)
    n = dist({"type": "int", "low": 4, "high": 32, "step": 4})
    assert n.contains(8) and n.contains(8.0) and not n.contains(9) and not n.contains(36)
    c = dist({"type": "choice", "values": [2, "x", True]})
    assert c.contains(2) and c.contains(2.0) and c.contains("x") and not c.contains(1) and not c.contains(3)


def test_staged_search_configs(tiny):
    from tskd_tune.search import staged

    space = {
        "teacher.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0},
    }
    cfg = tiny(
        teacher={"epochs": 2},
        student={"epochs": 4},
        search={
            "strategy": "staged",
            "space": space,
            "teacher_trials": 5,
            "grace_period": 3,
            "baselines": ["scratch"],
        },
    )
    first = staged.teacher_stage(cfg)
    assert first.distill.method == "teacher" and list(first.search.space) == ["teacher.lr"]
    assert first.search.num_samples == 5 and first.search.grace_period == 2 and first.search.baselines == []
    assert first.search.strategy == "joint"  # each stage is a plain search of its own space
    second = staged.student_stage(
        cfg, {"t002 lr=0.001": {"teacher.lr": 0.001}, "t004 lr=0.003": {"teacher.lr": 0.003}}
    )
    assert list(second.search.space) == ["distill.temperature", staged.CHOICE]
    assert second.search.space[staged.CHOICE].values == ["t002 lr=0.001", "t004 lr=0.003"]


def test_staged_search_chooses_the_best_finished_teachers(tiny, tmp_path):
    from tskd_tune.search import staged
    from tskd_tune.search.folder import SearchOptions

    space = {
        "teacher.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
        "distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0},
    }
    cfg = tiny(search={"strategy": "staged", "space": space, "top_teachers": 2})
    opts = SearchOptions("s", tmp_path, "sqlite:///x.db")
    stage = opts.path / staged.TEACHER_STAGE
    write_trial(stage, 1, {"teacher.lr": 0.001}, [0.3, 0.5])
    write_trial(stage, 2, {"teacher.lr": 0.002}, [0.4, 0.8])
    write_trial(stage, 3, {"teacher.lr": 0.003}, [0.9], finished=False)  # stopped early: not a teacher to use
    write_trial(stage, 4, {"teacher.lr": 0.004}, [0.2, 0.6])
    assert staged.chosen_teachers(opts) is None
    teachers = staged.choose_teachers(cfg, opts)
    assert teachers == {"t002 lr=0.002": {"teacher.lr": 0.002}, "t004 lr=0.004": {"teacher.lr": 0.004}}
    assert staged.chosen_teachers(opts) == teachers  # what a resumed search reads back
    assert (opts.path / "teacher_leaderboard.csv").read_text().count("\n") == 5


def test_fewer_finished_teachers_than_asked_for_are_named(tiny):
    from tskd_tune.search import staged

    cfg = tiny(
        search={
            "strategy": "staged",
            "top_teachers": 2,
            "teacher_trials": 3,
            "space": {"teacher.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
        }
    )
    note = staged.fewer_teachers(cfg, {"t001 lr=0.001": {"teacher.lr": 0.001}})
    assert note.startswith("note: search.top_teachers is 2, but only 1 teacher(s)") and "failed" in note
    assert staged.fewer_teachers(cfg, {"a": {}, "b": {}}) is None


def test_staged_needs_teacher_knobs_and_ts_kd(tiny):
    with pytest.raises(TskdError, match="search.strategy: staged searches the teacher.. knobs first"):
        tiny(
            search={
                "strategy": "staged",
                "space": {"student.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}},
            }
        )


def test_importances_name_the_evaluator_and_rank_what_drives_the_score(tmp_path):
    import numpy as np

    from tskd_tune.report import importances, objective_board, top
    from tskd_tune.space import Distribution

    rng = np.random.default_rng(0)
    for i in range(12):  # val_dice follows x; y is noise
        x, y = float(rng.uniform(1, 8)), float(rng.uniform(1, 8))
        write_trial(tmp_path, i + 1, {"x": x, "y": y}, [0.1, 0.05 * x])
    from pydantic import TypeAdapter

    space = {
        p: TypeAdapter(Distribution).validate_python({"type": "uniform", "low": 1.0, "high": 8.0})
        for p in "xy"
    }
    board = objective_board(tmp_path, [("val_dice", "max")])
    result = importances(board, space, [("val_dice", "max")])
    assert (
        result["evaluator"] == "PedAnovaImportanceEvaluator"
        and result["trials"] == 12
        and "caveat" not in result
    )
    assert [k for k, _ in top(result)][0] == "x"
    few = importances(board.head(5), space, [("val_dice", "max")])
    assert few["trials"] == 5 and few["caveat"].startswith("from 5 trials")


def test_importances_rank_what_leads_to_a_high_score_when_it_is_maximised(tmp_path):
    """PED-ANOVA looks at the best trials: for a maximised metric those with high values. Here only x > 6
    lifts val_dice, while y decides among the worst trials: x matters for the best, y for the worst."""
    import numpy as np
    from pydantic import TypeAdapter

    from tskd_tune.report import importances, objective_board, top
    from tskd_tune.space import Distribution

    rng = np.random.default_rng(1)
    for i in range(40):
        x, y = float(rng.uniform(1, 8)), float(rng.uniform(1, 8))
        write_trial(tmp_path, i + 1, {"x": x, "y": y}, [0.1, 0.5 * (x > 6) + 0.02 * y])
    space = {
        p: TypeAdapter(Distribution).validate_python({"type": "uniform", "low": 1.0, "high": 8.0})
        for p in "xy"
    }
    board = objective_board(tmp_path, [("val_dice", "max")])
    assert [k for k, _ in top(importances(board, space, [("val_dice", "max")]))][0] == "x"
    assert [k for k, _ in top(importances(board, space, [("val_dice", "min")]))][0] == "y"


def test_startup_trials_set_the_samplers_random_start(tiny):
    from tskd_tune.search.tuner import _sampler

    space = {"distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0}}
    for algorithm, default in (("tpe", 10), ("gp", 10), ("cmaes", 1)):  # unset: Optuna's own default
        cfg = tiny(search={"space": space, "algorithm": algorithm})
        assert _sampler(cfg.search)._n_startup_trials == default
        cfg = tiny(search={"space": space, "algorithm": algorithm, "startup_trials": 3})
        assert _sampler(cfg.search)._n_startup_trials == 3


def test_grace_from_data_is_where_early_ranks_start_to_agree_with_final_ones():
    # 5 trials that ran 6 epochs: epochs 1-2 rank them in reverse, from epoch 3 on as at the end
    finals = [0.5, 0.6, 0.7, 0.8, 0.9]
    curves = [{e: (1 - f if e < 3 else f) * e / 6 for e in range(1, 7)} for f in finals]
    grace, corr = fidelity.grace_from_data(curves, 6)
    assert grace == 3 and [round(r["spearman"], 2) for r in corr] == [-1.0, -1.0, 1.0, 1.0, 1.0]
    assert fidelity.grace_from_data(curves[:3], 6)[0] is None  # too few finished trials to judge
    assert (
        fidelity.grace_from_data(curves + [{1: 0.1, 2: 0.1}], 6)[1][0]["trials"] == 5
    )  # stopped ones left out
    late = [{**c, 5: 1 - c[6]} for c in curves]  # epoch 5 disagrees again: nothing earlier can be trusted
    assert fidelity.grace_from_data(late, 6)[0] is None


def test_a_fifo_search_says_which_grace_period_its_data_supports(tiny, tmp_path):
    from tskd_tune.search.summary import grace_lines, grace_supported

    cfg = tiny(student={"epochs": 4}, search={"scheduler": "fifo", "grace_period": 1})
    for i, final in enumerate([0.5, 0.6, 0.7, 0.8]):  # reversed at epoch 1, agreeing from epoch 2
        write_trial(tmp_path, i + 1, {"x": i}, [1.0 - final, final - 0.1, final - 0.05, final])
    grace = grace_supported(cfg, tmp_path)
    assert grace == {"epoch": 2, "spearman": pytest.approx(1.0), "trials": 4, "max_t": 4}
    (line,) = grace_lines(grace, cfg)
    assert "from epoch 2 on" in line and "search.grace_period should be at least 2" in line
    assert (
        grace_supported(
            cfg.model_copy(update={"search": cfg.search.model_copy(update={"scheduler": "asha"})}), tmp_path
        )
        is None
    )  # ASHA's own rungs are judged instead
    (few,) = grace_lines(grace | {"trials": 3, "epoch": None}, cfg)
    assert "too few" in few


def test_a_teacher_below_scratch_is_named_with_what_to_try():
    from tskd_tune.search.summary import teacher_below_scratch

    line = teacher_below_scratch({"reference_teacher_val_dice": 0.7, "reference_scratch_val_dice": 0.75})
    assert line.startswith("warning: the teacher (val Dice 0.7000) is below the scratch student (0.7500)")
    assert "teacher.head: sam_decoder" in line and "teacher.adapt: lora" in line and "\n" not in line
    assert (
        teacher_below_scratch({"reference_teacher_val_dice": 0.8, "reference_scratch_val_dice": 0.75}) is None
    )
    assert teacher_below_scratch({"reference_scratch_val_dice": 0.75}) is None  # no teacher reference


def test_the_live_table_names_trials_and_knobs_short_and_fits_80_columns(tmp_path):
    """The live table of `launch` in a terminal: t001 (not the name that repeats the values), the knobs as
    T / kd / lr, one line per trial at 80 columns, the best marked."""
    from ray.tune.experiment import Trial
    from rich.console import Console

    from tskd_tune.search.progress import SearchProgress

    space = ["distill.temperature", "distill.kd_weight", "student.lr"]
    trials = []
    for i in range(3):
        config = {"distill.temperature": 2.0 + i, "distill.kd_weight": 0.5, "student.lr": 0.00123}
        trial = Trial("tskd", config=config, stub=True, experiment_tag=f"{i + 1}_x")
        trial.custom_trial_name = f"t{i + 1:03d} T={2.0 + i} kd=0.5 lr=0.00123"
        trial.set_status("RUNNING")
        trial.update_last_result({"epoch": 3, "val_dice": 0.7 + i / 100})
        trials.append(trial)
    console = Console(width=80, record=True, force_terminal=True)
    console.print(SearchProgress(console, "val_dice", "max", space, 40, 8, 2, tmp_path).table(trials))
    lines = console.export_text().splitlines()
    header = next(line for line in lines if line.split()[:2] == ["trial", "state"])
    assert header.split() == ["trial", "state", "T", "kd", "lr", "epoch", "val_dice", "gain"]
    rows = [line.split() for line in lines if line.split()[:1] and line.split()[0].startswith("t00")]
    assert [r[:3] for r in rows] == [
        ["t001", "running", "2"],
        ["t002", "running", "3"],
        ["t003", "running", "4"],
    ]
    assert rows[2][-1] == "*" and max(map(len, lines)) <= 80 and "…" not in console.export_text()


def test_rays_own_lines_and_trial_tracebacks_go_to_the_search_log(tmp_path, capsys):
    """What Ray's processes print (a raylet's state dump, the GCS), its restore line in a retried worker and the
    report of a SystemExit its SIGTERM raised in a worker it stopped go to driver.log; a trial's own output (and
    any other ignored exception) stays on the console; Tune's traceback of a trial that raised becomes
    one stderr line, said once however often Ray retries it."""
    import logging

    from ray.exceptions import ActorDiedError, RayTaskError

    from tskd_tune.errors import TrialFailed
    from tskd_tune.search import ray_log

    sink = ray_log._ToFile(tmp_path / ray_log.LOG_FILE)
    assert ray_log._split({"pid": "raylet", "lines": ["[state-dump] NodeManager:"]}, sink) is None
    assert ray_log._split({"pid": "gcs_server", "lines": ["Failed to remove 1 bundle(s)"]}, sink) is None
    mixed = {"pid": 4361, "lines": ["Restored on 10.0.0.7 from checkpoint: Checkpoint(...)", "epoch 2 done"]}
    assert ray_log._split(mixed, sink)["lines"] == ["epoch 2 done"]
    assert ray_log._split({"pid": "autoscaler", "lines": ["Adding 1 node(s)"]}, sink) is not None
    stopped = [  # as a CI run printed it: a worker stopped by Ray with SIGTERM inside a weakref callback
        "Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f952e426700>",
        "Traceback (most recent call last):",
        '  File "/usr/lib/python3.11/_weakrefset.py", line 39, in _remove',
        "    def _remove(item, selfref=ref(self)):",
        "",
        '  File "ray/_private/worker.py", line 1063, in sigterm_handler',
        "    raise_sys_exit_with_custom_error_message(",
        "SystemExit: 1",
        "",
    ]
    other = [
        "Exception ignored in: <function Foo.__del__>",
        "Traceback (most recent call last):",
        "ValueError: x",
    ]
    shown = ray_log._split({"pid": 25227, "lines": ["epoch 12 done", *stopped, *other]}, sink)
    assert shown["lines"] == ["epoch 12 done", *other]
    assert ray_log._split({"pid": 25227, "lines": stopped}, sink) is None
    logged = (tmp_path / ray_log.LOG_FILE).read_text()
    assert (
        "(raylet) [state-dump]" in logged and "(gcs_server)" in logged and "(pid=4361) Restored on" in logged
    )
    assert logged.count("(pid=25227) SystemExit: 1") == 2 and "ValueError" not in logged
    assert "epoch 2 done" not in logged and "Adding" not in logged

    keep = ray_log._TrialErrorFilter(sink)

    def record(exc: BaseException) -> logging.LogRecord:
        return logging.LogRecord(
            "ray.tune",
            logging.ERROR,
            __file__,
            1,
            "Trial task failed for trial t002 T=6",
            None,
            (type(exc), exc, None),
        )

    raised = RayTaskError(
        "trial",
        "Traceback ...\ntskd_tune.errors.TrialFailed: loss became nan at epoch 2",
        TrialFailed("loss became nan at epoch 2"),
    )
    assert not keep.filter(record(raised)) and not keep.filter(record(raised))
    assert not keep.filter(record(ActorDiedError()))  # the retry notice speaks for a dead worker
    assert capsys.readouterr().err == "t002 T=6 failed: TrialFailed: loss became nan at epoch 2\n"
    assert (tmp_path / ray_log.LOG_FILE).read_text().count("Trial task failed for trial t002") == 3
    unrelated = logging.LogRecord("ray.tune", logging.ERROR, __file__, 1, "something else", None, None)
    assert keep.filter(unrelated)


def test_routing_wraps_a_printer_that_a_new_ray_init_registers_once(tmp_path):
    """A second search in one process (or a new ray.init, which registers Ray's printer anew) is routed too,
    and nothing is wrapped twice; the log follows the latest search folder."""
    import ray._private.worker as ray_worker
    from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

    from tskd_tune.search import ray_log

    seen, before, printer = [], list(dispatcher.handlers), ray_worker.print_to_stdstream
    try:
        dispatcher.add_handler("ray_print_logs", seen.append)
        first = ray_log.route(tmp_path / "a")
        dispatcher.remove_handler("ray_print_logs")  # ray.shutdown(), then ray.init() registers a new one
        dispatcher.add_handler("ray_print_logs", seen.append)
        second = ray_log.route(tmp_path / "b")
        assert ray_log.route(tmp_path / "b") == second == tmp_path / "b" / ray_log.LOG_FILE != first
        handlers = [h for name, h in dispatcher.handlers if name == "ray_print_logs"]
        assert len(handlers) == 1 and handlers[0]._tskd and ray_worker.print_to_stdstream._tskd
        dispatcher.emit({"pid": "raylet", "lines": ["[state-dump] x"]})
        dispatcher.emit({"pid": 7, "lines": ["epoch 1"]})
        assert [d["lines"] for d in seen] == [["epoch 1"]]
        assert "(raylet) [state-dump] x" in second.read_text() and not first.exists()
    finally:
        dispatcher.handlers = before
        ray_worker.print_to_stdstream = printer


def test_a_session_check_returns_a_checked_copy_and_changes_nothing_in_place(tiny, tmp_path, monkeypatch):
    import dataclasses
    import io

    from rich.console import Console

    from tskd_tune.reporter import Reporter
    from tskd_tune.search import SearchOptions, SearchSession

    earlier = _earlier_search(tmp_path)
    monkeypatch.chdir(tmp_path)
    space = {
        "distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0},
        "student.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    }
    out = io.StringIO()
    session = SearchSession(
        tiny(search={"space": space}),
        SearchOptions("new", Path("runs"), "sqlite:///mlflow.db", warm_start=(earlier.name,)),
        Reporter(Console(file=out, width=300)),
    )
    checked = session.check()
    assert (
        checked.opts.storage == tmp_path / "runs"
        and checked.opts.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    )
    assert checked.opts.warm_start == (str(earlier),) and checked.warm == (
        ({"distill.temperature": 2.0, "student.lr": 0.001}, 0.6),
    )
    assert "warm start from" in out.getvalue()
    # the session it was called on is as it was: the options are frozen, each step returns its own record
    assert (
        session.opts.storage == Path("runs")
        and session.warm == ()
        and session.opts.warm_start == (earlier.name,)
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        session.opts.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        checked.cfg = session.cfg  # type: ignore[misc]


def test_a_session_names_its_lifecycle_steps_in_the_order_run_calls_them():
    import inspect

    from tskd_tune.search.session import SearchSession

    steps = ["check", "prepare_data", "open_parent_run", "fit", "summarise", "report"]
    body = inspect.getsource(SearchSession.run)
    assert all(callable(getattr(SearchSession, s)) for s in steps)
    assert sorted(steps, key=lambda s: body.index(f".{s}(")) == steps


def test_the_reporter_prints_paths_and_overrides_as_typed():
    import io

    from rich.console import Console

    from tskd_tune.reporter import Reporter

    out = io.StringIO()
    say = Reporter(Console(file=out, width=200))
    say.line("config runs/a[1]/best.yaml; --set teacher.lora.targets=[qkv]")
    say.warn("[bold]teacher below scratch[/bold]")
    assert out.getvalue().splitlines() == [
        "config runs/a[1]/best.yaml; --set teacher.lora.targets=[qkv]",
        "[bold]teacher below scratch[/bold]",
    ]


def test_a_trials_student_is_measured_when_it_starts_as_its_end_measures_it(tiny):
    """Logged when a trial starts, so a trial the scheduler stops has a size and latency in MLflow too."""
    from tskd_tune.data.prepare import load
    from tskd_tune.search.trainable import student_measures
    from tskd_tune.trial import run_trial

    cfg = tiny(distill={"method": "scratch"}, student={"epochs": 1})
    data = load(cfg)
    at_start = student_measures(cfg, len(data[0].classes))
    at_end = run_trial(cfg, data=data)
    assert at_start["student_params"] == at_end["student_params"] > 0
    assert at_start["student_latency_ms"] > 0
    assert student_measures(tiny(distill={"method": "teacher"}), len(data[0].classes)) == {}  # no student
