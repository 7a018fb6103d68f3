"""Faults inside a trial: the hang watchdog, the no-retry marker, and the fault-injection hook for tests.

**Watchdog.** Every unit of progress (a training step, a batch of teacher outputs, a generator step, a
wait on another trial's cache build, a report) calls :func:`beat`. A :class:`Watchdog` thread calls its
``on_timeout`` once when no beat came for ``timeout_s`` seconds (``search.trial_timeout_s``).

**No retry for deterministic failures.** Ray Tune's ``FailureConfig`` retries every failed trial. That
is right when the worker process died (SIGKILL, lost node): the retry resumes from the last checkpoint.
It is waste when the trial itself raised (non-finite loss, CUDA out of memory, full disk, hang): the
same config from the same checkpoint fails the same way. Such a trial records its failure in
``<search>/failed_trials/<trial_id>.json``, and a retried attempt that finds it fails at once
(:func:`fail_if_failed_before`). ``tskd-tune resume`` clears these records: a resumed search gives its
failed trials one more attempt (the disk may have been freed, the GPU may be less busy).

**Fault injection (test hook).** ``tests/test_search_faults.py`` makes real searches fail the way
production searches fail. The hook does nothing unless ``TSKD_FAULT_INJECT`` is set; never set it
outside tests.

- ``TSKD_FAULT_INJECT``: a JSON list of faults ``{"fault": F, "phase": P, "epoch": E, ...}``; the first
  that matches fires. ``nan`` (the loss becomes NaN), ``raise`` (RuntimeError), ``oom``
  (``torch.cuda.OutOfMemoryError``) and ``sleep`` (``"seconds"``, or until the file ``"until"``
  exists) fire at the first step of epoch ``E`` of training phase ``P`` (``teacher``, ``student``,
  ``pretrain``, ``finetune``); ``enospc`` fires when that epoch's checkpoint is written: half the
  file, then ``OSError(ENOSPC)``. Without ``phase`` / ``epoch`` a fault matches every phase / epoch.
- ``"once": true`` with ``TSKD_FAULT_STATE`` (a folder): that fault fires in one trial only (the first
  to reach it claims it) and a trial claims at most one such fault, so a retried trial runs clean
  and a list of faults goes to different trials, in order. A trial is told apart by its working
  directory (Ray runs each trial in its own). Other faults fire every time they match.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tskd_tune.errors import TrialFailed
from tskd_tune.heartbeat import beat, idle_s
from tskd_tune.states import FAILED

INJECT_ENV = "TSKD_FAULT_INJECT"
STATE_ENV = "TSKD_FAULT_STATE"
FAILED_DIR = "failed_trials"  # <search>/failed_trials/<trial_id>.json
_STEP_FAULTS = {"nan", "raise", "oom", "sleep"}
_POINTS = {"step": _STEP_FAULTS, "checkpoint": {"enospc"}}


# ---------------------------------------------------------------------------------------- watchdog
class Watchdog:
    """Calls ``on_timeout(idle_s)`` once, from a daemon thread, when no :func:`beat` came for ``timeout_s``."""

    def __init__(self, timeout_s: float, on_timeout: Callable[[float], None]):
        self.timeout_s, self.on_timeout = float(timeout_s), on_timeout
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tskd-watchdog", daemon=True)

    def start(self) -> Watchdog:
        beat()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        tick = min(1.0, self.timeout_s / 10)
        while not self._stop.wait(tick):
            idle = idle_s()
            if idle > self.timeout_s:
                self.on_timeout(idle)
                return


@contextlib.contextmanager
def watchdog(timeout_s: float | None, on_timeout: Callable[[float], None]):
    """A :class:`Watchdog` around a block (none when ``timeout_s`` is None)."""
    dog = Watchdog(timeout_s, on_timeout).start() if timeout_s else None
    try:
        yield dog
    finally:
        if dog is not None:
            dog.stop()


# ---------------------------------------------------------------------------------- no-retry marker
def marker_path(search_path: Path, trial_id: str) -> Path:
    """Where a trial's failure is recorded: in the search folder, which every attempt and node sees."""
    return Path(search_path) / FAILED_DIR / f"{trial_id}.json"


