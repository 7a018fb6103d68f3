"""Short names of the searched knobs (``T``, ``kd``, ``lr``): in trial names, the live table and ``status``."""

from __future__ import annotations

SHORT_NAMES = {"distill.temperature": "T", "distill.kd_weight": "kd", "distill.sup_weight": "sup",
               "distill.feature_weight": "feat", "student.lr": "lr", "teacher.lr": "t.lr", "synthetic.ratio": "synth",
               "teacher.lora.rank": "rank", "teacher.lora.alpha": "alpha", "teacher.lora.last_blocks": "blocks",
               "stage.teacher": "teacher"}  # fmt: skip


def short_name(key: str) -> str:
    """``distill.temperature`` -> ``T``; a knob without a short name goes by its last part (``rank``)."""
    return SHORT_NAMES.get(key, key.rsplit(".", 1)[-1])
