"""One trial end to end: each method, learning, the teacher cache, determinism, exact resume, failures."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_VIT_STUDENT
from tskd_tune.data.prepare import load
from tskd_tune.methods import METHODS
from tskd_tune.metrics import count_params, evaluate
from tskd_tune.models.students import build_student
from tskd_tune.train import TrialFailed
from tskd_tune.trial import run_trial

REPO = Path(__file__).resolve().parents[1]
FEATURES = ["teacher_features_cached", "teacher_features_s", "teacher_features_backend"]
TRANSFER = ["transfer_real", "transfer_synthetic"]
RECORDED = {
    "ts_kd": [*FEATURES, "teacher_cached", "teacher_adapter", "logits_cached", *TRANSFER],
    "ta_kd": [*FEATURES, "teacher_cached", *TRANSFER],
    "scratch": [*FEATURES[:2], *TRANSFER],
    "teacher": [*FEATURES, "teacher_cached", "teacher_adapter"],
}
"""What each method's record adds to a trial's metrics (a cold cache: teacher features are computed), in
metrics.json's order: between the trial's measurements (``teacher_pretrained`` last) and the split sizes."""
TIMED = {
    "ts_kd": ["teacher", "transfer", "student"],
    "ta_kd": ["student"],
    "scratch": ["student"],
    "teacher": ["teacher"],
}
"""The phases each method times, after the data's (``<phase>_s``, closing the metrics)."""


@pytest.mark.parametrize("method", ["ts_kd", "ta_kd", "scratch", "teacher"])
def test_every_method_runs_and_reports(tiny, tmp_path, method):
    cfg = tiny(distill={"method": method})
    reports = []
    result = run_trial(cfg, lambda e, m, c: reports.append((e, m, c)), out_dir=tmp_path / "out")
    assert 0 <= result["val_dice"] <= 1 and result["student_params"] > 0
    expected_epochs = cfg.teacher.epochs if method == "teacher" else cfg.student.epochs
    assert [e for e, _, _ in reports] == list(range(1, expected_epochs + 1))
    assert all("val_dice" in m for _, m, _ in reports)
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["val_dice"] == result["val_dice"] and list(written) == list(result)
    keys = list(result)
    start = keys.index("teacher_pretrained") + 1
    assert keys[start : keys.index("labeled")] == RECORDED[method]
    timed = ["data", *TIMED[method]]
    assert keys[keys.index("unlabeled") + 1 :] == [f"{p}_s" for p in timed] + ["total_s", "threads"]
    assert result["teacher_features_cached"] is (False if method != "scratch" else None)
    teacher_cached = {"ts_kd": False, "ta_kd": None, "teacher": False}  # left out: the method has no teacher
    assert result.get("teacher_cached", "left out") == teacher_cached.get(method, "left out")
    assert result.teacher_cached == result.get("teacher_cached")
    assert result.teacher_entry == result.get("teacher_adapter")
    assert "test_dice" not in result  # the test split is only evaluated when asked
    if method == "ts_kd":
        assert result["teacher_val_dice"] > 0 and result["transfer_real"] == 8 + result["unlabeled"]
        assert result["teacher_params"] > result["student_params"]
    if method != "teacher":
        assert (tmp_path / "out" / "student.safetensors").is_file()
        assert reports[-1][2] == tmp_path / "out" / "checkpoint"
        assert (tmp_path / "out" / "checkpoint" / "state.safetensors").is_file()
    # every weight file the trial wrote (student, checkpoint, cached teacher adapter) is safetensors
    written = {p.suffix for p in tmp_path.rglob("*") if p.is_file()}
    assert ".safetensors" in written and not written & {".pt", ".pth", ".bin", ".pkl", ".ckpt"}


@pytest.mark.parametrize("method", sorted(METHODS))
def test_the_vit_tiny_student_runs_through_every_method(tiny, tmp_path, method):
    cfg = tiny(distill={"method": method}, student=TINY_VIT_STUDENT | {"epochs": 2}, teacher={"epochs": 2})
    result = run_trial(cfg, out_dir=tmp_path / "out")
    assert math.isfinite(result["val_dice"]) and 0 <= result["val_dice"] <= 1
    if METHODS[method].student:
        classes = len(load(cfg)[0].classes)
        vit = build_student(cfg.student, cfg.data.channels, classes, cfg.data.image_size)
        assert result["student_params"] == count_params(vit)
        assert math.isfinite(result["train_loss"])


