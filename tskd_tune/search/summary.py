"""The end of a search: the leaderboard, the best trial (its config and its test score), the reference
trials and every trial's gain over the scratch student, logged to the MLflow parent run, which is tagged
with its best child run and described by a markdown leaderboard."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from tskd_tune import fidelity, tracking
from tskd_tune.cache import atomic_write
from tskd_tune.config import Config
from tskd_tune.report import best_trial, leaderboard_csv, objective_board, references, test_dice, trial_label
from tskd_tune.search.folder import GRACE_FILE, SearchOptions, state_path
from tskd_tune.search.parent_view import describe_parent, mlflow_metric, score_text
from tskd_tune.search.staged import TEACHER_STAGE

if TYPE_CHECKING:
    from tskd_tune.reporter import Reporter


def summarize(cfg: Config, opts: SearchOptions, results, parent: str, data: tuple, say: Reporter) -> dict:
    """Leaderboard, best config and the best trial evaluated once on the test split; logged to the parent.
    The report is written after it, with the summary in hand (:func:`write_search_report`)."""
    c = tracking.BufferedClient(opts.tracking_uri, tracking.journal_path(state_path(opts), "parent"))
    objectives = cfg.search.objective_items()
    metric, _ = objectives[0]
    board = objective_board(opts.path, objectives)
    board_path = opts.path / "leaderboard.csv"

    def write_board(tests: dict[str, float]) -> None:
        leaderboard_csv(board, tests).to_csv(board_path, index=False)
        c.log_artifact(parent, str(board_path))

    errors = sum(1 for r in results if r.error is not None)
    summary = {"trials": len(board), "errored": errors, "leaderboard": str(board_path)}
    if board.empty or board[metric].isna().all():
        write_board({})
        say.line("no trial produced a result")
        return summary
    if len(objectives) > 1:
        front = board[board["pareto"]]
        front_path = opts.path / "pareto.csv"
        front.to_csv(front_path, index=False)
        c.log_artifact(parent, str(front_path))
        summary["pareto_front"] = front["trial_id"].tolist()
        say.line(
            f"Pareto front ({', '.join(f'{m} {d}' for m, d in objectives)}): "
            f"{len(front)} of {len(board)} trials, in {front_path}"
        )
        print(front[["trial_id", *[m for m, _ in objectives]]].to_string(index=False))
    # the best trial that ran to the end: an ASHA-stopped trial's score is from fewer epochs and it has no
    # student to test (with several objectives every trial ends, and the best in the first is on the front)
    best = best_trial(board)
    trial_dir = Path(best["trial_dir"])
    best_cfg_path = opts.path / "best.yaml"
    atomic_write(best_cfg_path, (trial_dir / "outputs" / "config.yaml").read_text())
    c.log_artifact(parent, str(best_cfg_path))
    test = evaluate_on_test(trial_dir / "outputs", data)
    summary |= {
        "best_trial": best["trial_id"],
        "best_" + metric: float(best[metric]),
        "best_config": str(best_cfg_path),
        **test,
    }
    # as the report reads it: summary.json is not written yet
    write_board(test_dice(opts.path, board, summary))
    refs = reference_metrics(opts.path)
    summary |= refs
    if "reference_scratch_val_dice" in refs:
        summary["best_gain_vs_scratch"] = float(best["gain_vs_scratch"])
        if "test_dice" in test and "reference_scratch_test_dice" in refs:
            summary["best_test_gain_vs_scratch"] = test["test_dice"] - refs["reference_scratch_test_dice"]
        for _, row in board.dropna(subset=["gain_vs_scratch", "mlflow_run_id"]).iterrows():
            c.log_batch(
                row["mlflow_run_id"], metrics=[mlflow_metric("gain_vs_scratch", row["gain_vs_scratch"])]
            )
    below = teacher_below_scratch(refs)
    if below:
        summary["teacher_below_scratch"] = True
        c.set_tag(parent, TEACHER_BELOW_SCRATCH_TAG, "true")
    trust = early_stopping(cfg, opts.path)
    summary |= {"rank_correlation": trust} if trust else {}
    grace = grace_supported(cfg, opts.path)
    summary |= {"grace_from_data": grace} if grace else {}
    pilots = {
        stage: note
        for stage, folder in (("search", opts.path), ("teacher", opts.path / TEACHER_STAGE))
        if (note := read_grace(folder))
    }
    summary |= {"grace_from_pilot": pilots} if pilots else {}
    c.log_batch(
        parent,
        metrics=[
            mlflow_metric(k, v)
            for k, v in tracking.numeric(
                {k: v for k, v in summary.items() if k.startswith(("best_", "reference_"))}
                | test
                | {f"rank_corr_epoch_{r['epoch']}": r["spearman"] for r in trust}
                | ({"grace_from_data": grace["epoch"]} if grace and grace["epoch"] else {})
            ).items()
        ],
    )
    view = describe_parent(c, parent, cfg, opts.name, board, best, summary)
    shown = board.drop(columns=["trial_id", "trial_dir", "mlflow_run_id"])
    shown.insert(0, "trial", board.apply(trial_label, axis=1))  # t007: the name of its folder and MLflow run
    print(shown.head(10).to_string(index=False))
    for line in reference_lines(refs):
        say.line(line)
    if below:
        say.warn(below)
    gain = (
        f"; {summary['best_gain_vs_scratch']:+.4f} val Dice over scratch"
        if "best_gain_vs_scratch" in summary
        else ""
    )
    say.line(  # test_dice "–" when there is no test score, never nan
        f"best trial {trial_label(best)} ({best['trial_id']}): {metric} {best[metric]:.4f}{gain}; "
        f"test_dice {score_text(test.get('test_dice'))}; config {best_cfg_path}"
    )
    for line in trust_lines(trust, metric) + grace_lines(grace, cfg):
        say.line(line)
    if view:  # MLflow's runs table shows no scores or values until columns are picked: this view has them
        uri = opts.tracking_uri
        where = (
            f"`tskd-tune ui --uri {uri}`, then http://127.0.0.1:5000/"
            if uri.startswith("sqlite:")
            else f"{tracking.mask_secrets(uri).rstrip('/')}/"
        )
        say.line(f"compare the trials in MLflow: {where}{view}")
    return summary


def write_search_report(cfg: Config, opts: SearchOptions, parent: str, say: Reporter, summary: dict) -> None:
    """report.html (with its images inside), its plots and importances.json in SEARCH/report, all logged on the
    parent run, so the MLflow UI shows them without running `tskd-tune report`; the three most important paths
    are printed. ``summary``: what the search found, the best trial's test Dice included."""
    from tskd_tune.report import top, write_report

    out = opts.path / "report"
    try:
        written = write_report(opts.path, out, cfg.search.space, cfg.search.objective_items(), summary)
    except Exception as exc:  # noqa: BLE001 - the search's results stand without their report
        say.line(f"report: not written ({exc.__class__.__name__}: {str(exc)[:200]})")
        return
    client = tracking.BufferedClient(opts.tracking_uri, tracking.journal_path(state_path(opts), "parent"))
    for kind, path in written.items():
        if kind != "leaderboard":  # already on the run, beside summary's best.yaml
            client.log_artifact(parent, str(path), "report")
    found = top(json.loads(written["importances_json"].read_text()))
    if found:
        say.line("most important: " + ", ".join(f"{k} {v:.2f}" for k, v in found))


