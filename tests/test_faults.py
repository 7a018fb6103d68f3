"""Fault handling inside one trial (no Ray): the injection hook, the watchdog, failure records, and
what a full disk or a NaN does to a real trial's checkpoint. The same faults on real searches are in
test_search_faults.py (marker `faults`)."""

import json
import os
import time

import pytest
import torch

from tskd_tune import faults
from tskd_tune.cache import atomic_write, writable_dir
from tskd_tune.errors import StorageError
from tskd_tune.faults import TrialFailed
from tskd_tune.train import load_checkpoint
from tskd_tune.trial import run_trial


def _inject(monkeypatch, *specs, state=None):
    monkeypatch.setenv(faults.INJECT_ENV, json.dumps(list(specs)))
    if state is not None:
        monkeypatch.setenv(faults.STATE_ENV, str(state))


def test_hook_is_inert_unless_set(monkeypatch):
    monkeypatch.delenv(faults.INJECT_ENV, raising=False)
    assert faults.injected("step", "student", 1) is None


def test_hook_matches_phase_and_epoch(monkeypatch):
    _inject(monkeypatch, {"fault": "nan", "phase": "student", "epoch": 2}, {"fault": "enospc"})
    assert faults.injected("step", "student", 1) is None
    assert faults.injected("step", "teacher", 2) is None
    assert faults.injected("step", "student", 2)["fault"] == "nan"
    assert faults.injected("checkpoint", "teacher", 7)["fault"] == "enospc"  # no phase/epoch: any
    _inject(monkeypatch, {"fault": "melt"})
    with pytest.raises(ValueError, match="unknown fault 'melt'"):
        faults.injected("step", "student", 1)


def test_with_a_state_folder_each_fault_goes_to_one_trial_and_retries_run_clean(monkeypatch, tmp_path):
    _inject(
        monkeypatch,
        {"fault": "raise", "epoch": 1, "once": True},
        {"fault": "sleep", "epoch": 1, "once": True},
        {"fault": "nan", "epoch": 2},
        state=tmp_path / "state",
    )
    trial_a, trial_b, trial_c = (tmp_path / n for n in "abc")
    for d in (trial_a, trial_b, trial_c):
        d.mkdir()
    monkeypatch.chdir(trial_a)  # Ray runs each trial in its own working directory
    assert faults.injected("step", "student", 1)["fault"] == "raise"
    assert faults.injected("step", "student", 1) is None  # the retry of trial a runs clean
    monkeypatch.chdir(trial_b)
    assert faults.injected("step", "student", 1)["fault"] == "sleep"
    monkeypatch.chdir(trial_c)
    assert faults.injected("step", "student", 1) is None  # every "once" fault is taken
    assert faults.injected("step", "student", 2)["fault"] == "nan"  # the others fire in every trial
    monkeypatch.chdir(trial_a)
    assert faults.injected("step", "student", 2)["fault"] == "nan"


def test_watchdog_fires_once_without_beats_and_never_with_them():
    fired = []
    dog = faults.Watchdog(0.4, fired.append).start()
    time.sleep(1.2)
    assert len(fired) == 1 and fired[0] > 0.4
    dog.stop()
    calm = []
    dog = faults.Watchdog(0.6, calm.append).start()
    for _ in range(12):
        time.sleep(0.1)
        faults.beat()
    dog.stop()
    assert calm == []


def test_a_failure_record_fails_the_retry_at_once(tmp_path):
    marker = faults.marker_path(tmp_path, "abc123")
    faults.fail_if_failed_before(marker)  # nothing recorded: no error
    faults.mark_failed(marker, "failed", "TrialFailed: student: loss became nan at epoch 2")
    with pytest.raises(TrialFailed, match="loss became nan at epoch 2 .*not retried"):
        faults.fail_if_failed_before(marker)


def test_injected_nan_is_caught_by_the_real_check_and_keeps_the_last_checkpoint(tiny, tmp_path, monkeypatch):
    _inject(monkeypatch, {"fault": "nan", "phase": "student", "epoch": 2})
    seen = []
    with pytest.raises(TrialFailed, match=r"student: loss became nan at epoch 2, step 1"):
        run_trial(
            tiny(distill={"method": "scratch"}),
            lambda e, m, c: seen.append(e),
            out_dir=tmp_path / "out",
            hooks=faults.trial_hooks(),
        )
    assert seen == [1]  # epoch 2 never reached the searcher
    assert load_checkpoint(tmp_path / "out" / "checkpoint")["epoch"] == 1