def test_student_only_knobs_reuse_the_cached_teacher(tiny, tmp_path):
    first = run_trial(tiny(student={"epochs": 1}))
    second = run_trial(tiny(student={"epochs": 1}, distill={"temperature": 2.0, "kd_weight": 0.5}))
    third = run_trial(tiny(student={"epochs": 1}, teacher={"lr": 1e-3}))
    assert (first["teacher_cached"], second["teacher_cached"], third["teacher_cached"]) == (
        False,
        True,
        False,
    )
    assert second["logits_cached"] and second["teacher_s"] < first["teacher_s"]
    assert second["teacher_val_dice"] == first["teacher_val_dice"]


def test_same_config_and_seed_give_the_same_metrics(tiny):
    cfg = tiny(student={"epochs": 2}, cache={"enabled": False})
    a = run_trial(cfg)
    b = run_trial(cfg)
    keys = ["val_dice", "val_hd95", "train_loss", "teacher_val_dice"]
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    c = run_trial(tiny(student={"epochs": 2}, seed=1, cache={"enabled": False}))
    assert c["train_loss"] != a["train_loss"]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("method, stop_at", [("ts_kd", 2), ("ta_kd", 1)])
def test_resume_from_checkpoint_matches_an_uninterrupted_run(tiny, tmp_path, method, stop_at):
    cfg = tiny(student={"epochs": 4}, distill={"method": method})
    whole = run_trial(cfg, out_dir=tmp_path / "whole")

    def crash(epoch, metrics, ckpt):
        if epoch == stop_at:
            raise Interrupt  # as if the worker died right after this epoch's checkpoint

    with pytest.raises(Interrupt):
        run_trial(cfg, crash, out_dir=tmp_path / "part")
    seen = []
    resumed = run_trial(
        cfg,
        lambda e, m, c: seen.append(e),
        out_dir=tmp_path / "part",
        resume_from=tmp_path / "part" / "checkpoint",
    )
    assert seen == list(range(stop_at + 1, 5))
    assert resumed["val_dice"] == pytest.approx(whole["val_dice"], abs=1e-6)
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-6)


def test_non_finite_loss_fails_the_trial_with_a_reason(tiny):
    with pytest.raises(TrialFailed, match=r"loss became (nan|inf)"):
        run_trial(
            tiny(distill={"method": "scratch"}, student={"lr": 1e12, "epochs": 2}, cache={"enabled": False})
        )


def test_test_split_only_when_asked(tiny):
    result = run_trial(tiny(distill={"method": "scratch"}, student={"epochs": 1}), test=True)
    assert {"test_dice", "test_hd95"} <= set(result)


def test_cli_trial_learns_and_hits_the_teacher_cache(tmp_path):
    """The real CLI on the phantom: the student learns far beyond an untrained one; a rerun reuses the teacher."""
    from tests.conftest import tiny_raw  # noqa: PLC0415 - the same tiny settings as the other tests

    raw = tiny_raw(
        tmp_path,
        student={"epochs": 6},
        data={"options": {"num_images": 120, "size": 64, "target": "capsule"}},
    )
    raw["resources"] = {
        "cpu": 1
    }  # what a search reserves per trial: a standalone trial has the machine anyway
    import yaml

    space = tmp_path / "tiny.yaml"
    space.write_text(yaml.safe_dump(raw))

    def cli(*extra):
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "tskd_tune",
                "trial",
                str(space),
                "--json",
                "--out",
                str(tmp_path / "trial"),
                *extra,
            ],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr
        assert "epoch 6/6" in proc.stderr  # progress per epoch
        return json.loads(proc.stdout)

    first = cli()
    assert first["threads"] == os.cpu_count()
    from tskd_tune.config import load_config

    cfg = load_config(space)
    prepared, splits = load(cfg)
    torch.manual_seed(0)
    untrained = build_student(cfg.student, 1, len(prepared.classes), 32)
    base = evaluate(untrained, prepared.images[splits.val], prepared.masks[splits.val], prepared.classes)
    assert first["val_dice"] > base["val_dice"] + 0.2, (first["val_dice"], base["val_dice"])
    assert first["teacher_cached"] is False
    second = cli("--set", "distill.temperature=2.0", "--set", "resources.threads=1")
    assert second["threads"] == 1  # unless the config says otherwise
    assert second["teacher_cached"] is True and second["teacher_s"] < first["teacher_s"]
    history = (tmp_path / "trial" / "history.jsonl").read_text().splitlines()
    assert len(history) == 6  # a fresh run replaces the earlier run's curve


