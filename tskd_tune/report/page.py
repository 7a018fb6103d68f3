"""``report.html``: one self-contained page (inline CSS, images beside it, nothing fetched) with the
leaderboard, the reference trials, the curves, the best trial's overlays, Optuna's plots and each trial's
MLflow run."""

from __future__ import annotations

import base64
import html
import json
import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from tskd_tune.cache import write_json
from tskd_tune.errors import TskdError
from tskd_tune.report.board import (
    best_trial,
    leaderboard_csv,
    objective_board,
    references,
    test_dice,
    trial_label,
)
from tskd_tune.report.importance import importances
from tskd_tune.report.links import run_links
from tskd_tune.report.plots import FEW_TRIALS, completed, curves_plot, optuna_plots, study

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d232b;
       margin: 0 auto; padding: 24px 32px 60px; max-width: 1280px; background: #fafbfc; }
h1 { font-size: 26px; margin: 0 0 4px; } h2 { font-size: 19px; margin: 34px 0 8px; border-bottom: 1px solid #dde1e6;
     padding-bottom: 4px; }
.sub { color: #56606b; margin: 0 0 14px; }
.cards { display: flex; gap: 14px; flex-wrap: wrap; margin: 14px 0; }
.card { background: #fff; border: 1px solid #dde1e6; border-radius: 8px; padding: 10px 16px; min-width: 150px; }
.card .k { color: #56606b; font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.card .v { font-size: 22px; font-weight: 600; }
table { border-collapse: collapse; background: #fff; border: 1px solid #dde1e6; font-size: 13.5px; }
th, td { padding: 5px 10px; border-bottom: 1px solid #eef0f3; text-align: right; white-space: nowrap; }
th { background: #f1f3f6; position: sticky; top: 0; font-weight: 600; white-space: normal; vertical-align: bottom; }
td.l, th.l { text-align: left; }
tr.best td { background: #fff6d6; font-weight: 600; }
.scroll { overflow-x: auto; max-width: 100%; }
.pos { color: #1a7f37; } .neg { color: #b42318; }
.state { border-radius: 10px; padding: 1px 8px; font-size: 12px; background: #eef0f3; }
.state.finished { background: #dcf3e3; color: #12612b; } .state.error { background: #fde2e0; color: #93190f; }
.state.stopped { background: #fff0d1; color: #7a4d00; }
code { background: #eef0f3; padding: 1px 5px; border-radius: 4px; font-size: 12.5px; }
img { max-width: 100%; border: 1px solid #dde1e6; background: #fff; }
.note { color: #56606b; font-size: 13.5px; max-width: 900px; }
.caveat { background: #fff6d6; border-left: 4px solid #e0a800; padding: 6px 12px; max-width: 880px; }
"""


def _fmt(value, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool | str):
        return html.escape(str(value))
    if isinstance(value, int | np.integer):
        return f"{value:,}"
    return format(float(value), spec)


def _search_json(search_path: Path) -> dict:
    try:
        return json.loads((Path(search_path) / "search.json").read_text())
    except (OSError, ValueError):
        return {}


def _state(state: str) -> str:
    kind = {"finished": "finished", "failed": "error", "timed_out": "error", "stopped_early": "stopped"}.get(
        state, ""
    )
    return f'<span class="state {kind}">{html.escape(state.replace("_", " "))}</span>'


def _board_table(
    board: pd.DataFrame,
    best_id: str,
    objectives: list[tuple[str, str]],
    space: dict,
    tests: dict[str, float],
    links: dict[str, str],
) -> str:
    metrics = [m for m, _ in objectives]
    params = [p for p in space if p in board.columns]
    cols = [
        "trial",
        "state",
        "epochs",
        *metrics,
        "gain_vs_scratch",
        "val_dice",
        "test Dice",
        "val_hd95",
        *(["pareto"] if "pareto" in board.columns else []),
        *params,
        "MLflow run",
    ]
    cols = list(dict.fromkeys(cols))
    # long dotted parameter names may break after a dot, so that the table fits beside the run ids
    head = "".join(
        f'<th class="{"l" if c in ("trial", "state", "MLflow run") else ""}">'
        f"{html.escape(c).replace('.', '.<wbr>')}</th>"
        for c in cols
    )
    rows = []
    for _, r in board.iterrows():
        best = str(r["trial_id"]) == str(best_id)
        gain = r.get("gain_vs_scratch")
        cells = {
            "trial": f"{html.escape(trial_label(r))}{' ★' if best else ''}",
            "state": _state(r["state"]),
            "epochs": _fmt(r["epoch"]),
            "test Dice": _fmt(tests.get(str(r["trial_id"]))),
            "gain_vs_scratch": f'<span class="{"pos" if gain > 0 else "neg"}">{_fmt(gain, "+.4f")}</span>'
            if gain is not None and not pd.isna(gain)
            else "–",
            "pareto": "✓" if r.get("pareto") else "",
            "MLflow run": links.get(r["mlflow_run_id"], "–") if isinstance(r["mlflow_run_id"], str) else "–",
        }
        cells |= {c: _fmt(r[c], ".3g" if c in params else ".4f") for c in cols if c not in cells and c in r}
        tds = "".join(
            f'<td class="{"l" if c in ("trial", "state", "MLflow run") else ""}">{cells[c]}</td>'
            for c in cols
        )
        rows.append(f'<tr class="{"best" if best else ""}">{tds}</tr>')
    return f'<div class="scroll"><table><tr>{head}</tr>{"".join(rows)}</table></div>'


def _references_table(refs: dict) -> str:
    if not refs:
        return (
            '<p class="note">No reference trial has finished (scratch and teacher run beside the search).</p>'
        )
    keys = [
        ("val_dice", "val Dice"),
        ("test_dice", "test Dice"),
        ("val_hd95", "val HD95"),
        ("test_hd95", "test HD95"),
        ("student_params", "parameters"),
    ]
    head = '<th class="l">reference</th>' + "".join(f"<th>{t}</th>" for _, t in keys)
    rows = "".join(
        f'<tr><td class="l">{html.escape(m)}</td>'
        + "".join(f"<td>{_fmt(r.get(k))}</td>" for k, _ in keys)
        + "</tr>"
        for m, r in refs.items()
    )
    return (
        f"<table><tr>{head}</tr>{rows}</table><p class='note'>Trials outside the search, on the same data: "
        "<b>scratch</b> is the student trained on the labels alone, <b>teacher</b> the fine-tuned teacher. "
        "<code>gain_vs_scratch</code> is a trial's val Dice minus the scratch student's.</p>"
    )


def write_report(
    search_path: Path,
    out_dir: Path,
    space: dict,
    objectives: list[tuple[str, str]],
    summary: dict | None = None,
) -> dict:
    """leaderboard.csv, plots (PNG), the best trial's overlays and report.html in ``out_dir``; returns what was
    written, ``kind -> path``. ``summary``: the search's end-of-search summary when it is not yet in
    ``summary.json`` (the search writes its report first); its best trial's test Dice goes on the page.

    report.html holds its images (data URIs): one file that opens anywhere, MLflow's artifact preview too.

    With several objectives the history, importance and parallel-coordinate plots show the first one,
    and a Pareto-front plot shows all of them (the first two when there are more than three).
    """
    search_path, out_dir = Path(search_path), Path(out_dir)
    board = objective_board(search_path, objectives)
    if board.empty:
        raise TskdError(f"{search_path}: no trials yet")
    out_dir.mkdir(parents=True, exist_ok=True)
    metric, mode = objectives[0]
    written = {"leaderboard": out_dir / "leaderboard.csv"}
    tests = test_dice(search_path, board, summary)
    leaderboard_csv(board, tests).drop(columns=["trial_dir"]).to_csv(written["leaderboard"], index=False)
    best = best_trial(board)
    refs = references(search_path)
    curves = curves_plot(board, best["trial_id"], refs, out_dir / "curves.png")
    if curves is not None:
        written["curves"] = curves
    outputs = Path(best["trial_dir"]) / "outputs"
    overlays_note = "The first validation images, their true masks and the best student's prediction."
    if _best_overlays(outputs, out_dir / "best_overlays.png"):
        written["overlays"] = out_dir / "best_overlays.png"
        overlays_note = (
            f"{OVERLAY_ROWS} validation images spread over the split (first to last, those with "
            "foreground first), their true masks and the best student's prediction."
        )
    elif (outputs / "val_overlays.png").is_file():  # the trial's own figure, when its student cannot be drawn
        written["overlays"] = out_dir / "best_overlays.png"
        shutil.copyfile(outputs / "val_overlays.png", written["overlays"])
    synthetic = _synthetic(best, out_dir, written)
    plots = optuna_plots(board, space, objectives, out_dir)
    written |= plots
    written["importances_json"] = out_dir / "importances.json"
    write_json(written["importances_json"], importances(board, space, objectives))
    n_done = completed(study(board, space, objectives[:1]))
    meta = _search_json(search_path)
    run_ids = [r for r in board["mlflow_run_id"] if isinstance(r, str)]
    links, mlflow_note = run_links(meta.get("options", {}).get("tracking_uri"), run_ids)
    page = _page(
        search_path,
        board,
        best,
        refs,
        tests,
        links,
        mlflow_note,
        written,
        n_done,
        space,
        objectives,
        overlays_note,
    )
    if synthetic:
        page = page.replace("</body>", synthetic + "</body>")
    page = _inline_images(page, out_dir)
    written["html"] = out_dir / "report.html"
    tmp = written["html"].with_name(".report.html.tmp")
    tmp.write_text(page)
    os.replace(tmp, written["html"])
    return written


OVERLAY_ROWS = 6
"""Validation images in the report's ``best_overlays.png``."""


def _best_overlays(outputs: Path, path: Path, n: int = OVERLAY_ROWS) -> bool:
    """Draw ``path``: the trained student of the trial folder ``outputs`` on ``n`` validation images spread over
    the split (:func:`~tskd_tune.data.inspect.spread_indices`, those with foreground first). False, and nothing
    written, when the trial has no student or its data is not in the cache it was prepared in (the report
    never preprocesses a dataset anew)."""
    from tskd_tune.data.inspect import val_overlays
    from tskd_tune.data.prepare import load
    from tskd_tune.export import load_trial_student

    try:
        model, cfg, _ = load_trial_student(outputs)
        if not cfg.cache.enabled or not Path(cfg.cache.dir).is_dir():
            return False
        prepared, splits = load(cfg)
    except Exception:  # noqa: BLE001 - a report never fails on one figure: the trial's own overlays stand in
        return False
    val_overlays(model, prepared, splits, path.parent, "cpu", n, name=path.name)
    return True


def _inline_images(page: str, folder: Path) -> str:
    """Each ``<img src='NAME.png'>`` of a file in ``folder`` as a data URI: the page needs no file beside it."""

    def inline(match: re.Match) -> str:
        path = folder / match.group(1)
        if not path.is_file():
            return match.group(0)
        return f"src='data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}'"

    return re.sub(r"src='([^'/]+\.png)'", inline, page)


SYNTH_ROWS = (
    ("synth_pool", "images in the pool", "d"),
    ("synth_fd", "feature Fréchet distance (of the real variance)", ".3f"),
    ("synth_precision", "feature precision (in the real manifold)", ".2f"),
    ("synth_recall", "feature recall (real variety covered)", ".2f"),
    ("synth_nn_ratio", "pixel nearest-real distance ratio", ".2f"),
)


def _synthetic(best: pd.Series, out_dir: Path, written: dict) -> str:
    """The best trial's synthetic pool: its grid, the two gates' figures and what the filter kept (HTML; empty
    when the trial drew no synthetic images or has not finished)."""
    try:
        m = json.loads((Path(best["trial_dir"]) / "outputs" / "metrics.json").read_text())
    except (OSError, ValueError, TypeError):
        return ""
    if not m.get("synth_pool"):
        return ""
    rows = [(label, format(m[k], spec)) for k, label, spec in SYNTH_ROWS if m.get(k) is not None]
    verdict = "passed" if m.get("synth_gate_passed") else f"FAILED: {m.get('synth_gate_reasons', '')}"
    rows.append(("gates (pixel, then semantic)", verdict))
    drawn = m.get("transfer_synthetic")
    if m.get("synth_kept") is not None:
        rows.append(("kept by synthetic.filter", f"{m['synth_kept']} of {m['synth_drawn']} drawn"))
    elif drawn is not None:
        rows.append(("drawn into the transfer set", f"{drawn} (no filter)"))
    table = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in rows)
    parts = [
        "<h2>Synthetic pool (best trial)</h2><p class='note'>The pool measured against the real training "
        "images: pixel statistics, then the teacher encoder's features (Fréchet distance, precision and recall "
        "on k-NN manifolds).</p>",
        f"<table>{table}</table>",
    ]
    grid = Path(m.get("synth_pool_dir", "")) / "grid.png"
    if grid.is_file():
        written["synthetic_grid"] = out_dir / "synthetic_grid.png"
        shutil.copyfile(grid, written["synthetic_grid"])
        parts.append(
            "<p class='note'>16 synthetic images (left) beside 16 training images (right).</p>"
            "<img src='synthetic_grid.png' alt='synthetic and real images'>"
        )
    return "".join(parts)


def _page(
    search_path,
    board,
    best,
    refs,
    tests,
    links,
    mlflow_note,
    written,
    n_done,
    space,
    objectives,
    overlays_note,
) -> str:
    name = html.escape(search_path.name)
    metric, mode = objectives[0]
    counts = board["state"].value_counts()
    states = ", ".join(f"{n} {html.escape(s)}" for s, n in counts.items())
    scored = not pd.isna(best[metric])  # before any trial reports, no trial is best
    best_name = html.escape(trial_label(best)) if scored else ""
    scratch = refs.get("scratch", {}).get("val_dice")
    gain = best.get("gain_vs_scratch")
    cards = [
        ("trials", f"{len(board)}"),
        (f"best {metric}", f"{_fmt(best[metric])} <small>{best_name}</small>"),
        ("best test Dice", _fmt(tests.get(str(best["trial_id"])))),
        ("gain vs scratch (val)", _fmt(gain, "+.4f") if scratch is not None else "–"),
        ("teacher val Dice", _fmt(refs.get("teacher", {}).get("val_dice"))),
    ]
    card_html = (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="k">{html.escape(k)}</div><div class="v">{v}</div></div>'
            for k, v in cards
        )
        + "</div>"
    )
    objective_text = ", ".join(
        f"{html.escape(m)} ({'higher' if d == 'max' else 'lower'} is better)" for m, d in objectives
    )
    parts = [
        f"<h1>Search {name}</h1><p class='sub'>{states}. Objective: {objective_text}. "
        f"Folder <code>{html.escape(str(search_path))}</code>.</p>{card_html}",
        f"<h2>Leaderboard</h2><p class='note'>Best first in {html.escape(metric)}; ★ marks the best trial that "
        "ran to the end (a trial stopped early scored after fewer epochs and has no test score). Test Dice is "
        "measured once, for the best trial, when the search ends.</p>",
        _board_table(board, best["trial_id"] if scored else None, objectives, space, tests, links),
        f"<p class='note'>{mlflow_note} The same table: <a href='leaderboard.csv'>leaderboard.csv</a>.</p>",
        "<h2>Reference trials</h2>",
        _references_table(refs),
    ]
    if "curves" in written:
        parts.append(
            "<h2>Validation Dice per epoch</h2><p class='note'>One line per trial; the best is black and "
            "thick, the reference trials dashed. Lines that end early belong to trials the scheduler "
            "stopped.</p><img src='curves.png' alt='val Dice per epoch of every trial'>"
        )
    if "overlays" in written:
        from PIL import Image

        # trials written before the overlays grew came as a 384 px strip: shown larger, pixels kept square
        width = Image.open(written["overlays"]).width
        size = f" width='{3 * width}' style='image-rendering: pixelated'" if width < 400 else ""
        parts.append(
            f"<h2>Best trial {best_name}: validation overlays</h2><p class='note'>{overlays_note}</p>"
            f"<img src='best_overlays.png'{size} alt='overlays of the best trial'>"
        )
    titles = {
        "history": "Optimization history",
        "importances": f"Hyperparameter importances (from {n_done} trials)",
        "parallel_coordinates": "Parallel coordinates",
        "pareto_front": "Pareto front",
    }
    for key, title in titles.items():
        if key not in written:
            continue
        parts.append(
            f"<h2>{html.escape(title)}</h2><img src='{written[key].name}' alt='{html.escape(title)}'>"
        )
        if key == "history":
            left_out = len(board) - n_done
            out = (
                (
                    f" The other {left_out} (stopped early by the scheduler, still running, errored, or with values "
                    "outside today's search space) are left out of this and the plots below."
                )
                if left_out
                else ""
            )
            parts.append(
                f"<p class='note'>One point per finished trial, its final {html.escape(metric)}, in the "
                f"order the trials started: a score after fewer epochs is not a result.{out}</p>"
            )
        if key == "importances" and n_done < FEW_TRIALS:
            parts.append(
                f"<p class='caveat'>Only {n_done} trials: with fewer than about {FEW_TRIALS}, the "
                "importances are fitted to too few points to rank the parameters; read them as a hint, "
                "not a finding.</p>"
            )
    return (
        f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Search {name}</title>"
        f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
