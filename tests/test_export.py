"""Export a trained trial's student (ONNX checked against PyTorch, TorchScript) and predict with it."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tskd_tune.data.phantom import PhantomOptions, render
from tskd_tune.errors import TskdError
from tskd_tune.export import Predictor, export, load_trial_student, predict_folder
from tskd_tune.trial import run_trial

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trial_dir(tmp_path_factory):
    from tests.conftest import tiny_raw
    from tskd_tune.config import validate

    tmp = tmp_path_factory.mktemp("trial")
    cfg = validate(tiny_raw(tmp, distill={"method": "scratch"}, student={"epochs": 2}))
    run_trial(cfg, out_dir=tmp / "outputs")  # the layout of a search's trial folder
    return tmp / "outputs"


@pytest.mark.parametrize("fmt, file", [("onnx", "model.onnx"), ("torchscript", "model.pt")])
def test_export_writes_model_and_card(trial_dir, tmp_path, fmt, file):
    card = export(trial_dir, fmt, tmp_path / "exp")
    assert (tmp_path / "exp" / file).is_file()
    assert card["max_abs_diff_vs_pytorch"] < 1e-4
    saved = json.loads((tmp_path / "exp" / "model_card.json").read_text())
    assert saved["classes"] == ["background", "central_echo_complex", "medulla", "cortex"]
    assert saved["input"] == {
        "layout": "NCHW",
        "channels": 1,
        "size": [32, 32],
        "range": [0.0, 1.0],
        "dtype": "float32",
        "resize": "pad",
    }
    assert "val_dice" in saved["metrics"]
    assert saved["student"]["model"] == "unet" and "encoder" not in saved["student"]  # a MONAI U-Net has none
    assert not list(tmp_path.glob(".exp.tmp"))


def test_exported_models_predict_like_the_trial(trial_dir, tmp_path):
    image, _ = render(7, PhantomOptions(size=48))
    image = image[:, :40]  # non-square: exercises pad and un-pad
    expected = Predictor(trial_dir).predict(image)
    assert expected.shape == image.shape
    for fmt in ("onnx", "torchscript"):
        export(trial_dir, fmt, tmp_path / fmt)
        got = Predictor(tmp_path / fmt).predict(image)
        assert (got == expected).mean() > 0.999


def test_predict_cli_writes_masks_and_overlays(trial_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        img, _ = render(i, PhantomOptions(size=40))
        Image.fromarray((img * 255).astype(np.uint8)).save(images / f"scan{i}.png")
    (images / "notes.txt").write_text("ignored")
    # the trial folder (outputs inside it), as `export` takes it
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tskd_tune",
            "predict",
            str(trial_dir.parent),
            str(images),
            "--out",
            str(tmp_path / "pred"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    png = Image.open(tmp_path / "pred" / "scan0_mask.png")
    mask = np.asarray(png)
    assert (
        mask.shape == (40, 40)
        and mask.max() <= 3
        and (
            mask
            == Predictor(trial_dir).predict(
                np.asarray(Image.open(images / "scan0.png"), dtype=np.float32) / 255
            )
        ).mean()
        > 0.99
    )
    # a palette PNG: the values are the class indices, a viewer shows the classes in the overlay's colours
    assert png.mode == "P" and png.getpalette()[3:6] == [230, 159, 0]
    assert tuple(np.asarray(png.convert("RGB"))[mask == 0][0]) == (0, 0, 0)
    assert np.asarray(Image.open(tmp_path / "pred" / "scan1_overlay.png")).shape == (40, 40, 3)


def test_export_cli_and_bad_inputs(trial_dir, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tskd_tune",
            "export",
            str(trial_dir),
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "e"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "max |diff| vs PyTorch" in proc.stdout
    with pytest.raises(TskdError, match="not a trial folder"):
        load_trial_student(tmp_path)
    with pytest.raises(TskdError, match="--format: must be onnx or torchscript"):
        export(trial_dir, "tflite", tmp_path / "x")
    with pytest.raises(TskdError, match="no images"):
        predict_folder(trial_dir, tmp_path / "e", tmp_path / "p")


def test_slices_the_demo_can_write_are_what_predict_reads(trial_dir, tmp_path):
    """`data export-slices` writes test images as the models see them with their true masks (palette PNGs),
    spread over the split; `predict` segments them at the same size."""
    import yaml

    from tests.conftest import tiny_raw

    space = tmp_path / "s.yaml"
    space.write_text(yaml.safe_dump(tiny_raw(tmp_path)))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tskd_tune",
            "data",
            "export-slices",
            str(space),
            "--n",
            "3",
            "--out",
            str(tmp_path / "slices"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    images = sorted((tmp_path / "slices" / "images").iterdir())
    truths = sorted((tmp_path / "slices" / "masks").iterdir())
    assert len(images) == len(truths) == 3 and [t.name for t in truths] == [
        f"{i.stem}_mask.png" for i in images
    ]
    assert Image.open(truths[0]).mode == "P" and np.asarray(Image.open(truths[0])).max() <= 3
    written = predict_folder(trial_dir, tmp_path / "slices" / "images", tmp_path / "pred")
    assert [np.asarray(Image.open(w)).shape for w in written] == [
        np.asarray(Image.open(t)).shape for t in truths
    ]
    bad = subprocess.run(
        [sys.executable, "-m", "tskd_tune", "data", "export-slices", str(space), "--split", "train"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert (
        bad.returncode == 2
        and bad.stderr.strip() == "error: --split: must be test, val, labeled or unlabeled, got 'train'"
    )


def test_save_student_writes_what_load_trial_student_reads(tiny, tmp_path):
    import torch
    from safetensors import safe_open

    from tskd_tune.config import to_yaml
    from tskd_tune.export import save_student
    from tskd_tune.models.students import build_student

    cfg = tiny(distill={"method": "scratch"})
    torch.manual_seed(3)
    model = build_student(cfg.student, cfg.data.channels, 4, cfg.data.image_size)  # the phantom's 4 classes
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    path = save_student(model, tmp_path, "scratch", cfg.student.model)
    assert path == tmp_path / "student.safetensors" and not list(tmp_path.glob(".*.tmp"))
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"method": "scratch", "model": "unet"}
    loaded, loaded_cfg, metrics = load_trial_student(tmp_path)
    assert loaded_cfg.student == cfg.student and metrics == {}  # no metrics.json: none
    saved, back = model.state_dict(), loaded.state_dict()
    assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved)
