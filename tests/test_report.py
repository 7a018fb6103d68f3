"""The report of a search: the leaderboard's one "best trial" rule, the trials in the order they ran,
the plots' axes, and report.html, from small search folders written as a real search writes them."""

import json
import time
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from PIL import Image

from tests.conftest import free_port
from tskd_tune.report import (
    best_trial,
    curves_axes,
    objective_board,
    optuna_axes,
    references,
    run_links,
    run_order,
    study,
    trial_number,
    trial_state,
    write_report,
)


def board(*rows: tuple[str, str, float]) -> pd.DataFrame:
    """A leaderboard as objective_board returns it: best first, with a state per trial."""
    return pd.DataFrame(
        [{"trial_id": t, "state": s, "val_dice": d, "trial_dir": f"/runs/s/{t}"} for t, s, d in rows]
    )


def test_a_finished_trial_beats_better_scores_of_stopped_ones():
    b = board(
        ("a", "stopped_early", 0.9), ("b", "running", 0.8), ("c", "finished", 0.7), ("d", "finished", 0.6)
    )
    best = best_trial(b)
    assert best["trial_id"] == "c" and best["trial_dir"] == "/runs/s/c" and best["val_dice"] == 0.7


def test_ties_keep_the_board_order():
    b = board(("a", "stopped_early", 0.9), ("b", "finished", 0.7), ("c", "finished", 0.7))
    assert best_trial(b)["trial_id"] == "b"
    assert best_trial(b.iloc[[0, 2, 1]].reset_index(drop=True))["trial_id"] == "c"


def test_with_no_finished_trial_the_first_row_is_best():
    b = board(("a", "stopped_early", 0.9), ("b", "failed", 0.8), ("c", "stopped_early", 0.5))
    assert best_trial(b)["trial_id"] == "a"
    assert best_trial(board(("only", "running", float("nan"))))["trial_id"] == "only"


# --- a search folder as Ray Tune, the trials and the search's end write it --------------------------------

SCRATCH = {"val_dice": 0.50, "test_dice": 0.52, "val_hd95": 9.0, "test_hd95": 9.5, "student_params": 12462}
TEACHER = {"val_dice": 0.80, "test_dice": 0.81, "val_hd95": 4.0, "test_hd95": 4.2, "student_params": 124068}
SPACE = {
    "distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0},
    "distill.kd_weight": {"type": "uniform", "low": 0.1, "high": 2.0},
}
# (number, trial id, val Dice per epoch, finished): run order t001..t005; best first t003, t005, t004, t001, t002
TRIALS = [
    (1, "aa01", [0.40, 0.55, 0.60], True),
    (2, "bb02", [0.45, 0.50, 0.55], True),
    (3, "cc03", [0.50, 0.65, 0.72], True),
    (4, "dd04", [0.65], False),
    (5, "ee05", [0.52, 0.66, 0.70], True),
]


def space():
    from pydantic import TypeAdapter

    from tskd_tune.space import Distribution

    return {k: TypeAdapter(Distribution).validate_python(v) for k, v in SPACE.items()}


