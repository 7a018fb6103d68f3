"""What Ray says on the driver's console that a user need not read, sent to the search's ``driver.log``.

A lost node or a killed worker makes Ray print, on the driver, the lines of its own processes (the GCS,
the raylet: ``[state-dump]`` blocks, placement-group retries, "a worker died" notices) and Tune a
traceback of the trial it is about to retry. The search goes on by itself; the user needs one line
(:func:`tuner.retry_notice`), and the full text belongs in a file. :func:`route` sends:

- log lines of Ray's system processes (a ``pid`` that is not a number: ``raylet``, ``gcs_server``, ...)
  and the error messages Ray publishes to drivers, to ``driver.log``; lines of trials' workers (numbered
  ``pid``) and of the autoscaler still reach the console as Ray prints them, but for Ray's own lines in a
  worker (its restore line in a retried trial, the report of a SystemExit its SIGTERM handler raised in a
  worker it stopped);
- Tune's "Trial task failed" record with its traceback, to ``driver.log``: when the trial's worker process
  died (a ``RayActorError``: node lost, process killed, out of memory) the retry notice says it; when the
  trial raised, one line on stderr says which trial and the error's last line.

Ray's driver-side log printing has no public hook, so this wraps ``ray._private.worker.print_to_stdstream``
and the handler Ray registers on its stream dispatcher; with a Ray that lacks either, nothing is routed
and Ray prints as it always did.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from pathlib import Path

LOG_FILE = "driver.log"
"""In the search folder: what Ray printed about its own processes and retried trials."""
_TUNE_LOGGER = "ray.tune.execution.tune_controller"
_FAILED = "Trial task failed for trial "  # Tune's message before a failed trial's traceback
_QUALIFIED = re.compile(r"^[\w.]+\.(\w+: )")
_KEEP_ON_CONSOLE = {"autoscaler"}  # node launches and resource demands on a real cluster: worth seeing
_WORKER_NOISE = re.compile(r"^Restored on \S+ from checkpoint: ")  # Ray Train's line in a retried trial
# Python's report of an exception it could not raise (in a finaliser, a weakref callback)
_IGNORED = "Exception ignored in"
_SIGTERM = "sigterm_handler"  # Ray's handler in a worker it stops: raises SystemExit wherever the worker is
_lock = threading.Lock()
_routed: dict = {}


def _system(data: dict) -> bool:
    pid = data.get("pid")
    return not (isinstance(pid, int) or str(pid).isdigit() or pid in _KEEP_ON_CONSOLE)


def _split(data: dict, sink: _ToFile) -> dict | None:
    """``data`` for the console: None when all of it goes to the file (a Ray process's lines, or only Ray's own
    lines of a trial's worker: "Restored on ... from checkpoint", which the retry notice says, and the report
    of the SystemExit that Ray's SIGTERM raised in a worker it stopped)."""
    if _system(data):
        sink.lines(str(data.get("pid")), data.get("lines", []))
        return None
    keep, moved = _rays_own_lines(data.get("lines", []))
    if moved:
        sink.lines(f"pid={data.get('pid')}", moved)
    return (data | {"lines": keep}) if keep else None


def _rays_own_lines(lines: list) -> tuple[list, list]:
    """A trial worker's ``lines`` split into (kept, Ray's own): Ray Train's restore line, and the report of a
    worker that Ray stops with SIGTERM once its trial is over: Ray's handler raises SystemExit wherever the worker
    is, and inside a finaliser or a weakref callback Python can only report it, as an "Exception ignored in ..."
    block with a traceback through ``sigterm_handler``. Neither says anything about the trial; any other
    "Exception ignored" block stays on the console."""
    keep, moved, i = [], [], 0
    while i < len(lines):
        end = i
        if lines[i].startswith(_IGNORED):  # the report ends at the first unindented line after its traceback
            end = next((j for j in range(i + 1, len(lines)) if _unindented(lines[j])), i)
        block = lines[i : end + 1]
        if end > i and block[-1].startswith("SystemExit") and any(_SIGTERM in line for line in block):
            moved += block
            i = end + 1
            while i < len(lines) and not lines[i].strip():  # the blank line Python ends the report with
                moved.append(lines[i])
                i += 1
        else:
            (moved if _WORKER_NOISE.match(lines[i]) else keep).append(lines[i])
            i += 1
    return keep, moved


def _unindented(line: str) -> bool:
    return bool(line) and not line[0].isspace() and not line.startswith("Traceback")


class _ToFile:
    """Appends lines to ``driver.log``, opening it per write (rare events; no descriptor held for hours)."""

    def __init__(self, path: Path):
        self.path = path

    def lines(self, source: str, lines) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        with _lock, self.path.open("a") as fh:
            fh.writelines(f"{stamp} ({source}) {line.rstrip()}\n" for line in lines)


class _TrialErrorFilter(logging.Filter):
    """Tune's traceback of a failed trial goes to the file. A trial whose worker died (a ``RayActorError``)
    gets its console line from :func:`tuner.retry_notice`; a trial that raised gets one line here, on stderr:
    ``t002 T=6 failed: TrialFailed: loss became nan at epoch 2``."""

    def __init__(self, sink: _ToFile):
        super().__init__()
        self.sink, self.said = sink, set()

    def filter(self, record: logging.LogRecord) -> bool:
        from ray.exceptions import RayActorError

        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or not record.getMessage().startswith(_FAILED):
            return True
        self.sink.lines(
            "tune", [record.getMessage(), *logging.Formatter().formatException(record.exc_info).splitlines()]
        )
        if not isinstance(exc, RayActorError):
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            last = lines[-1].strip() if lines else exc.__class__.__name__
            name = record.getMessage().removeprefix(_FAILED).strip()
            short = _QUALIFIED.sub(r"\1", last)[:300]  # tskd_tune.errors.TrialFailed: ... -> TrialFailed: ...
            if (name, short) not in self.said:  # Ray's retries of a failed trial fail the same way: said once
                self.said.add((name, short))
                print(f"{name} failed: {short}", file=sys.stderr, flush=True)
        return False


def route(folder: Path) -> Path | None:
    """Send Ray's system lines and trials' tracebacks to ``folder/driver.log`` from now on; the log's path, or
    None where Ray offers no hook. Called again (another stage, another search in this process, a new
    ``ray.init`` that registered its printer anew), it moves the file and wraps what is not wrapped yet."""
    import ray._private.worker as ray_worker

    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return None
    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or not hasattr(dispatcher, "handlers"):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    sink = _routed.setdefault("sink", _ToFile(folder / LOG_FILE))
    sink.path = folder / LOG_FILE
    if not getattr(printer, "_tskd", False):  # error messages Ray publishes to drivers
        ray_worker.print_to_stdstream = _wrap(printer, sink, takes_prefix=True)
    with dispatcher._lock:  # the handler that prints the workers' and Ray's processes' log lines
        dispatcher.handlers = [
            (
                name,
                _wrap(handler, sink)
                if name == "ray_print_logs" and not getattr(handler, "_tskd", False)
                else handler,
            )
            for name, handler in dispatcher.handlers
        ]
    if "filter" not in _routed:
        logging.getLogger(_TUNE_LOGGER).addFilter(_TrialErrorFilter(sink))
        _routed["filter"] = True
    return sink.path


def _wrap(handler, sink: _ToFile, takes_prefix: bool = False):
    """``handler`` (Ray's printer of log batches) behind :func:`_split`, marked as wrapped."""
    if takes_prefix:

        def handle(data: dict, ignore_prefix: bool = False) -> None:
            if (shown := _split(data, sink)) is not None:
                handler(shown, ignore_prefix)
    else:

        def handle(data: dict) -> None:
            if (shown := _split(data, sink)) is not None:
                handler(shown)

    handle._tskd = True
    return handle
