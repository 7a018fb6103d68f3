"""What `launch` shows while a search runs: one live table updated in place (a terminal), or one line per
finished trial (CI, a log file), instead of Ray's periodic status block (which `--verbose` brings back).

A row per trial: its readable name, state, the searched values, epoch, val Dice, gain over the scratch
reference trial (once it has finished), and the best so far; above it the search's ETA.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ray.tune import ProgressReporter

from tskd_tune import states
from tskd_tune.search.names import short_name, trial_number

if TYPE_CHECKING:
    from rich.console import Console

STATES = {"PENDING": states.PENDING, "RUNNING": states.RUNNING, "PAUSED": "paused", "ERROR": states.FAILED}


class SearchProgress(ProgressReporter):
    """A Ray Tune progress reporter over rich: live in a terminal, a line per finished trial elsewhere."""

    def __init__(
        self,
        console: Console,
        metric: str,
        mode: str,
        space: list[str],
        max_t: int,
        num_samples: int,
        concurrency: int,
        search_path: Path,
    ):
        self.console, self.metric, self.mode, self.space = console, metric, mode, space
        self.max_t, self.num_samples, self.concurrency = max_t, num_samples, max(1, concurrency)
        self.search_path, self.live, self.printed, self.started = (
            Path(search_path),
            None,
            set(),
            time.monotonic(),
        )
        self.every, self.last = 2.0, 0.0

    def __getstate__(self) -> dict:
        # the Tuner pickles its run config (tuner.pkl, for resume): a console and a live display do not pickle
        return self.__dict__ | {"console": None, "live": None}

    def __setstate__(self, state: dict) -> None:
        from rich.console import Console

        self.__dict__.update(state)
        self.console = Console(highlight=False, soft_wrap=True)

    def setup(self, *args, **kwargs) -> None:
        return None

    def should_report(self, trials, done: bool = False) -> bool:
        return done or time.monotonic() - self.last >= self.every

    def report(self, trials, done: bool, *sys_info) -> None:
        self.last = time.monotonic()
        if self.console.is_terminal:
            from rich.live import Live

            if self.live is None:
                self.live = Live(
                    self.table(trials), console=self.console, refresh_per_second=2, transient=False
                )
                self.live.start()
            self.live.update(self.table(trials))
            if done:
                self.live.stop()
            return
        for trial in trials:  # not a terminal: a line per trial that has ended, once
            state = self.state(trial)
            if (
                state in (states.FINISHED, states.STOPPED_EARLY, states.FAILED)
                and trial.trial_id not in self.printed
            ):
                self.printed.add(trial.trial_id)
                self.console.print(self.line(trial, state, trials), markup=False)

    # ------------------------------------------------------------------------------------------ rows
    def state(self, trial) -> str:
        if trial.status == "TERMINATED":
            return (
                states.FINISHED
                if (trial.last_result or {}).get("epoch", 0) >= self.max_t
                else states.STOPPED_EARLY
            )
        return STATES.get(trial.status, trial.status.lower())

    def scratch(self) -> float | None:
        path = self.search_path / "baselines" / "scratch" / "outputs" / "metrics.json"
        try:
            return json.loads(path.read_text()).get("val_dice")
        except (OSError, ValueError):
            return None

    def best(self, trials) -> float | None:
        values = [
            v
            for t in trials
            if isinstance(v := (t.last_result or {}).get(self.metric), int | float) and math.isfinite(v)
        ]
        return (max if self.mode == "max" else min)(values) if values else None

    def eta(self, trials) -> str:
        ended = [t for t in trials if t.status in ("TERMINATED", "ERROR")]
        if not ended:
            return "ETA: after the first trial"
        per_trial = (time.monotonic() - self.started) * self.concurrency / len(ended)
        left = max(0, self.num_samples - len(ended)) * per_trial / self.concurrency
        return f"ETA: about {left / 60:.0f} min" if left >= 60 else f"ETA: about {left:.0f} s"

    def table(self, trials):
        from rich.table import Table

        scratch, best = self.scratch(), self.best(trials)
        ended = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        title = (
            f"{ended}/{self.num_samples} trials ended; best {self.metric} {_num(best)}; {self.eta(trials)}"
        )
        from rich import box

        # the trial's number (its name repeats the values of the knob columns) and the knobs' short names
        # (T, kd, lr), as `status` shows them: one line per trial at 80 columns
        knobs = [short_name(p) for p in self.space]
        table = Table(
            "trial",
            "state",
            *knobs,
            "epoch",
            self.metric,
            "gain",
            title=title,
            title_justify="left",
            box=box.SIMPLE_HEAD,
            pad_edge=False,
        )
        for column in table.columns:
            column.no_wrap = True
        for t in trials:
            last = t.last_result or {}
            value = last.get(self.metric)
            gain = value - scratch if isinstance(value, int | float) and scratch is not None else None
            mark = " *" if value is not None and value == best else ""
            table.add_row(
                trial_number(t),
                self.state(t),
                *(_num(t.config.get(p)) for p in self.space),
                f"{last.get('epoch', 0)}/{self.max_t}",
                _num(value) + mark,
                _num(gain, signed=True),
            )
        return table

    def line(self, trial, state: str, trials) -> str:
        last, scratch = trial.last_result or {}, self.scratch()
        value = last.get(self.metric)
        gain = (
            f", {value - scratch:+.4f} over scratch"
            if isinstance(value, int | float) and scratch is not None
            else ""
        )
        score = f", {self.metric} {_num(value)}{gain}" if value is not None else ""
        best = self.best(trials)
        so_far = f"best so far {_num(best)}; " if best is not None else ""
        return f"{trial}: {state} at epoch {last.get('epoch', 0)}/{self.max_t}{score} ({so_far}{self.eta(trials)})"


def _num(value, signed: bool = False) -> str:
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "" if value is None else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    return f"{value:+.4f}" if signed else f"{value:.4g}"