def write_search(root: Path, trials=TRIALS, uri: str = "sqlite:////srv/runs/mlflow.db", dirname=None) -> Path:
    """A small search folder in the layout a real search leaves: search.json, one folder per trial with
    Ray Tune's params.json and result.json, the trial's outputs, the reference trials and summary.json."""
    root.mkdir(parents=True)
    (root / "search.json").write_text(
        json.dumps(
            {
                "config": {},
                "parent_run_id": "p" * 32,
                "options": {
                    "name": root.name,
                    "storage": str(root.parent),
                    "tracking_uri": uri,
                    "address": None,
                    "space_file": "",
                },
            }
        )
    )
    for number, tid, dice, finished in trials:
        d = root / (dirname(number, tid) if dirname else f"t{number:03d}_{tid}")
        params = {
            "distill.temperature": 1.0 + 0.6 * number % 7,
            "distill.kd_weight": 0.1 * (1 + number * 3 % 7),
        }
        (d / "outputs").mkdir(parents=True)
        (d / "params.json").write_text(json.dumps(params))
        start = 1_796_000_000 + 100 * number
        rows = [
            {
                "epoch": e,
                "train_loss": 1.0 / e,
                "val_dice": v,
                "val_dice_kidney": v,
                "val_hd95": 10 - 5 * v,
                "mlflow_run_id": f"{tid}{'0' * 28}",
                "timestamp": start + 30 * e,
                "trial_id": tid,
                "config": params,
            }
            for e, v in enumerate(dice, start=1)
        ]
        (d / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if finished:
            (d / "outputs" / "metrics.json").write_text(json.dumps({"val_dice": dice[-1], "method": "ts_kd"}))
            Image.new("RGB", (408, 64), (number * 40, 90, 200)).save(d / "outputs" / "val_overlays.png")
    for method, metrics in (("scratch", SCRATCH), ("teacher", TEACHER)):
        (root / "baselines" / method / "outputs").mkdir(parents=True)
        (root / "baselines" / method / "outputs" / "metrics.json").write_text(json.dumps(metrics))
    (root / "summary.json").write_text(json.dumps({"best_trial": "cc03", "test_dice": 0.71}))
    return root


def tables(page: str) -> list[list[list[str]]]:
    """Every table of an HTML page: rows of cell texts."""

    class Tables(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tables, self.cell = [], None

        def handle_starttag(self, tag, attrs):
            if tag == "table":
                self.tables.append([])
            elif tag == "tr":
                self.tables[-1].append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                self.tables[-1][-1].append(self.cell.strip())
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    parser = Tables()
    parser.feed(page)
    return parser.tables


def test_trials_are_numbered_by_their_folder_names():
    assert trial_number("t007_ab12cd34") == 7 and trial_number("t012_ab12cd34") == 12
    assert trial_number("_trainable_7de5caa3_12_distill_kd_weight=1.1879_2026-12-02_02-44-57") == 12
    assert trial_number("t_ab12cd34") is None


def test_the_study_holds_the_trials_in_the_order_they_ran(tmp_path):
    board = objective_board(write_search(tmp_path / "s"), [("val_dice", "max")])
    assert list(board["trial_id"]) == ["cc03", "ee05", "dd04", "aa01", "bb02"]  # best first
    st = study(board, space(), [("val_dice", "max")])
    # t004 was stopped by the scheduler after epoch 1: pruned, its score an intermediate value, not a result
    assert [t.state.name for t in st.trials] == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED", "COMPLETE"]
    assert [t.value for t in st.trials] == [0.60, 0.55, 0.72, None, 0.70]
    assert st.trials[3].intermediate_values == {1: 0.65}
    assert [t.user_attrs["name"] for t in st.trials] == ["t001", "t002", "t003", "t004", "t005"]


def test_without_numbers_the_first_report_orders_the_trials(tmp_path):
    # ids that sort against the run order, in folders without a number: only the timestamps tell
    trials = [(1, "zz", [0.3], True), (2, "mm", [0.9], True), (3, "aa", [0.6], True)]
    board = objective_board(
        write_search(tmp_path / "s", trials, dirname=lambda n, t: f"t_{t}"), [("val_dice", "max")]
    )
    assert list(run_order(board)["trial_id"]) == ["zz", "mm", "aa"]
    assert [t.value for t in study(board, space(), [("val_dice", "max")]).trials] == [0.3, 0.9, 0.6]


def test_a_trial_without_a_value_keeps_its_place_in_the_history(tmp_path):
    trials = [*TRIALS[:2], (3, "cc03", [], False), *TRIALS[3:]]  # t003 has not reported yet
    st = study(
        objective_board(write_search(tmp_path / "s", trials), [("val_dice", "max")]),
        space(),
        [("val_dice", "max")],
    )
    assert [t.state.name for t in st.trials] == ["COMPLETE", "COMPLETE", "FAIL", "PRUNED", "COMPLETE"]
    assert [t.value for t in st.trials if t.value is not None] == [0.60, 0.55, 0.70]


def test_plots_name_their_axes_after_the_metric_and_trials(tmp_path):
    objectives = [("val_dice", "max"), ("val_hd95", "min")]
    axes = optuna_axes(objective_board(write_search(tmp_path / "s"), objectives), space(), objectives)
    try:
        history = axes["history"]
        assert history.get_ylabel() == "val_dice"
        history.figure.canvas.draw()
        assert [t.get_text() for t in history.get_xticklabels() if t.get_text()] == [
            "t001",
            "t002",
            "t003",
            "t004",
            "t005",
        ]
        importances = axes["importances"]
        assert "from 4 trials" in importances.get_title(
            "left"
        )  # the finished ones: t004 was stopped and "fewer than 10" in importances.get_title("left")
        assert [t.get_text() for t in importances.get_legend().get_texts()] == ["val_dice"]
        assert (axes["pareto_front"].get_xlabel(), axes["pareto_front"].get_ylabel()) == (
            "val_dice",
            "val_hd95",
        )
    finally:
        plt.close("all")


def test_ten_trials_lift_the_importance_caveat(tmp_path):
    trials = [(n, f"{n:04x}", [0.3 + 0.04 * (n % 7)], True) for n in range(1, 11)]
    path = write_search(tmp_path / "s", trials)
    axes = optuna_axes(objective_board(path, [("val_dice", "max")]), space(), [("val_dice", "max")])
    title = axes["importances"].get_title("left")
    plt.close("all")
    assert "from 10 trials" in title and "fewer" not in title
    page = (write_report(path, tmp_path / "report", space(), [("val_dice", "max")])["html"]).read_text()
    assert "Hyperparameter importances (from 10 trials)" in page and "Only 10 trials" not in page


def test_curves_show_every_trial_by_name_with_the_best_highlighted(tmp_path):
    path = write_search(tmp_path / "s")
    board = objective_board(path, [("val_dice", "max")])
    ax = curves_axes(board, best_trial(board)["trial_id"], references(path))
    try:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == [
            "t001  0.6000",
            "t002  0.5500",
            "t003  0.7200  (best)",
            "t004  0.6500",
            "t005  0.7000",
            "scratch reference  0.5000",
            "teacher reference  0.8000",
        ]
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines["t003  0.7200  (best)"].get_ydata()) == [0.50, 0.65, 0.72]
        assert list(lines["t004  0.6500"].get_xdata()) == [1]  # stopped after one epoch
        widths = {label: line.get_linewidth() for label, line in lines.items()}
        assert widths["t003  0.7200  (best)"] > 2 * max(w for k, w in widths.items() if "best" not in k)
        assert ax.get_ylabel() == "val_dice" and ax.get_xlabel() == "epoch"
    finally:
        plt.close("all")


def test_the_report_page_has_the_leaderboard_references_curves_overlays_and_runs(tmp_path):
    path = write_search(tmp_path / "s")
    out = tmp_path / "report"
    written = write_report(path, out, space(), [("val_dice", "max")])
    assert {
        "leaderboard",
        "curves",
        "overlays",
        "history",
        "parallel_coordinates",
        "importances",
        "html",
    } <= set(written)
    assert all(p.is_file() and p.parent == out for p in written.values())
    page = written["html"].read_text()
    board, refs = tables(page)
    head = board[0]
    assert head[:4] == ["trial", "state", "epochs", "val_dice"] and "gain_vs_scratch" in head
    col = {
        name: head.index(name) for name in ("trial", "state", "gain_vs_scratch", "test Dice", "MLflow run")
    }
    rows = {r[col["trial"]].rstrip(" ★"): r for r in board[1:]}
    assert [r[col["trial"]] for r in board[1:]] == ["t003 ★", "t005", "t004", "t001", "t002"]
    assert (
        rows["t003"][col["gain_vs_scratch"]] == "+0.2200"
        and rows["t002"][col["gain_vs_scratch"]] == "+0.0500"
    )
    assert rows["t003"][col["test Dice"]] == "0.7100" and rows["t005"][col["test Dice"]] == "–"
    assert rows["t004"][col["state"]] == "stopped early" and rows["t001"][col["state"]] == "finished"
    assert rows["t001"][col["MLflow run"]] == "aa01" + "0" * 28
    assert '<tr class="best"><td class="l">t003 ★' in page
    assert refs[1][:3] == ["scratch", "0.5000", "0.5200"] and refs[2][:3] == ["teacher", "0.8000", "0.8100"]
    assert inlined(out / "curves.png") in page and Image.open(out / "curves.png").size[0] >= 900
    best = path / "t003_cc03" / "outputs" / "val_overlays.png"
    # the page holds its images: one file that MLflow's artifact preview shows whole
    assert (
        inlined(out / "best_overlays.png") in page
        and (out / "best_overlays.png").read_bytes() == best.read_bytes()
    )
    assert "src='" not in page.replace("src='data:image/png;base64,", "")
    assert "tskd-tune ui --uri sqlite:////srv/runs/mlflow.db" in page
    assert "Only 4 trials" in page  # the importance caveat, under the plot (finished trials only)
    order = [
        page.index(inlined(out / "importances.png")),
        page.index("Only 4 trials"),
        page.index(inlined(out / "parallel_coordinates.png")),
    ]
    assert order == sorted(order)
    assert "http" not in page.replace("http-equiv", "")  # nothing to fetch: the page opens offline


def test_an_unreachable_mlflow_server_leaves_the_run_ids(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    written = write_report(
        write_search(tmp_path / "s", uri=uri), tmp_path / "report", space(), [("val_dice", "max")]
    )
    assert time.monotonic() - t0 < 60
    page = written["html"].read_text()
    assert f"MLflow at <code>{uri}</code> did not answer" in page
    assert "<code>cc03" + "0" * 28 + "</code>" in page and "#/experiments/" not in page


def test_a_reachable_mlflow_server_gets_links_to_each_run(monkeypatch):
    from mlflow.tracking import MlflowClient

    asked = []
    monkeypatch.setattr(
        MlflowClient,
        "get_run",
        lambda self, run_id: asked.append(run_id) or SimpleNamespace(info=SimpleNamespace(experiment_id="7")),
    )
    links, note = run_links("https://mlflow.example.org/", ["a" * 32, "b" * 32])
    assert links["b" * 32].startswith(
        f'<a href="https://mlflow.example.org/#/experiments/7/runs/{"b" * 32}">'
    )
    assert (
        asked == ["a" * 32] and "experiment 7" in note
    )  # one question for all runs: they share the experiment


def test_without_search_json_the_run_ids_stand_alone():
    links, note = run_links(None, ["abc"])
    assert links == {"abc": "<code>abc</code>"} and "no <code>search.json</code>" in note


def test_the_end_of_search_report_shows_the_best_trials_test_dice_before_summary_json_exists(tmp_path):
    """The search writes its report, then summary.json: the summary it hands over is what the page shows."""
    path = write_search(tmp_path / "s")
    (path / "summary.json").unlink()

    def best_test_dice(summary):
        written = write_report(path, tmp_path / "r", space(), [("val_dice", "max")], summary=summary)
        board = tables(written["html"].read_text())[0]
        return dict(zip(board[0], board[1], strict=True))["test Dice"]

    assert best_test_dice({"best_trial": "cc03", "test_dice": 0.64}) == "0.6400"
    assert best_test_dice(None) == "–"  # read from summary.json, which is not there yet


def test_a_search_whose_trials_have_not_reported_yet_gets_a_page(tmp_path):
    path = write_search(tmp_path / "s", [(1, "aa01", [], False), (2, "bb02", [], False)])
    (path / "summary.json").unlink()  # still running
    written = write_report(path, tmp_path / "report", space(), [("val_dice", "max")])
    assert set(written) == {"leaderboard", "importances_json", "html"}  # no plot: no trial has a value yet
    assert json.loads(written["importances_json"].read_text())["trials"] == 0
    board = tables(written["html"].read_text())[0]
    assert [r[:2] for r in board[1:]] == [["t001", "pending"], ["t002", "pending"]]  # no best yet


def inlined(png: Path) -> str:
    import base64

    return f"<img src='data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()}'"


def test_a_trials_state_reads_its_folder_in_the_words_of_its_mlflow_run(tmp_path):
    def trial(name: str, *files: str) -> object:
        folder = tmp_path / name
        for f in files:
            (folder / f).parent.mkdir(parents=True, exist_ok=True)
            (folder / f).write_text("{}")
        folder.mkdir(exist_ok=True)
        return folder

    epochs = [{"epoch": 1, "done": False}]
    assert trial_state(trial("t001_a", "outputs/metrics.json"), epochs, ended=False) == "finished"
    assert trial_state(trial("t002_b"), [], ended=False) == "pending"
    assert trial_state(trial("t003_c"), epochs, ended=False) == "running"
    assert trial_state(trial("t003_c"), epochs, ended=True) == "stopped_early"
    # Ray marks the result on which the scheduler stopped the trial
    assert trial_state(trial("t004_d"), [{"epoch": 1, "done": True}], ended=False) == "stopped_early"
    assert trial_state(trial("t005_e", "error.txt"), epochs, ended=False) == "failed"
    (tmp_path / "failed_trials").mkdir()
    (tmp_path / "failed_trials" / "f.json").write_text(json.dumps({"status": "timed_out", "error": "hung"}))
    assert trial_state(trial("t006_f", "error.txt"), epochs, ended=True) == "timed_out"
    # a trial Ray retried after its worker died (node lost) and that reported again is not failed
    retried = trial("t007_g")
    failed_at = time.mktime(time.strptime("2026-12-05_18-17-29", "%Y-%m-%d_%H-%M-%S"))
    (retried / "error.txt").write_text(
        "Failure # 1 (occurred at 2026-12-05_18-17-29)\nThe actor ... is unavailable\n"
    )
    later = [{"epoch": 1, "timestamp": failed_at - 5}, {"epoch": 2, "timestamp": failed_at + 30}]
    assert trial_state(retried, later, ended=False) == "running"
    assert trial_state(trial("t007_g", "outputs/metrics.json"), later, ended=True) == "finished"
    assert trial_state(retried, later[:1], ended=True) == "failed"  # nothing after the failure


def test_the_report_shows_the_best_trials_synthetic_pool_its_gates_and_what_the_filter_kept(tmp_path):
    import numpy as np

    from tskd_tune.synth.grid import sample_grid

    path = write_search(tmp_path / "s")
    pool_dir = tmp_path / "cache" / "synth_pool" / "abc"
    rng = np.random.default_rng(0)
    sample_grid(rng.random((20, 1, 32, 32)), rng.random((30, 1, 32, 32)), pool_dir / "grid.png")
    metrics = path / "t003_cc03" / "outputs" / "metrics.json"
    metrics.write_text(
        json.dumps(
            json.loads(metrics.read_text())
            | {
                "synth_pool": 128,
                "synth_pool_dir": str(pool_dir),
                "synth_fd": 0.81,
                "synth_precision": 0.74,
                "synth_recall": 0.4,
                "synth_nn_ratio": 1.3,
                "synth_gate_passed": False,
                "synth_gate_reasons": "feature recall 0.20 < 0.25",
                "transfer_synthetic": 40,
                "synth_drawn": 40,
                "synth_kept": 29,
            }
        )
    )
    written = write_report(path, tmp_path / "report", space(), [("val_dice", "max")])
    page = written["html"].read_text()
    synth = dict(tables(page)[-1])
    assert (
        synth["images in the pool"] == "128" and synth["feature precision (in the real manifold)"] == "0.74"
    )
    assert synth["feature Fréchet distance (of the real variance)"] == "0.810"
    assert synth["gates (pixel, then semantic)"] == "FAILED: feature recall 0.20 < 0.25"
    assert synth["kept by synthetic.filter"] == "29 of 40 drawn"
    assert written["synthetic_grid"].read_bytes() == (pool_dir / "grid.png").read_bytes()
    assert inlined(tmp_path / "report" / "synthetic_grid.png") in page

    # a search without synthetic images has no such section
    plain = write_report(write_search(tmp_path / "p"), tmp_path / "r2", space(), [("val_dice", "max")])
    assert "Synthetic pool" not in plain["html"].read_text() and "synthetic_grid" not in plain


def test_run_ids_of_a_local_store_link_to_the_run_pages_tskd_tune_ui_serves(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.create_experiment("e")
    run = client.create_run(exp).info.run_id
    links, note = run_links(uri, [run])
    assert links[run] == f'<a href="http://127.0.0.1:5000/#/experiments/{exp}/runs/{run}">{run[:8]}…</a>'
    assert f"tskd-tune ui --uri {uri}</code> serves it at http://127.0.0.1:5000" in note
    # a store that is not there (moved, or on another machine) is not created by asking it: the ids stand
    gone = f"sqlite:///{tmp_path}/elsewhere/mlflow.db"
    links, note = run_links(gone, [run])
    assert links[run] == f"<code>{run}</code>" and not (tmp_path / "elsewhere").exists()


def test_the_best_overlays_show_validation_slices_spread_over_the_split(tmp_path, tiny):
    """Not the first six: the figure is the best student on slices from one end of the split to the other."""
    import numpy as np
    import torch

    from tskd_tune.data.inspect import comparison_grid, spread_indices
    from tskd_tune.data.prepare import load
    from tskd_tune.export import load_trial_student
    from tskd_tune.trial import run_trial

    path = write_search(tmp_path / "s")
    outputs = path / "t003_cc03" / "outputs"  # the best trial: a real student in its folder
    cfg = tiny(distill={"method": "scratch"}, student={"epochs": 1})
    run_trial(cfg, out_dir=outputs)
    written = write_report(path, tmp_path / "report", space(), [("val_dice", "max")])
    prepared, splits = load(cfg)
    fg = (np.asarray(prepared.masks[splits.val]) > 0).reshape(len(splits.val), -1).sum(1)
    idx = spread_indices(splits.val, 6, foreground=fg)
    assert list(idx) != list(splits.val[:6]) and idx[-1] > splits.val[5]
    model, _, _ = load_trial_student(outputs)
    images = np.asarray(prepared.images[idx], dtype=np.float32)
    with torch.inference_mode():
        pred = model(torch.from_numpy(images)).argmax(1).numpy().astype(np.uint8)
    expected = comparison_grid(images, np.asarray(prepared.masks[idx]), pred, prepared.classes)
    drawn = Image.open(written["overlays"])
    assert drawn.size == expected.size and np.array_equal(
        np.asarray(drawn.convert("RGB")), np.asarray(expected)
    )
    assert "6 validation images spread over the split" in written["html"].read_text()
