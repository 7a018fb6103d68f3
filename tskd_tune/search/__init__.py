"""The search service: Ray Tune runs ``run_trial`` under OptunaSearch and ASHA, recording to MLflow.

Data flow: the driver checks everything that needs no Ray, preprocesses the data once and puts it in
Ray's object store, fills the teacher's feature cache, opens the MLflow parent run, starts the reference
trials, then Ray Tune starts trials (:mod:`.trainable`, a thin adapter around ``run_trial``). The driver
marks every child run's final status and writes the leaderboard, the best config and its test score.

- :mod:`.folder`     the search folder: options, search.json, locating a search
- :mod:`.launch`     launch / resume, Ray, the data, the parent run, the reference trials
- :mod:`.tuner`      samplers and schedulers by name, the study storage, trial names, the Tuner
- :mod:`.trainable`  the trial adapter and the reference trial
- :mod:`.features`   filling the teacher-feature cache over the cluster before the trials
- :mod:`.summary`    leaderboard, best trial, test score, gains over scratch
"""

from tskd_tune.search.folder import (
           REFERENCES,
           SEARCH_FILE,
           SearchOptions,
           load_search,
           resolve_search_path,
           state_path,
)
from tskd_tune.search.launch import absolutize, init_ray, launch
from tskd_tune.search.summary import evaluate_on_test, reference_lines, reference_metrics, summarize
from tskd_tune.search.tuner import SAMPLERS, SCHEDULERS, study_storage

__all__ = ["REFERENCES", "SAMPLERS", "SCHEDULERS", "SEARCH_FILE", "SearchOptions", "absolutize", "evaluate_on_test",
           "init_ray", "launch", "load_search", "reference_lines", "reference_metrics", "resolve_search_path",
           "state_path", "study_storage", "summarize"]  # fmt: skip
