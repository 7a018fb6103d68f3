"""The methods a trial can run, each a plain function over the trial context, one module each:

- ``ts_kd``   task-specific KD: fine-tune the teacher on the labels, distil its logits on the transfer set;
- ``ta_kd``   task-agnostic KD: distil the frozen teacher's features, then fine-tune on the labels;
- ``mae``     MAE: pretrain a ViT student's encoder by masked-image modelling, then fine-tune on the labels;
- ``scratch`` the student on the labelled images only;
- ``teacher`` the fine-tuned teacher itself.

Each registers a :class:`MethodSpec`; callers ask :data:`METHODS` what a method needs. A method returns an
:class:`Outcome`: its model, its scores and its :class:`Record` (cache hits, counts, timings: what it reports
besides its scores).
"""

from tskd_tune.methods import mae, scratch, ta_kd, teacher, ts_kd  # noqa: F401  (each registers itself)
from tskd_tune.methods.context import Outcome, TrialContext
from tskd_tune.methods.record import Record, TeacherSource
from tskd_tune.methods.registry import METHODS, MethodSpec, get_method, register_method

__all__ = [
    "METHODS",
    "MethodSpec",
    "Outcome",
    "Record",
    "TeacherSource",
    "TrialContext",
    "get_method",
    "register_method",
]