def early_stopping(cfg: Config, search_path: Path) -> list[dict]:
    """The rank correlation of each rung's score with the final score (none under FIFO, or when the grace
    period was to come from the data and none was taken)."""
    if cfg.search.scheduler == "fifo":
        return []
    from tskd_tune.methods import get_method

    s, max_t = cfg.search, get_method(cfg.distill.method).reported_epochs(cfg)
    grace = s.grace_period or (read_grace(search_path) or {}).get("grace_period")
    if grace is None:
        return []
    return fidelity.rank_correlations(
        search_path, s.metric, fidelity.rungs(grace, s.reduction_factor, max_t), max_t
    )


def read_grace(search_path: Path) -> dict | None:
    """The grace period the search took from its pilot trials (``grace.json``), if it took one."""
    try:
        return json.loads((Path(search_path) / GRACE_FILE).read_text())
    except (OSError, ValueError):
        return None


def grace_supported(cfg: Config, search_path: Path) -> dict | None:
    """For a FIFO search (every trial runs to the end) of one objective: the grace period its trials' curves
    support (:func:`fidelity.grace_from_data`), with the correlation there; None for ASHA, Pareto searches
    or methods that report once."""
    from tskd_tune.methods import get_method

    s = cfg.search
    max_t = get_method(cfg.distill.method).reported_epochs(cfg)
    if s.scheduler != "fifo" or len(s.objective_items()) > 1 or max_t < 2:
        return None
    curves = list(fidelity.histories(search_path, s.metric).values())
    epoch, corr = fidelity.grace_from_data(curves, max_t)
    finished = corr[-1]["trials"]
    at = next((r for r in corr if r["epoch"] == epoch), None)
    return {"epoch": epoch, "spearman": at["spearman"] if at else None, "trials": finished, "max_t": max_t}