def mark_failed(marker: Path, status: str, error: str) -> None:
    """Record that the trial failed deterministically, so that its retries fail at once."""
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f".{marker.name}.tmp")
        tmp.write_text(json.dumps({"status": status, "error": error}))
        os.replace(tmp, marker)
    except OSError:
        pass  # a full disk must not hide the original error; the retry then just runs again


@contextlib.contextmanager
def recorded(marker: Path):
    """Record an exception of the block as the trial's deterministic failure (its retries then fail at once)."""
    try:
        yield
    except Exception as exc:
        mark_failed(marker, FAILED, f"{exc.__class__.__name__}: {str(exc)[:480]}")
        raise


def fail_if_failed_before(marker: Path) -> None:
    """Raise :class:`TrialFailed` when an earlier attempt of this trial failed deterministically."""
    try:
        earlier = json.loads(marker.read_text())
    except (OSError, ValueError):
        return
    raise TrialFailed(f"{earlier['error']} (an earlier attempt failed the same way; not retried)")


# ------------------------------------------------------------------------------ fault injection
_parsed: tuple[str, list[dict]] | None = None


def _faults() -> list[dict]:
    global _parsed
    raw = os.environ.get(INJECT_ENV, "")
    if _parsed is None or _parsed[0] != raw:
        specs = json.loads(raw) if raw else []
        for spec in specs:
            if spec.get("fault") not in _STEP_FAULTS | {"enospc"}:
                raise ValueError(f"{INJECT_ENV}: unknown fault {spec.get('fault')!r}")
        _parsed = (raw, specs)
    return _parsed[1]


def _claim(index: int) -> bool:
    """Whether this trial may fire fault ``index`` (see the module docstring)."""
    state = os.environ.get(STATE_ENV)
    if not state:
        return True
    folder, me = Path(state), os.getcwd()
    folder.mkdir(parents=True, exist_ok=True)
    claims = {p.name: p.read_text() for p in folder.glob("fault-*")}
    mine = [name for name, who in claims.items() if who == me]
    if mine:
        return False  # one fault per trial; its retry runs clean
    try:
        with open(folder / f"fault-{index}", "x") as f:
            f.write(me)
        return True
    except FileExistsError:
        return False


def injected(point: str, phase: str, epoch: int) -> dict | None:
    """The injected fault that fires at ``point`` (step, checkpoint) of ``phase`` epoch ``epoch``, if any."""
    if not os.environ.get(INJECT_ENV):
        return None
    for i, spec in enumerate(_faults()):
        if spec["fault"] not in _POINTS[point]:
            continue
        if spec.get("phase", phase) != phase or spec.get("epoch", epoch) != epoch:
            continue
        if not spec.get("once") or _claim(i):
            return spec
    return None


def apply_step_fault(spec: dict, loss):
    """Apply a step fault to this step's loss: NaN it, raise, or sleep (a hang) first."""
    import torch

    kind = spec["fault"]
    if kind == "nan":
        return loss * float("nan")
    if kind == "raise":
        raise RuntimeError("injected fault (TSKD_FAULT_INJECT)")
    if kind == "oom":
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB (injected by TSKD_FAULT_INJECT)"
        )
    deadline, until = time.monotonic() + float(spec.get("seconds", 3600)), spec.get("until")
    while time.monotonic() < deadline and not (until and os.path.exists(until)):
        time.sleep(0.2)
    return loss


def write_half_then_enospc(path: Path, data: bytes) -> None:
    """The ``enospc`` fault: half of ``data`` reaches ``path``, then the disk is "full"."""
    import errno

    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def trial_hooks():
    """The training-loop hooks of a trial in a search: a heartbeat after every step, and the faults
    ``TSKD_FAULT_INJECT`` asks for (none unless it is set: a test hook)."""
    from tskd_tune.train import Hooks

    def on_loss(phase: str, epoch: int, step: int, loss):
        spec = injected("step", phase, epoch) if step == 0 else None
        return apply_step_fault(spec, loss) if spec is not None else loss

    def checkpoint_writer(phase: str, epoch: int):
        return write_half_then_enospc if injected("checkpoint", phase, epoch) else None

    return Hooks(on_loss=on_loss, after_step=beat, checkpoint_writer=checkpoint_writer)
