"""A trial's student: its weights saved and loaded (``student.safetensors``), exported (ONNX or
TorchScript) with a model card, and masks predicted with it.

An exported folder holds ``model.onnx`` or ``model.pt`` and ``model_card.json`` (classes, input size
and range, metrics, the resolved config). The ONNX file is checked against PyTorch on random inputs
before it is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tskd_tune.cache import atomic_write, json_text
from tskd_tune.config import Config, DataConfig, load_config
from tskd_tune.data.folder import read_any_image
from tskd_tune.data.inspect import overlay, save_png
from tskd_tune.data.prepare import preprocess_image
from tskd_tune.data.registry import class_names
from tskd_tune.errors import TskdError
from tskd_tune.kinds import student_kind
from tskd_tune.models.students import build_student

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
TOLERANCE = 1e-4
STUDENT_FILE = "student.safetensors"
"""The trained student's weights in a trial folder (safetensors: no pickle), beside its ``config.yaml``."""


def save_student(model: torch.nn.Module, trial_dir: Path, method: str, model_name: str) -> Path:
    """Write ``model``'s weights to ``trial_dir/student.safetensors`` (atomically), with the ``method`` that
    trained it and its ``student.model`` as metadata; what :func:`load_trial_student` reads back."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path = Path(trial_dir) / STUDENT_FILE
    atomic_write(path, save(state, metadata={"method": method, "model": model_name}))
    return path


def load_trial_student(trial_dir: Path) -> tuple[torch.nn.Module, Config, dict]:
    """The trained student of a trial folder (config.yaml + student.safetensors), in eval mode."""
    from safetensors.torch import load_file

    trial_dir = Path(trial_dir)
    weights = trial_dir / STUDENT_FILE
    if not (trial_dir / "config.yaml").is_file() or not weights.is_file():
        raise TskdError(f"{trial_dir}: not a trial folder (expected config.yaml and student.safetensors)")
    cfg = load_config(trial_dir / "config.yaml")
    metrics_path = trial_dir / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    except ValueError:
        raise TskdError(f"{metrics_path}: not valid JSON") from None
    classes = class_names(cfg.data)
    model = build_student(cfg.student, cfg.data.channels, len(classes), cfg.data.image_size)
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - safetensors reports damaged files with its own error type
        raise TskdError(f"{weights}: not a readable safetensors file ({exc.__class__.__name__})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise TskdError(
            f"{weights}: does not fit student {cfg.student.model} ({str(exc).splitlines()[0]})"
        ) from None
    return model.eval(), cfg, metrics


def trial_outputs(path: Path) -> tuple[Path, dict]:
    """The folder holding a trained student, from what a user points at: a trial's ``outputs`` folder, the
    trial folder itself, or a search folder (its best trial's); with what the search knows of it (the best
    trial's test Dice, from summary.json)."""
    from tskd_tune.search.folder import SEARCH_FILE

    path = Path(path)
    if (path / SEARCH_FILE).is_file():
        board = path / "leaderboard.csv"
        if not board.is_file():
            raise TskdError(f"{path}: the search has no leaderboard yet; it writes one when it ends")
        import pandas as pd

        from tskd_tune.report.board import best_trial, test_dice

        rows = pd.read_csv(board)
        best = best_trial(rows)
        value = test_dice(path, rows).get(str(best["trial_id"]))
        return Path(best["trial_dir"]) / "outputs", ({"test_dice": value} if value is not None else {})
    if not (path / "student.safetensors").is_file() and (path / "outputs" / "student.safetensors").is_file():
        return path / "outputs", {}
    return path, {}


def provenance(outputs: Path) -> dict:
    """Where a search trial's student comes from: its name (t003), Ray's trial id, its MLflow run, and its
    search's name and MLflow parent run (empty for a standalone trial, whose folder has no Ray records)."""
    from tskd_tune.report.board import read_results, trial_number
    from tskd_tune.search.folder import SEARCH_FILE

    trial_dir = Path(outputs).parent
    results = read_results(trial_dir) if (trial_dir / "result.json").is_file() else []
    if not results:
        return {}
    last = results[-1]
    number = trial_number(str(trial_dir))
    origin = {
        "name": f"t{number:03d}" if number is not None else trial_dir.name,
        "trial_id": last.get("trial_id"),
        "mlflow_run_id": last.get("mlflow_run_id"),
    }
    try:
        search = json.loads((trial_dir.parent / SEARCH_FILE).read_text())
        origin |= {"search": search["options"]["name"], "search_run_id": search["parent_run_id"]}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return {k: v for k, v in origin.items() if v is not None}


def _student_card(student) -> dict:
    """The student's settings that describe it (``encoder`` only where the model has one: timm_unet)."""
    card = student.model_dump(mode="json")
    if not student_kind(student.model).encoder:
        card.pop("encoder", None)
    return card


def export(trial_dir: Path, fmt: str, out_dir: Path, known: dict | None = None) -> dict:
    """Write the student of ``trial_dir`` as ONNX or TorchScript plus a model card; returns the card.
    ``known``: what the search measured of this trial after it ended (its test Dice), for the card."""
    if fmt not in ("onnx", "torchscript"):
        raise TskdError(f"--format: must be onnx or torchscript, got {fmt!r}")
    model, cfg, metrics = load_trial_student(trial_dir)
    metrics = metrics | (known or {})
    c, s = cfg.data.channels, cfg.data.image_size
    x = torch.rand(2, c, s, s, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model(x).numpy()
    tmp = Path(out_dir).with_name(f".{Path(out_dir).name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if fmt == "onnx":
        name = "model.onnx"
        with warnings.catch_warnings():
            # InstanceNorm without running statistics normalises by each image's own statistics in eval mode
            # too, which ONNX calls "train=True": the export is right (checked against PyTorch just below)
            warnings.filterwarnings(
                "ignore",
                message=r"ONNX export mode is set to TrainingMode.EVAL, but operator "
                r"'instance_norm' is set to train=True",
            )
            torch.onnx.export(
                model,
                (x,),
                str(tmp / name),
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                dynamo=False,
            )
        got = _run_onnx(tmp / name, x.numpy())
    else:
        name = "model.pt"
        with torch.inference_mode():
            torch.jit.save(torch.jit.trace(model, x), str(tmp / name))
            got = torch.jit.load(str(tmp / name))(x).numpy()
    diff = float(np.abs(got - expected).max())
    if diff > TOLERANCE:
        shutil.rmtree(tmp)
        raise TskdError(f"{fmt} export differs from PyTorch by {diff:.2e} (> {TOLERANCE}); not written")
    card = {
        "format": fmt,
        "file": name,
        "classes": class_names(cfg.data),
        "input": {
            "layout": "NCHW",
            "channels": c,
            "size": [s, s],
            "range": [0.0, 1.0],
            "dtype": "float32",
            "resize": cfg.data.resize,
        },
        "normalisation": "scale the image to [0, 1] (integers by their type's maximum); the model normalises itself",
        "student": _student_card(cfg.student),
        "method": cfg.distill.method,
        **({"test_dice": metrics["test_dice"]} if "test_dice" in metrics else {}),
        "metrics": metrics,
        **({"trial": origin} if (origin := provenance(Path(trial_dir))) else {}),
        "max_abs_diff_vs_pytorch": diff,
        "config": cfg.model_dump(mode="json"),
    }
    (tmp / "model_card.json").write_text(json_text(card))
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return card


def _run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"image": x.astype(np.float32)})[0]


class Predictor:
    """Runs an exported model folder (ONNX / TorchScript) or a trial folder on images."""

    def __init__(self, model_dir: Path):
        model_dir = Path(model_dir)
        card_path = model_dir / "model_card.json"
        if card_path.is_file():
            card, model_file = _read_card(card_path)
            self.classes = card["classes"]
            inp = card["input"]
            self.data = DataConfig(image_size=inp["size"][0], channels=inp["channels"], resize=inp["resize"])
            try:
                if card["format"] == "onnx":
                    import onnxruntime as ort

                    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
                    self._run = lambda x: session.run(["logits"], {"image": x})[0]
                else:
                    # TorchScript holds code: only load exports you made (see SECURITY.md)
                    module = torch.jit.load(str(model_file), map_location="cpu")

                    def run_ts(x):
                        with torch.inference_mode():
                            return module(torch.from_numpy(x)).numpy()

                    self._run = run_ts
            except Exception as exc:  # noqa: BLE001 - ONNX Runtime and TorchScript raise their own types
                raise TskdError(
                    f"{model_file}: cannot load the {card['format']} model ({exc.__class__.__name__})"
                ) from None
        elif (model_dir / "student.safetensors").is_file():
            model, cfg, _ = load_trial_student(model_dir)
            self.classes = class_names(cfg.data)
            self.data = cfg.data

            def run(x):
                with torch.inference_mode():
                    return model(torch.from_numpy(x)).numpy()

            self._run = run
        else:
            raise TskdError(f"{model_dir}: no model_card.json (an export) or student.safetensors (a trial)")

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Class-index mask at the image's own size for an HxW or HxWx3 image in [0, 1]."""
        h, w = image.shape[:2]
        x = preprocess_image(image, self.data)[None].astype(np.float32)
        labels = self._run(x)[0].argmax(0).astype(np.uint8)
        if self.data.resize == "pad":  # undo the padding: resize to the padded square, then crop
            n = max(h, w)
            full = np.asarray(Image.fromarray(labels).resize((n, n), Image.NEAREST))
            top, left = (n - h) // 2, (n - w) // 2
            return full[top : top + h, left : left + w]
        return np.asarray(Image.fromarray(labels).resize((w, h), Image.NEAREST))


def _read_card(path: Path) -> tuple[dict, Path]:
    """A model card and the model file it names, which must lie inside the card's folder."""
    try:
        card = json.loads(path.read_text())
        inp = card["input"]
        DataConfig(image_size=inp["size"][0], channels=inp["channels"], resize=inp["resize"])
        if card["format"] not in ("onnx", "torchscript") or not isinstance(card["classes"], list):
            raise ValueError(f"format {card['format']!r}")
        model_file = path.parent / str(card["file"])
    except (ValueError, KeyError, TypeError, IndexError) as exc:  # pydantic's ValidationError is a ValueError
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise TskdError(f"{path}: not a tskd-tune model card ({exc.__class__.__name__}: {first})") from None
    if not model_file.resolve().is_relative_to(path.parent.resolve()):
        raise TskdError(f"{path}: file: {card['file']!r} points outside {path.parent}")
    if not model_file.is_file():
        raise TskdError(f"{model_file}: not found (named by {path.name})")
    return card, model_file


def predict_folder(model_dir: Path, images_dir: Path, out_dir: Path) -> list[Path]:
    """Write ``<stem>_mask.png`` (class indices) and ``<stem>_overlay.png`` for every image in a folder."""
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise TskdError(f"{images_dir}: not a folder of images")
    files = sorted(
        p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )
    if not files:
        raise TskdError(f"{images_dir}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    predictor = Predictor(
        model_dir if (Path(model_dir) / "model_card.json").is_file() else trial_outputs(model_dir)[0]
    )
    mode = "L" if predictor.data.channels == 1 else "RGB"
    for path in files:  # every image decodes before any output is written: no half-done output folder
        read_any_image(path, mode)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for path in files:
        image = read_any_image(path, mode)
        mask = predictor.predict(image)
        save_png(mask, out_dir / f"{path.stem}_mask.png", palette=True)
        shown = image if image.ndim == 2 else image.mean(-1) if predictor.data.channels == 1 else image
        chw = shown[None] if shown.ndim == 2 else np.moveaxis(shown, -1, 0)
        save_png(overlay(chw, mask), out_dir / f"{path.stem}_overlay.png")
        written.append(out_dir / f"{path.stem}_mask.png")
    return written
