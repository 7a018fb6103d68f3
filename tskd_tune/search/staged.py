"""The staged search (``search.strategy: staged``): teachers first, then students of the best teachers.

Stage 1 searches only the ``teacher.*`` knobs of the space: each trial fine-tunes one teacher (method
``teacher``) and is judged on its val Dice, with the scheduler on teacher epochs, for
``search.teacher_trials`` trials. Stage 2 searches every other knob, with the best
``search.top_teachers`` finished teachers as one more categorical choice (``stage.teacher``), so no
stage-2 trial fine-tunes a teacher: each finds its teacher in the trial cache. Both stages are children
of the one parent run (tagged ``tskd.stage``), each has its own Optuna study (``NAME-teacher``,
``NAME-student``), and ``tskd-tune resume`` continues whichever stage was interrupted.
"""

from __future__ import annotations

import json
from dataclasses import replace

from tskd_tune.cache import write_json
from tskd_tune.config import Config
from tskd_tune.errors import TskdError
from tskd_tune.search.folder import SearchOptions
from tskd_tune.space import Distribution

TEACHER_STAGE = "teacher_stage"
"""The teacher stage's Ray Tune experiment, inside the search folder."""
TEACHERS_FILE = "teachers.json"
"""The teacher stage's outcome: the chosen teachers (name -> teacher.* values) and its leaderboard."""
CHOICE = "stage.teacher"
"""The student stage's categorical knob: which of the chosen teachers a trial distils."""


def teacher_knobs(cfg: Config) -> dict[str, Distribution]:
    return {k: v for k, v in cfg.search.space.items() if k.startswith("teacher.")}


def teacher_stage(cfg: Config) -> Config:
    """Stage 1's config: the teacher method over the teacher knobs, judged on val Dice per teacher epoch."""
    s = cfg.search
    search = s.model_copy(
        update={
            "space": teacher_knobs(cfg),
            "num_samples": s.teacher_trials,
            "objectives": {},
            "metric": "val_dice",
            "mode": "max",
            "baselines": [],
            "grace_period": None if s.grace_period is None else min(s.grace_period, cfg.teacher.epochs),
            "points_to_evaluate": [
                {k: v for k, v in p.items() if k.startswith("teacher.")}
                for p in s.points_to_evaluate
                if any(k.startswith("teacher.") for k in p)
            ],
        }
    )
    search = search.model_copy(update={"strategy": "joint"})  # each stage is a plain search of its own space
    return cfg.model_copy(
        update={"search": search, "distill": cfg.distill.model_copy(update={"method": "teacher"})}
    )


def student_stage(cfg: Config, teachers: dict[str, dict]) -> Config:
    """Stage 2's config: every other knob, plus the choice among ``teachers``."""
    from pydantic import TypeAdapter

    choice = TypeAdapter(Distribution).validate_python({"type": "choice", "values": list(teachers)})
    space = {k: v for k, v in cfg.search.space.items() if not k.startswith("teacher.")} | {CHOICE: choice}
    points = [
        {k: v for k, v in p.items() if not k.startswith("teacher.")} for p in cfg.search.points_to_evaluate
    ]
    search = cfg.search.model_copy(
        update={"space": space, "points_to_evaluate": [p for p in points if p], "strategy": "joint"}
    )
    return cfg.model_copy(update={"search": search})


def stage_options(opts: SearchOptions, stage: str) -> SearchOptions:
    """Where a stage's Ray Tune experiment lives: the teacher stage inside the search folder."""
    return replace(opts, name=TEACHER_STAGE, storage=opts.location) if stage == "teacher" else opts


def choose_teachers(cfg: Config, opts: SearchOptions) -> dict[str, dict]:
    """The best ``search.top_teachers`` teachers that finished stage 1: trial name -> their teacher.* values.
    Written to ``teachers.json`` (with the stage's leaderboard), which a resumed search reads back."""
    from tskd_tune.report import objective_board

    board = objective_board(opts.path / TEACHER_STAGE, [("val_dice", "max")])
    done = board[board["state"] == "finished"].head(cfg.search.top_teachers)
    if done.empty:
        raise TskdError(
            f"{opts.path / TEACHER_STAGE}: no teacher finished the teacher stage; nothing to distil"
        )
    knobs = list(teacher_knobs(cfg))
    teachers = {_name(row, knobs): {k: _plain(row[k]) for k in knobs} for _, row in done.iterrows()}
    board.drop(columns=["trial_dir", "mlflow_run_id"]).to_csv(
        opts.path / "teacher_leaderboard.csv", index=False
    )
    write_json(opts.path / TEACHERS_FILE, {"teachers": teachers, "val_dice": done["val_dice"].tolist()})
    return teachers


def fewer_teachers(cfg: Config, teachers: dict[str, dict]) -> str | None:
    """A note when the teacher stage left fewer finished teachers than ``search.top_teachers`` (only a
    finished teacher is in the cache to distil). The stage's first ``top_teachers`` trials always run to
    the end, so this means some of them failed (or the stage's time budget ran out)."""
    want = cfg.search.top_teachers
    if len(teachers) >= want:
        return None
    return (
        f"note: search.top_teachers is {want}, but only {len(teachers)} teacher(s) of the teacher stage ran "
        f"to the end (the others failed, ran out of search.time_budget_s or were stopped early): see "
        f"teacher_leaderboard.csv; raise search.teacher_trials for more"
    )


def chosen_teachers(opts: SearchOptions) -> dict[str, dict] | None:
    """The teachers an earlier run of this search chose (None: the teacher stage has not finished)."""
    path = opts.path / TEACHERS_FILE
    return json.loads(path.read_text())["teachers"] if path.is_file() else None


def _name(row, knobs: list[str]) -> str:
    """``t003 rank=8 lr=0.001``: the teacher trial's number and its values."""
    from pathlib import Path

    number = Path(row["trial_dir"]).name.split("_", 1)[0]
    return " ".join([number, *(f"{k.rsplit('.', 1)[-1]}={_plain(row[k])}" for k in knobs)])


def _plain(value):
    """A pandas/numpy scalar as the plain Python value the config takes."""
    return value.item() if hasattr(value, "item") else value
