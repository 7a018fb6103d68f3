"""Short names of trials (``t007``) and of the searched knobs (``T``, ``kd``, ``lr``): in trial names, the live
table, the console's notices and ``status``."""

from __future__ import annotations

SHORT_NAMES = {
    "distill.temperature": "T",
    "distill.kd_weight": "kd",
    "distill.sup_weight": "sup",
    "distill.feature_weight": "feat",
    "student.lr": "lr",
    "teacher.lr": "t.lr",
    "synthetic.ratio": "synth",
    "teacher.lora.rank": "rank",
    "teacher.lora.alpha": "alpha",
    "teacher.lora.last_blocks": "blocks",
    "stage.teacher": "teacher",
}


def short_name(key: str) -> str:
    """``distill.temperature`` -> ``T``; a knob without a short name goes by its last part (``rank``)."""
    return SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])


def trial_number(trial) -> str:
    """``t007``: a Ray Tune trial's number in its search (Tune's experiment tag starts with it)."""
    number = str(trial.experiment_tag).split("_", 1)[0]
    return f"t{int(number):03d}" if number.isdigit() else "t"
