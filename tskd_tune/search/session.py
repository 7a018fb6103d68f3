"""A search from start to end, as one typed session (:class:`SearchSession`).

Its lifecycle, one method per step, in the order :meth:`SearchSession.run` calls them:

1. :meth:`~SearchSession.check`            the cheap checks, before anything starts (bad input ends here)
2. :meth:`~SearchSession.prepare_data`     the checks that read (teacher, MLflow, dataset: bad input ends here too)
                                           beside Ray's start, the data in its object store, the synthetic pool,
                                           the teacher features
3. :meth:`~SearchSession.open_parent_run`  the MLflow parent run and search.json
4. :meth:`~SearchSession.fit`              the reference trials and the Tuner (both stages of a staged search)
5. :meth:`~SearchSession.summarise`        leaderboard, the best trial on the test split, summary.json
6. :meth:`~SearchSession.report`           report.html and its plots on the parent run, which then ends

Every step takes what the earlier steps returned (frozen records) and returns its own; the options are
frozen, nothing is changed in place. What the session prints goes through its :class:`Reporter`.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tskd_tune import cluster, tracking
from tskd_tune.cache import write_json
from tskd_tune.config import Config
from tskd_tune.reporter import Reporter
from tskd_tune.search import launch as parts
from tskd_tune.search import staged
from tskd_tune.search.folder import SearchOptions, SearchRun, state_path
from tskd_tune.search.restore import reconcile

# summary, tuner and warm are imported where they are used: they pull in torch, pandas and Optuna (about 3 s on
# 2 cores), which a local search imports in the thread that checks its input while Ray starts

if TYPE_CHECKING:
    from ray import ObjectRef
    from ray.tune import ResultGrid

    from tskd_tune.data.prepare import Prepared, Splits


@dataclass(frozen=True)
class SearchData:
    """What :meth:`SearchSession.prepare_data` hands on."""

    cfg: Config
    """The config the trials run: on a cluster, its trial cache moved to shared storage."""
    data: tuple[Prepared, Splits]
    """The data, preprocessed once, and its splits (the driver's copy: the summary tests the best trial on it)."""
    ref: ObjectRef
    """The same in Ray's object store, which shares it read-only with every trial on a node."""
    fill: dict[str, Any] = field(default_factory=dict)
    """The teacher-feature fill's figures (written to summary.json)."""


@dataclass(frozen=True)
class Fitted:
    """What :meth:`SearchSession.fit` hands on."""

    results: ResultGrid
    """The (student stage's) trials, as Ray Tune returns them."""
    teachers: tuple[str, ...] | None = None
    """A staged search's chosen teachers (None: one stage)."""


@dataclass(frozen=True)
class SearchSession:
    """One search (or the resumption of one): ``SearchSession(cfg, opts, Reporter(console)).run()``."""

    cfg: Config
    opts: SearchOptions
    say: Reporter
    resume: bool = False
    warm: tuple[tuple[dict, float], ...] = ()
    """(params, value) of the warm-start searches' finished trials, told to the study first."""
    started: float = field(default_factory=time.time)
    clock: float = field(default_factory=time.perf_counter)

    def run(self) -> dict:
        """Every step in order; returns the summary, also written to the search folder."""
        session = self.check()
        data = session.prepare_data()
        session = dataclasses.replace(session, cfg=data.cfg)
        run = session.open_parent_run()
        fitted = session.fit(data, run)
        summary = session.summarise(data, run, fitted)
        session.report(run, summary)
        return summary

    def check(self) -> SearchSession:
        """The checks that start nothing: the tracking URI's form, storage, the search folder, the warm-start
        searches. Returns the session with its paths and URIs made absolute (trials run elsewhere)."""
        parts.quiet_env()
        cfg, opts = parts.check_input(self.cfg, self.opts, self.resume)
        warm: tuple = ()
        if opts.warm_start and not self.resume:  # a resumed study already holds them
            from tskd_tune.search.warm import warm_trials

            trials, lines, found = warm_trials(cfg, list(opts.warm_start))
            found = tuple(str(Path(f).resolve()) for f in found)  # search.json is read from anywhere
            opts, warm = dataclasses.replace(opts, warm_start=found), tuple(trials)
            for line in lines:
                self.say.line(line)
        return dataclasses.replace(self, cfg=cfg, opts=opts, warm=warm)

    def prepare_data(self) -> SearchData:
        """Ray started (a local one while MLflow and the dataset are checked and the data prepared) or joined;
        the data in its object store; the teacher features computed once, on every worker, before any trial."""
        import ray

        cfg, opts = self.cfg, self.opts

        def teacher_then_reach() -> None:
            parts.check_teacher(cfg)  # the first to import torch, MLflow and Optuna (about 3 s on 2 cores)
            # not before: a bad teacher's error is the only line
            self.say.line(f"preparing data ({cfg.data.dataset}) ...")
            parts.reach(cfg, opts)

        if opts.address is None:
            # a local Ray starts (about 5 s, in its own processes) while, on another thread, the driver's heavy
            # modules are imported, the teacher, MLflow and the dataset are checked and the data is prepared; bad
            # input stops Ray again before its one error line
            def checks_then_data():
                teacher_then_reach()
                return parts.load_data(cfg)

            with ThreadPoolExecutor(1) as pool_of_one:
                prepared = pool_of_one.submit(checks_then_data)
                dashboard = parts.init_ray(opts.address)
                try:
                    pool, data = prepared.result()
                except BaseException:
                    ray.shutdown()
                    raise
        else:
            teacher_then_reach()
            dashboard = parts.init_ray(opts.address)
            # before the data: on a cluster the trial cache (and the synthetic pool built next) moves to shared storage
            cfg = cluster.prepare(cfg, opts, self.say)
            pool, data = parts.load_data(cfg)
        parts.ready(cfg, opts, self.resume, self.say)
        from tskd_tune.search.tuner import keep_cache

        if cfg.cache.enabled and cfg.cache.max_gb and (line := keep_cache(cfg, self.started)):
            self.say.line(line)
        if dashboard:
            self.say.line(dashboard)
        ref = ray.put(data)
        from tskd_tune.search.features import teacher_notice

        if line := teacher_notice(cfg, *data):
            self.say.line(line)
        fill: dict = {}
        if cfg.cache.enabled:
            from tskd_tune.search.features import fill_features

            fill = fill_features(cfg, *data, ref, pool, self.say)
        # after the fill, which imports MONAI's transforms on this thread for augmented views: importing MONAI
        # from two threads at once fails in its transforms ("applying transform RandFlipd")
        parts.preload_in_background()
        return SearchData(cfg, data, ref, fill)

    def open_parent_run(self) -> SearchRun:
        """The MLflow parent run (reused on resume) and search.json; what every trial is told of the search."""
        parent = parts.parent_run(self.cfg, self.opts, self.resume, self.say)
        return SearchRun(
            self.opts.tracking_uri, parent, state_path(self.opts), self.started, cluster.mlflow_env()
        )

    def fit(self, data: SearchData, run: SearchRun) -> Fitted:
        """The reference trials (Ray tasks beside the search) and the search itself, to its end."""
        cfg, opts = self.cfg, self.opts
        references = parts.start_references(cfg, data.ref, run)
        parts.warn_when_teacher_below_scratch(references, self.say, run)
        parent_client = tracking.BufferedClient(
            opts.tracking_uri, tracking.journal_path(run.state_path, "parent")
        )
        try:
            if cfg.search.strategy == "staged":
                fitted = self._staged(run, data.ref)
            else:
                fitted = Fitted(self._tune(cfg, opts, run, data.ref, warm=self.warm))
        finally:
            parent_client.update_run(run.parent_run_id, status="RUNNING")
        parts.finish_references(references, self.say)
        if cluster.is_uri(opts.storage):  # trial results and outputs went to the URI: fetch them to summarize
            cluster.pull(opts.location, opts.path)
        if self.resume:
            parts.close_lost_children(opts, run.parent_run_id, fitted.results, self.say)
        return fitted

    def summarise(self, data: SearchData, run: SearchRun, fitted: Fitted) -> dict:
        """Leaderboard, best config, the best trial once on the test split, gains over the references:
        logged to the parent run and written to summary.json."""
        from tskd_tune.search.summary import summarize

        summary = summarize(self.cfg, self.opts, fitted.results, run.parent_run_id, data.data, self.say)
        summary |= data.fill | ({"teachers": list(fitted.teachers)} if fitted.teachers is not None else {})
        summary["wall_s"] = time.perf_counter() - self.clock
        write_json(self.opts.path / "summary.json", summary)
        if cluster.is_uri(self.opts.storage):
            cluster.push(
                self.opts.path,
                self.opts.location,
                ["summary.json", "leaderboard.csv", "pareto.csv", "best.yaml"],
            )
        return summary

    def report(self, run: SearchRun, summary: dict) -> None:
        """report.html and its plots (written with the summary in hand) on the parent run, which then ends;
        MLflow writes queued during an outage that has ended are delivered."""
        opts = self.opts
        if "best_trial" in summary:
            from tskd_tune.search.summary import write_search_report

            write_search_report(self.cfg, opts, run.parent_run_id, self.say, summary)
        parent_client = tracking.BufferedClient(
            opts.tracking_uri, tracking.journal_path(run.state_path, "parent")
        )
        parent_client.set_terminated(run.parent_run_id, status="FINISHED")
        _, _, queued = tracking.sync_journals(run.state_path)  # the rest wait for `tskd-tune sync`
        if queued:
            self.say.line(
                f"MLflow is unreachable: {queued} write(s) are kept in {run.state_path / tracking.JOURNAL_DIR}; "
                f"`tskd-tune sync {opts.path}` delivers them"
            )

    def _tune(
        self,
        cfg: Config,
        opts: SearchOptions,
        run: SearchRun,
        data_ref,
        study: str | None = None,
        warm: tuple = (),
    ) -> ResultGrid:
        """Run (or, when it was interrupted, restore and continue) one Ray Tune experiment to its end."""
        restore = self.resume and (opts.path / "tuner.pkl").exists()
        if restore and not cluster.is_uri(opts.storage) and (lost := reconcile(opts.path)):
            self.say.line(
                f"resume: {len(lost)} trial(s) proposed just before the driver stopped were never recorded; "
                f"they are proposed again"
            )
        from tskd_tune.search import ray_log

        # Ray's own lines and retried trials' tracebacks: a file, not the console
        log = ray_log.route(state_path(opts))
        from tskd_tune.search.tuner import build_tuner

        return build_tuner(
            cfg,
            opts,
            run,
            data_ref,
            restore=restore,
            resume=self.resume,
            study=study,
            warm=list(warm),
            console=self.say.console,
            driver_log=log,
        ).fit()

    def _staged(self, run: SearchRun, data_ref) -> Fitted:
        """Both stages of a staged search (see :mod:`.staged`): teachers, then students of the best of them."""
        cfg, opts = self.cfg, self.opts
        teachers = staged.chosen_teachers(opts) if self.resume else None
        if teachers is None:
            self.say.line(
                f"teacher stage: {cfg.search.teacher_trials} teacher(s) over {', '.join(staged.teacher_knobs(cfg))}"
            )
            self._tune(
                staged.teacher_stage(cfg),
                staged.stage_options(opts, "teacher"),
                dataclasses.replace(run, stage="teacher"),
                data_ref,
                study=f"{opts.name}-teacher",
            )
            teachers = staged.choose_teachers(cfg, opts)
        self.say.line(f"student stage: distilling the best {len(teachers)} teacher(s): {'; '.join(teachers)}")
        if note := staged.fewer_teachers(cfg, teachers):
            self.say.line(note)
        results = self._tune(
            staged.student_stage(cfg, teachers),
            opts,
            dataclasses.replace(run, stage="student", teachers=teachers),
            data_ref,
            study=f"{opts.name}-student",
        )
        return Fitted(results, tuple(teachers))
