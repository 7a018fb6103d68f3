"""The process's heartbeat: long work (training steps, cache builds, feature fills) calls :func:`beat`;
a hang watchdog (see :mod:`tskd_tune.faults`) measures the time since the last one."""

from __future__ import annotations

import time

_last = time.monotonic()


def beat() -> None:
    """Record progress."""
    global _last
    _last = time.monotonic()


def idle_s() -> float:
    """Seconds since the last :func:`beat`."""
    return time.monotonic() - _last
