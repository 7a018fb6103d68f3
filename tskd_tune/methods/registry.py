"""The method registry: what each method needs and does, declared once, by the method's own module.

As peft registers its tuners, each method module calls :func:`register_method` with a
:class:`MethodSpec`; every caller that needs to know something about a method (does it need a teacher,
which one, does it distil on the transfer set, does it save a student, how many epochs does it report)
asks the spec instead of comparing names. The names themselves are declared in the light
:mod:`tskd_tune.kinds` (``METHOD_NAMES``), which ``distill.method``'s Literal is built from without importing
the methods; a method registers only under a declared name, and a test holds the two tables equal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from tskd_tune.errors import TskdError
from tskd_tune.kinds import METHOD_NAMES

if TYPE_CHECKING:
    from tskd_tune.config import Config


@dataclass(frozen=True)
class MethodSpec:
    """A method: its trial function and what it needs."""

    name: str
    run: Callable
    """``run(ctx: TrialContext, report) -> Outcome``."""
    teacher: Literal["fine_tuned", "frozen"] | None
    """The teacher it uses: fine-tuned on the labels, the frozen pretrained encoder, or none."""
    transfer: bool
    """It distils on the transfer set (unlabelled and synthetic images): it draws from the synthetic pool."""
    student: bool
    """It trains a student, which the trial saves (and a search exports)."""
    reports: Literal["student", "teacher"] = "student"
    """Whose epochs it reports to the search: the student's, or the teacher's fine-tuning epochs."""

    def reported_epochs(self, cfg: Config) -> int:
        """How many epochs a trial of this method reports (what a scheduler's max_t is)."""
        return cfg.teacher.epochs if self.reports == "teacher" else cfg.student.epochs


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method to the registry (each method module calls this once, at import)."""
    if spec.name not in METHOD_NAMES:
        # the config would refuse the name: declare it beside the others first
        raise ValueError(f"method {spec.name!r} is not declared in tskd_tune.kinds.METHOD_NAMES")
    METHODS[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The spec of ``distill.method`` ``name``."""
    try:
        return METHODS[name]
    except KeyError:
        raise TskdError(f"distill.method: unknown method {name!r} (known: {', '.join(METHODS)})") from None
