"""Before an interrupted search is restored: make Ray Tune's searcher state agree with its experiment state.

Tune saves the search generator (how many trials it has proposed, which ones the concurrency limiter holds
as live) and the experiment (the trials) in separate files. A driver killed between a proposal and the next
save of the experiment leaves a proposed trial that only the searcher state knows: restored as is, the search
believes it has run it (one trial short, never run) and the concurrency limiter keeps a slot for it forever
(at ``max_concurrent: 1`` nothing runs at all). Here such trials are forgotten: the count comes back to the
recorded trials, the limiter's slot is freed, and their Optuna trials end FAIL, so ``resume`` proposes them
again and runs exactly the trials the search asked for.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from pathlib import Path


def _newest(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def recorded_trials(folder: Path) -> set[str] | None:
    """The trial ids of the newest experiment state in ``folder`` (None: no experiment state)."""
    state = _newest(folder, "experiment_state-*.json")
    if state is None:
        return None
    data = json.loads(state.read_text())
    return {
        json.loads(entry[0] if isinstance(entry, list) else entry)["trial_id"] for entry in data["trial_data"]
    }


def _rewrite(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        pickle.dump(obj, f)
    os.replace(tmp, path)


def reconcile(folder: Path) -> list[str]:
    """Forget the proposed trials the experiment never recorded (see the module); their ids."""
    folder = Path(folder)
    recorded = recorded_trials(folder)
    generator = _newest(folder, "search_gen_state-*.json")
    if recorded is None or generator is None:
        return []
    with open(generator, "rb") as f:
        gen = pickle.load(f)
    limiter = gen.get("name:ConcurrencyLimiter", {})
    live = set(limiter.get("live_trials", set()))
    searcher_file = _newest(folder, "searcher-state-*.pkl")
    searcher = None
    if searcher_file is not None:
        with open(searcher_file, "rb") as f:
            searcher = pickle.load(f)
    proposed = set((searcher or {}).get("_ot_trials", {})) | live
    lost = sorted(proposed - recorded)
    extra = gen.get("counter", 0) - len(recorded)
    if not lost and extra <= 0:
        return []
    gen["counter"] = min(gen.get("counter", 0), len(recorded))
    gen["finished"] = False
    if limiter:
        limiter["live_trials"] = live & recorded
        limiter["num_unfinished_live_trials"] = len(limiter["live_trials"])
    if searcher is not None and lost:
        from optuna.trial import TrialState

        for trial_id in lost:
            ot_trial = searcher["_ot_trials"].pop(trial_id, None)
            if ot_trial is not None:
                with contextlib.suppress(RuntimeError, ValueError):  # already finished in the study
                    searcher["_ot_study"].tell(ot_trial, state=TrialState.FAIL)
        _rewrite(searcher_file, searcher)
    _rewrite(generator, gen)
    return lost or [f"(unnamed {i + 1})" for i in range(extra)]
