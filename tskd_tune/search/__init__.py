"""The search service: Ray Tune runs ``run_trial`` under OptunaSearch and ASHA, recording to MLflow.

Data flow: the driver checks everything that needs no Ray, preprocesses the data once and puts it in
Ray's object store, fills the teacher's feature cache, opens the MLflow parent run, starts the reference
trials, then Ray Tune starts trials (:mod:`.trainable`, a thin adapter around ``run_trial``). The driver
marks every child run's final status and writes the leaderboard, the best config and its test score.

- :mod:`.folder`     the search folder: options, search.json, locating a search
- :mod:`.session`    a search (launched or resumed) as one typed session, one method per lifecycle step
- :mod:`.launch`     the session's parts: input checks, Ray, the data, the parent run, the reference trials
- :mod:`.tuner`      samplers and schedulers by name, the study storage, trial names, the Tuner
- :mod:`.trainable`  the trial adapter and the reference trial
- :mod:`.features`   filling the teacher-feature cache over the cluster before the trials
- :mod:`.summary`    leaderboard, best trial, test score, gains over scratch
"""

# Lazy (PEP 562): every trial's process imports this package on the way to :mod:`.trainable`, and must not pay
# for the driver's modules (launch, summary, the report's pandas and plots: about 0.7 s a worker)
_EXPORTS = {
    "REFERENCES": "folder",
    "SEARCH_FILE": "folder",
    "SearchOptions": "folder",
    "load_search": "folder",
    "resolve_search_path": "folder",
    "state_path": "folder",
    "absolutize": "launch",
    "init_ray": "launch",
    "SearchSession": "session",
    "evaluate_on_test": "summary",
    "reference_lines": "summary",
    "reference_metrics": "summary",
    "summarize": "summary",
    "SAMPLERS": "tuner",
    "SCHEDULERS": "tuner",
    "study_storage": "tuner",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