def test_mixed_precision_is_float32_on_cpu_but_keys_its_own_teacher(tiny):
    # CPU ignores resources.mixed_precision (bf16 autocast is CUDA only), so the numbers are identical;
    # the option still keys its own teacher, since on CUDA it trains a different one
    a = run_trial(tiny(student={"epochs": 1}))
    b = run_trial(tiny(student={"epochs": 1}, resources={"threads": 2, "mixed_precision": True}))
    assert b["teacher_cached"] is False and b["logits_cached"] is False
    keys = ["val_dice", "val_hd95", "train_loss", "teacher_val_dice"]
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}


@pytest.mark.gpu
def test_mixed_precision_runs_training_steps_under_bf16_autocast():
    from tskd_tune.train import Loop, run_loop

    model = torch.nn.Linear(4, 2).cuda()
    dtypes = []

    def step(g):
        y = model(torch.rand(8, 4, device="cuda"))
        dtypes.append(y.dtype)
        return y.float().pow(2).mean()

    settings = {
        "modules": {"m": model},
        "step": step,
        "epochs": 1,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "seed": 0,
    }
    run_loop(Loop(phase="amp", steps_per_epoch=2, autocast=True, **settings), None, None)
    run_loop(Loop(phase="fp32", steps_per_epoch=1, **settings), None, None)
    assert dtypes == [torch.bfloat16, torch.bfloat16, torch.float32]


def test_val_overlays_are_a_readable_grid_of_image_truth_and_prediction(tiny, tmp_path):
    import numpy as np
    from PIL import Image

    from tskd_tune.data.inspect import COLUMNS, PALETTE, TILE_MIN, overlay, tile_box, val_overlays

    cfg = tiny()
    prepared, splits = load(cfg)
    model = build_student(cfg.student, cfg.data.channels, len(prepared.classes), cfg.data.image_size)
    picture = np.asarray(Image.open(val_overlays(model, prepared, splits, tmp_path, "cpu")).convert("RGB"))
    assert picture.shape[0] > picture.shape[1]  # one row per image, not a strip

    # six validation slices spread over the split in slice order, those with foreground only
    val = np.sort(splits.val)
    with_fg = val[(np.asarray(prepared.masks[val]) > 0).reshape(len(val), -1).any(1)]
    idx = with_fg[np.unique(np.linspace(0, len(with_fg) - 1, 6).round().astype(int))]
    assert len(idx) == 6 and idx[0] == with_fg[0] and idx[-1] == with_fg[-1]
    images = np.asarray(prepared.images[idx], np.float32)
    with torch.inference_mode():
        preds = model.eval()(torch.from_numpy(images)).argmax(1).numpy().astype(np.uint8)
    tile = TILE_MIN  # 32 px images, upscaled 4x by nearest neighbour
    for row, (image, truth, pred) in enumerate(zip(images, prepared.masks[idx], preds, strict=True)):
        for col, mask in enumerate((np.zeros_like(truth), truth, pred)):
            left, top, right, bottom = tile_box(row, col, tile)
            expected = np.kron(overlay(image, np.asarray(mask)), np.ones((4, 4, 1), np.uint8))
            assert np.array_equal(picture[top:bottom, left:right], expected), (row, COLUMNS[col])
    header = picture[: tile_box(0, 0, tile)[1]]
    assert (header < 128).any(axis=-1).sum() > 100  # the column titles are written
    legend = picture[tile_box(5, 0, tile)[3] :]
    for k in range(1, len(prepared.classes)):  # a swatch per foreground class
        assert (legend == PALETTE[k].astype(np.uint8)).all(axis=-1).sum() >= 14 * 14
