"""The real `tskd-tune` CLI in a subprocess: exit codes, one-line errors, no tracebacks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "search_spaces" / "demo.yaml"


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "tskd_tune", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or REPO,
        timeout=300,
    )


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for f in fragments:
        assert f in lines[0], lines[0]


def test_validate_prints_resolved_config_and_space():
    proc = cli("validate", DEMO, "--set", "distill.temperature=2.5")
    assert proc.returncode == 0, proc.stderr
    assert "temperature: 2.5" in proc.stdout
    assert "distill.kd_weight" in proc.stdout and "uniform(low=0.5, high=2.0)" in proc.stdout
    assert "model: litemedsam" in proc.stdout  # the demo distils the pretrained teacher
    assert "classes: background, grey_matter, white_matter" in proc.stdout


def test_validate_lists_every_problem_one_per_line(write_yaml):
    path = write_yaml("data: {labeled: 0}\ndistill: {temperature: -1}\n")
    proc = cli("validate", path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {path}: data.labeled: must be >= 1, got 0",
        f"error: {path}: distill.temperature: must be > 0, got -1",
    ]


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["validate", "/nonexistent.yaml"], ["/nonexistent.yaml: file not found"]),
        (["validate", DEMO, "--bogus"], ["No such option: --bogus"]),
        (["validate"], ["Missing argument"]),
        (["frobnicate"], ["No such command"]),
        (
            ["validate", DEMO, "--set", "distill.temperature"],
            ["--set 'distill.temperature': expected KEY=VALUE"],
        ),
        (
            ["validate", DEMO, "--set", "search.space.student.lr.low=0"],
            ["search.space.student.lr.low: must be > 0"],
        ),
    ],
)
def test_bad_invocations(args, fragments):
    assert_one_line_error(cli(*args), *fragments)


def test_data_inspect_demo_writes_preview_and_summary(tmp_path):
    out = tmp_path / "inspect"
    proc = cli(
        "data",
        "inspect",
        DEMO,
        "--out",
        out,
        "--json",
        "--set",
        f"cache.dir={tmp_path / 'cache'}",
        "--set",
        "data.options.stride=2",
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["images"] == 67 and summary["splits"]["labeled"] == 10  # every other axial slice
    assert sum(summary["splits"][k] for k in ("labeled", "unlabeled", "val", "test")) == 67
    assert set(summary["class_frequency"]) == {"background", "grey_matter", "white_matter"}
    assert 0.5 < summary["class_frequency"]["background"] < 0.99
    png = out / "preview.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "summary.json").read_text())["images"] == 67
    again = cli(
        "data",
        "inspect",
        DEMO,
        "--out",
        out,
        "--set",
        f"cache.dir={tmp_path / 'cache'}",
        "--set",
        "data.options.stride=2",
    )
    assert again.returncode == 0 and "(reused)" in again.stdout


def test_data_inspect_missing_dataset_root_explains_layout(tmp_path):
    proc = cli(
        "data",
        "inspect",
        REPO / "search_spaces" / "kidneyus.yaml",
        "--set",
        f"data.root={tmp_path / 'nope'}",
        "--set",
        f"cache.dir={tmp_path / 'cache'}",
    )
    assert_one_line_error(proc, str(tmp_path / "nope"), "kidneyus expects")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("*.npy"))


def test_ui_prints_its_link_once_the_server_answers_and_sigterm_stops_the_server(tmp_path):
    """`tskd-tune ui`: the link (on the latest search's runs view, at the port asked for) comes only once
    MLflow answers; the server's chatter goes to a log file; SIGTERM stops the server with the command."""
    import os
    import signal
    import time
    import urllib.request

    from mlflow.tracking import MlflowClient

    from tests.conftest import free_port

    store = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(store)
    exp = client.create_experiment("searches")
    parent = client.create_run(exp, run_name="demo").info.run_id
    client.set_experiment_tag(exp, f"mlflow.sharedViewState.tskd-{parent}", "{}")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tskd_tune", "ui", "--uri", store, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
    )

    def answers() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        line = proc.stdout.readline()
        assert answers(), line  # printed only once the server answers
        assert line.startswith(
            f"MLflow UI on http://127.0.0.1:{port}/#/experiments/{exp}/runs?viewStateShareKey=tskd-{parent}&"
        )
        assert f"server log: {tmp_path / f'mlflow-ui-{port}.log'}" in line
        taken = cli("ui", "--uri", store, "--port", port)
        assert_one_line_error(taken, f"--port {port}: 127.0.0.1:{port} is taken")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        deadline = time.monotonic() + 20
        while answers() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not answers()  # the server went with the command
        assert proc.stdout.read() == "" and proc.stderr.read() == ""  # no uvicorn lines, no warnings
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
