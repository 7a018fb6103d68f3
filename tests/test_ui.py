"""MLflow as a person compares trials in it: one small real search, then `mlflow ui` on its store, looked at
with headless Chromium: the runs table, a trial's run page, the search's parent run and the compare view.
Then the search folder and the store are moved together and the artifacts still open.

Run with `make test-ui` (minutes: a real search; needs Debian's chromium). With TSKD_UI_SCREENSHOTS=docs the
screenshots of the README (docs/mlflow_*.png) are taken anew; otherwise they go to a temporary folder.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.browser import Browser, chromium
from tests.conftest import free_port

pytestmark = [pytest.mark.ui, pytest.mark.skipif(chromium() is None, reason="needs Debian's chromium")]

TRAINING = "workflowType=machine_learning"  # MLflow's UI opens on its GenAI pages otherwise


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    """A finished 4-trial ASHA search with its reference trials; the store beside it in runs/ (the default
    layout), launched from another folder: (tmp, client, experiment id, parent run, child runs by name)."""
    from tests.conftest import tiny_raw

    tmp = tmp_path_factory.mktemp("ui")
    raw = tiny_raw(tmp, student={"epochs": 3}, teacher={"epochs": 5})
    raw["tracking"] = {"uri": f"sqlite:///{tmp}/runs/mlflow.db", "experiment": "ui"}
    raw["search"] = {
        "num_samples": 4,
        "max_concurrent": 2,
        "grace_period": 1,
        "scheduler": "asha",
        "space": {
            "distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0},
            "distill.kd_weight": {"type": "uniform", "low": 0.2, "high": 2.0},
        },
    }
    (tmp / "ui.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tskd_tune",
            "launch",
            tmp / "ui.yaml",
            "--storage",
            tmp / "runs",
            "--name",
            "demo",
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(elsewhere.iterdir()) == []  # no ./mlruns (MLflow's default) in the folder it ran from
    client = MlflowClient(raw["tracking"]["uri"])
    exp = client.get_experiment_by_name("ui").experiment_id
    runs = client.search_runs([exp], max_results=100)
    parent = next(r for r in runs if r.info.run_name == "demo")
    children = {
        r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
    }
    return tmp, client, exp, parent, children


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = os.environ.get("TSKD_UI_SCREENSHOTS")
    return Path(folder) if folder else tmp_path_factory.mktemp("screenshots")


@contextmanager
def serving(cmd: list, port: int, log: Path, env: dict | None = None):
    """A UI server started by ``cmd`` on ``port``; its base URL while the block runs."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=os.environ | (env or {})
        )
    base = f"http://127.0.0.1:{port}/"
    try:
        t0 = time.monotonic()
        while not _up(base):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() - t0 < 300, "the MLflow UI did not start in 300 s"
            time.sleep(1)
        yield base
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _up(base: str) -> bool:
    try:
        with urllib.request.urlopen(base + "health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def ui(search):
    """`mlflow ui` on the search's store (as `tskd-tune ui` starts it) and a browser: (base URL, browser)."""
    from tskd_tune.cli.search import UI_ENV, ui_command

    tmp = search[0]
    port = free_port()
    with (
        serving(
            ui_command(f"sqlite:///{tmp}/runs/mlflow.db", port), port, tmp / "mlflow-ui.log", UI_ENV
        ) as base,
        Browser(1600, 1000) as browser,
    ):
        yield base, browser


def show(browser: Browser, url: str, *texts: str) -> str:
    """Open ``url``, wait for ``texts``, close MLflow's assistant panel (it covers a third of the page)."""
    browser.goto(url)
    text = browser.wait_text(*texts)
    if "MLflow Assistant" in text:
        browser.js("document.querySelector('button[aria-label=Close]')?.click()")
        time.sleep(1)
    return browser.text()


def trials(children: dict) -> list[str]:
    return sorted(n for n in children if re.fullmatch(r"t00\d .+", n))


def test_the_runs_table_nests_the_trials_under_their_search_and_shows_their_values(search, ui, shots):
    _, client, exp, parent, children = search
    base, browser = ui
    names = trials(children)
    assert len(names) == 4 and all(re.fullmatch(r"t00\d T=[\d.]+ kd=[\d.]+", n) for n in names), names
    # MLflow's own runs table: the search is one row; its trials are nested under it
    text = show(browser, f"{base}#/experiments/{exp}/runs?{TRAINING}", "demo", "matching runs")
    assert not any(n in text for n in names)
    browser.js(
        f"""document.querySelector('[row-id="{parent.info.run_id}"] [col-id="attributes.`Run Name`"] button').click()"""
    )
    browser.wait_text(*names, "reference scratch", "reference teacher")
    indent = browser.js(
        "Object.fromEntries([...document.querySelectorAll('.ag-cell-value a')].map(a => [a.innerText.trim(),"
        " parseInt(a.closest('.ag-cell-value').querySelector('div[style*=width]').style.width)]))"
    )
    assert all(
        indent[n] > indent["demo"] for n in [*names, "reference scratch"]
    )  # drawn inside the search's row
    # the table the parent run links to: this search's runs with what compares them (sorted by the score once
    # the view's query has answered: seen in docs/mlflow_runs.png, not asserted, as it took over 90 s under load)
    link = re.search(
        r"\((#/experiments/[^)]*viewStateShareKey=[^)]*)\)", parent.data.tags["mlflow.note.content"]
    )
    text = show(
        browser,
        base + link.group(1),
        *names,
        "val_dice",
        "gain_vs_scratch",
        "val_hd95",
        "tskd.status",
        "distill.temperature",
        "distill.kd_weight",
        "stopped_early"
        if any(r.data.tags["tskd.status"] == "stopped_early" for r in children.values())
        else "finished",
    )
    assert "Failed" not in text and "Killed" not in text  # a trial stopped early is not shown as a failure
    browser.screenshot(shots / "mlflow_runs.png")


def test_a_trials_run_page_shows_its_name_parent_scores_and_artifacts(search, ui, shots):
    _, _, exp, parent, children = search
    base, browser = ui
    best = parent.data.tags["tskd.best_run_name"]
    run = children[best]
    assert run.info.run_id == parent.data.tags["tskd.best_run_id"]
    text = show(
        browser,
        f"{base}#/experiments/{exp}/runs/{run.info.run_id}?{TRAINING}",
        best,
        "Parent run",
        "val_dice",
        "student_params",
        "tskd.status",
        "Best trial",  # its description says it is the search's best
        "test_dice",  # and it holds the test score measured for it when the search ended
    )
    assert "demo" in text and "epoch_s" not in text and "final_" not in text
    metrics = text[text.index("Metrics (") : text.index("Parameters (")]
    assert metrics.index("val_dice") < metrics.index("train_loss")  # the score first
    browser.screenshot(shots / "mlflow_run.png")
    show(
        browser,
        f"{base}#/experiments/{exp}/runs/{run.info.run_id}/artifacts/trial_summary.json?{TRAINING}",
        "config.yaml",
        "student.safetensors",
        "val_overlays.png",
        '"total_s"',
    )


def test_the_search_run_names_its_best_trial_and_describes_the_leaderboard(search, ui, shots):
    _, _, exp, parent, children = search
    base, browser = ui
    best = parent.data.tags["tskd.best_run_name"]
    browser.resize(1600, 1300)
    show(
        browser,
        f"{base}#/experiments/{exp}/runs/{parent.info.run_id}?{TRAINING}",
        "Search demo",
        "Child runs",
    )
    browser.click("Show more")
    text = browser.wait_text("Reference trials", "Best config", "gain vs scratch")
    assert all(n in text for n in trials(children)) and "scratch" in text and "teacher" in text
    href = browser.js(
        f"[...document.querySelectorAll('a')].find(a => a.innerText.trim() === {json.dumps(best)}).href"
    )
    assert href.endswith(
        f"/runs/{parent.data.tags['tskd.best_run_id']}?{TRAINING}"
    )  # each trial links to its run
    browser.screenshot(shots / "mlflow_search.png")
    browser.resize(1600, 1000)


def test_the_report_on_the_search_run_previews_whole_with_the_best_trials_test_dice(search, ui, shots):
    """MLflow's artifact preview of report.html: the page holds its images (a preview has no folder beside it
    to load them from), the best trial's test Dice is filled in (the report is written after the test
    evaluation), and every plot reached the run."""
    tmp, client, exp, parent, _ = search
    base, browser = ui
    summary = json.loads((tmp / "runs" / "demo" / "summary.json").read_text())
    report = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.html", "report/best_overlays.png", "report/parallel_coordinates.png"} <= report
    show(
        browser,
        f"{base}#/experiments/{exp}/runs/{parent.info.run_id}/artifacts/report/report.html?{TRAINING}",
        "report.html",
    )
    browser.wait(lambda: browser.js("!!document.querySelector('iframe')"), what="the HTML preview")
    # the preview's page, as the iframe holds it (srcdoc) or as it fetches it from the server (src)
    page = browser.js(
        "(async () => { const f = document.querySelector('iframe');"
        " return f.srcdoc || await (await fetch(f.src)).text(); })()"
    )
    sources = re.findall(r"src='([^']*)'", page)
    assert len(sources) >= 3 and all(s.startswith("data:image/png;base64,") for s in sources), sources[:3]
    assert f"{summary['test_dice']:.4f}" in page  # the best trial's test Dice, not "–"
    browser.screenshot(shots / "mlflow_report_preview.png")


def test_the_compare_view_shows_the_trials_by_name_with_their_scores(search, ui, shots):
    _, _, exp, _, children = search
    base, browser = ui
    names = trials(children)
    ids = json.dumps([children[n].info.run_id for n in names])
    browser.resize(1600, 1500)
    text = show(
        browser,
        f'{base}#/compare-runs?runs={ids}&experiments=["{exp}"]&{TRAINING}',
        *names,
        "val_dice",
        "gain_vs_scratch",
        "distill.temperature",
    )
    assert "Something went wrong" not in text
    # the parallel-coordinates plot starts on the first metric every run has: the score
    picked = browser.js(
        "[...document.querySelectorAll('[class$=select-selection-item]')].map(e => e.innerText.trim())"
    )
    assert "val_dice" in picked and not any(p.startswith("system/") for p in picked)
    browser.screenshot(shots / "mlflow_compare.png")
    browser.resize(1600, 1000)


def test_artifacts_still_open_after_the_search_and_its_store_move_together(search, ui):
    tmp, _, exp, parent, children = search
    _, browser = ui
    run = children[parent.data.tags["tskd.best_run_name"]]
    moved = tmp / "moved" / "runs"
    moved.parent.mkdir()
    shutil.move(tmp / "runs", moved)
    uri = f"sqlite:///{moved}/mlflow.db"
    port = free_port()
    cmd = [sys.executable, "-m", "tskd_tune", "ui", "--uri", uri, "--port", str(port)]
    with serving(cmd, port, tmp / "moved-ui.log") as base:
        assert "artifacts of ui found beside the moved store" in (tmp / "moved-ui.log").read_text()
        show(
            browser,
            f"{base}#/experiments/{exp}/runs/{run.info.run_id}/artifacts/trial_summary.json?{TRAINING}",
            "val_overlays.png",
            '"total_s"',
        )
        show(
            browser,
            f"{base}#/experiments/{exp}/runs/{parent.info.run_id}/artifacts/best.yaml?{TRAINING}",
            "leaderboard.csv",
            "temperature:",
        )
    client = MlflowClient(uri)
    assert client.get_run(run.info.run_id).info.artifact_uri.startswith(str(moved / "mlartifacts"))
    assert (
        Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp)))
        .read_text()
        .startswith("name:")
    )
