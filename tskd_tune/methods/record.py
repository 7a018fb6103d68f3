"""What a method reports besides its scores, as typed fields: where its teacher came from, whether its
teacher features and logits were cached, its transfer set, the synthetic images it kept, and the seconds of
each phase.

The trial starts the record (the data and pool timings, the pool's figures), the method's stages fill it while
they run, and the method hands it back on its :class:`~tskd_tune.methods.context.Outcome`;
:func:`tskd_tune.trial.run_trial` flattens it into the trial's metrics (``metrics.json``, MLflow's
``trial_summary.json``) with :meth:`Record.metrics` and :meth:`Record.seconds`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tskd_tune.transfer import TransferSet


@dataclass(frozen=True)
class TeacherSource:
    """Where a method's teacher came from (``teacher_cached`` and ``teacher_adapter`` in the metrics)."""

    cached: bool | None
    """True: the fine-tuned teacher came from the cache; False: it was trained in this trial; None: the frozen
    pretrained encoder, with nothing fine-tuned to cache."""
    adapter: str | None = None
    """The cache folder of the fine-tuned teacher (its head or LoRA adapter): a reference, not a copy."""


FROZEN_ENCODER = TeacherSource(cached=None)
"""The teacher of a method that distils the frozen pretrained encoder (ta_kd)."""


@dataclass
class Record:
    """What a method reports besides its scores. A field left None was not measured: the metrics then leave
    it out, except the teacher-feature figures, which every trial reports (None without a feature cache)."""

    pool: dict = field(default_factory=dict)
    """The synthetic pool's figures as flat ``synth_*`` metrics (``Pool.metrics()``); empty without a pool."""
    teacher: TeacherSource | None = None
    """Where the teacher came from; None: the method has no teacher."""
    teacher_features_cached: bool | None = None
    """Every teacher feature read came from the cache (False if any was computed in this trial)."""
    teacher_features_s: float | None = None
    """Seconds spent reading (or computing) teacher features."""
    teacher_features_backend: str | None = None
    """How the missing teacher features were computed (``"<backend> batch <n>"``), when some were."""
    logits_cached: bool | None = None
    """The teacher's logits on the transfer set came from the cache."""
    transfer_real: int | None = None
    """Real images in the transfer set."""
    transfer_synthetic: int | None = None
    """Synthetic images drawn into the transfer set."""
    synth_drawn: int | None = None
    """Synthetic images ``synthetic.filter`` judged (set only when a filter applies)."""
    synth_kept: int | None = None
    """Of those, the images the filter kept."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase (``data``, ``synth``, ``teacher``, ``transfer``, ``student``), in the order first
    timed."""

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Add the seconds the ``with`` block takes to ``phase``."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t0

    def read_features(self, cached: bool, seconds: float, backend: str | None = None) -> None:
        """Count one read of teacher features: ``cached`` when none had to be computed, the ``seconds`` it
        took, and the ``backend`` that computed the missing ones."""
        self.teacher_features_cached = self.teacher_features_cached is not False and cached
        self.teacher_features_s = (self.teacher_features_s or 0.0) + seconds
        if backend is not None:
            self.teacher_features_backend = backend

    def count_transfer(self, transfer: TransferSet) -> None:
        """The real and synthetic images of the transfer set the method learns from."""
        self.transfer_real, self.transfer_synthetic = len(transfer.real), len(transfer.synthetic)

    def metrics(self) -> dict:
        """The record as flat trial metrics (timings apart: :meth:`seconds`), in the order ``metrics.json``
        lists them."""
        out = {
            "teacher_features_cached": self.teacher_features_cached,
            "teacher_features_s": self.teacher_features_s,
        }
        out |= self.pool
        if self.teacher_features_backend is not None:
            out["teacher_features_backend"] = self.teacher_features_backend
        if self.teacher is not None:  # None included: the frozen encoder has nothing fine-tuned to cache
            out["teacher_cached"] = self.teacher.cached
            if self.teacher.adapter is not None:
                out["teacher_adapter"] = self.teacher.adapter
        measured = {
            "logits_cached": self.logits_cached,
            "transfer_real": self.transfer_real,
            "transfer_synthetic": self.transfer_synthetic,
            "synth_drawn": self.synth_drawn,
            "synth_kept": self.synth_kept,
        }
        return out | {k: v for k, v in measured.items() if v is not None}

    def seconds(self) -> dict[str, float]:
        """The phase timings as ``<phase>_s`` metrics."""
        return {f"{phase}_s": s for phase, s in self.timings.items()}