def grace_lines(grace: dict | None, cfg: Config) -> list[str]:
    """What a FIFO search says about early stopping in this space: the grace period its data supports."""
    if not grace:
        return []
    metric, trials = cfg.search.metric, grace["trials"]
    if trials < fidelity.MIN_TRIALS:
        return [
            f"early stopping: {trials} trials ran to the end, too few to say which grace period ASHA could use "
            f"({fidelity.MIN_TRIALS} or more are needed)"
        ]
    if grace["epoch"] is None:
        return [
            f"early stopping: over {trials} trials that ran to the end, {metric} before epoch {grace['max_t']} "
            f"ranks them unlike their final {metric} (rank correlation below {fidelity.TRUST}): keep "
            f"search.scheduler: fifo"
        ]
    return [
        f"early stopping: over {trials} trials that ran to the end, {metric} from epoch {grace['epoch']} on "
        f"ranks them like their final {metric} (rank correlation >= {fidelity.TRUST}; {grace['spearman']:.2f} "
        f"at epoch {grace['epoch']}): with search.scheduler: asha, search.grace_period should be at least "
        f"{grace['epoch']} (more is safer: a few trials make this a noisy estimate)"
    ]


def trust_lines(trust: list[dict], metric: str) -> list[str]:
    """What the rank correlations say: one line of figures, and a warning line when they are low."""
    if not trust:
        return []
    finished = max(r["trials"] for r in trust)
    if finished < fidelity.MIN_RANKED:  # no rung has a correlation: say why in words, never "nan"
        return [
            f"early stopping: {finished} trial(s) ran to the end, too few to rank-correlate {metric} at each "
            f"rung with its final value ({fidelity.MIN_RANKED} or more are needed, {fidelity.MIN_TRIALS} to "
            "judge)"
        ]

    def figure(r: dict) -> str:
        rho = r["spearman"]
        if rho is not None and math.isfinite(rho):
            return f"epoch {r['epoch']}: {rho:.2f} ({r['trials']} trials)"
        why = (
            "too few" if r["trials"] < fidelity.MIN_RANKED else "their scores tie, at the rung or at the end"
        )
        return f"epoch {r['epoch']}: undefined ({r['trials']} trials; {why})"

    figures = ", ".join(figure(r) for r in trust)
    if trust[0]["trials"] < fidelity.MIN_TRIALS:
        figures += f" (too few finished trials to judge: {fidelity.MIN_TRIALS} or more are needed)"
    warning = fidelity.warning(trust, metric)
    return [f"early stopping: rank correlation of {metric} with its final value at each rung: {figures}"] + (
        [warning] if warning else []
    )


def reference_metrics(search_path: Path) -> dict:
    """``reference_<method>_<metric>`` for the finished reference trials (val and test Dice, HD95)."""
    return {
        f"reference_{method}_{k}": float(m[k])
        for method, m in references(search_path).items()
        for k in ("val_dice", "val_hd95", "test_dice", "test_hd95")
        if m.get(k) is not None
    }


TEACHER_BELOW_SCRATCH_TAG = "tskd.teacher_below_scratch"


def teacher_below_scratch(refs: dict) -> str | None:
    """One line when the teacher reference scores below the scratch student on val Dice (what every
    distilled student is compared with): distilling it cannot be expected to pay. None otherwise."""
    teacher, scratch = refs.get("reference_teacher_val_dice"), refs.get("reference_scratch_val_dice")
    if teacher is None or scratch is None or teacher >= scratch:
        return None
    return (
        f"warning: the teacher (val Dice {teacher:.4f}) is below the scratch student ({scratch:.4f}): "
        "distilling it is unlikely to beat scratch; try teacher.head: sam_decoder or teacher.adapt: lora"
    )


def reference_lines(refs: dict) -> list[str]:
    """One line per reference trial: its val and test Dice."""
    methods = dict.fromkeys(k.split("_")[1] for k in refs)
    return [
        f"reference {m}: val_dice {score_text(refs.get(f'reference_{m}_val_dice'))}, "
        f"test_dice {score_text(refs.get(f'reference_{m}_test_dice'))}"
        for m in methods
    ]


def evaluate_on_test(outputs: Path, data: tuple) -> dict:
    """The best trial's student on the test split, once, after the search."""
    from tskd_tune.export import load_trial_student
    from tskd_tune.metrics import evaluate

    if not (outputs / "student.safetensors").is_file():
        return {}
    model, _, _ = load_trial_student(outputs)
    prepared, splits = data
    idx = splits.test
    return evaluate(model, prepared.images[idx], prepared.masks[idx], prepared.classes, prefix="test_")