def test_injected_cuda_oom_propagates_as_the_real_exception(tiny, monkeypatch):
    _inject(monkeypatch, {"fault": "oom", "phase": "student", "epoch": 1})
    with pytest.raises(torch.cuda.OutOfMemoryError, match="CUDA out of memory"):
        run_trial(tiny(distill={"method": "scratch"}, student={"epochs": 1}), hooks=faults.trial_hooks())


def test_disk_full_mid_checkpoint_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    _inject(monkeypatch, {"fault": "enospc", "phase": "student", "epoch": 2})
    out = tmp_path / "out"
    with pytest.raises(StorageError) as info:
        run_trial(tiny(distill={"method": "scratch"}), out_dir=out, hooks=faults.trial_hooks())
    msg = str(info.value)
    assert "\n" not in msg and "No space left on device" in msg and "state.safetensors" in msg
    assert "previous state.safetensors is kept" in msg
    assert load_checkpoint(out / "checkpoint")["epoch"] == 1  # the good checkpoint, not half of epoch 2
    assert sorted(p.name for p in (out / "checkpoint").iterdir()) == [
        "state.safetensors"
    ]  # no half-written file


def test_without_the_trial_hooks_nothing_is_injected(tiny, monkeypatch):
    # the engine knows nothing of fault injection: only the hooks a search's trials get carry it
    _inject(monkeypatch, {"fault": "oom", "phase": "student", "epoch": 1})
    assert run_trial(tiny(distill={"method": "scratch"}, student={"epochs": 1}))["val_dice"] >= 0


def test_atomic_write_never_leaves_half_a_file(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write(target, "old")
    with pytest.raises(StorageError, match="No space left on device"):
        atomic_write(target, "new content", faults.write_half_then_enospc)
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["metrics.json"]


def test_writable_dir_names_the_flag(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match=r"^--storage: cannot write to .*file/runs \(Not a directory\)$"):
        writable_dir(tmp_path / "file" / "runs", "--storage")
    assert writable_dir(tmp_path / "ok", "--storage").is_dir() and os.listdir(tmp_path / "ok") == []


def _read_only(folder, cmd: list[str]) -> list[str]:
    """``cmd`` run with ``folder`` read-only: chmod for a normal user; root ignores permissions, so for
    root a private read-only bind mount (a mount namespace of the command's own; nothing else sees it)."""
    import shutil
    import subprocess

    if os.geteuid() != 0:
        folder.chmod(0o555)
        return cmd
    probe = ["unshare", "--mount", "--propagation", "private", "true"]
    if not shutil.which("unshare") or subprocess.run(probe, capture_output=True).returncode != 0:
        pytest.skip("running as root without the right to make a read-only mount")
    script = 'mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" "$1" && shift && exec "$@"'
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", str(folder), *cmd]


def test_read_only_storage_fails_in_one_line_before_any_work(tmp_path):
    import subprocess
    import sys

    import yaml

    from tests.conftest import tiny_raw

    raw = tiny_raw(tmp_path)
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "ro"}
    raw["search"]["space"] = {"distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0}}
    from mlflow.tracking import MlflowClient

    MlflowClient(raw["tracking"]["uri"]).search_experiments()  # the store exists (its creation logs lines)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    ro = tmp_path / "ro"
    ro.mkdir()
    tskd = [sys.executable, "-m", "tskd_tune"]
    for args, flag, folder in [
        (["launch", str(space), "--storage", str(ro / "runs")], "--storage", ro / "runs" / "tiny"),
        (["trial", str(space), "--out", str(ro / "trial")], "--out", ro / "trial"),
    ]:
        proc = subprocess.run(_read_only(ro, tskd + args), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {flag}: cannot write to {folder} ("), lines
        assert "Read-only file system" in lines[0] or "Permission denied" in lines[0]
        assert "Ray dashboard" not in proc.stdout  # refused before Ray started, before any trial
    assert list(ro.iterdir()) == []
