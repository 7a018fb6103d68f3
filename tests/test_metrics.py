import math

import numpy as np
import pytest
import torch

from tskd_tune.config import StudentConfig
from tskd_tune.metrics import count_params, evaluate, latency_ms, segmentation_metrics
from tskd_tune.models.students import build_student

NAMES = ["background", "cortex", "medulla"]


def square_masks(n=2, size=32, shift=0, cls=1, top=8, side=10) -> torch.Tensor:
    m = torch.zeros(n, size, size, dtype=torch.long)
    m[:, top : top + side, top + shift : top + side + shift] = cls
    return m


def test_perfect_prediction():
    target = square_masks()
    target[0, 22:28, 22:28] = 2
    got = segmentation_metrics(target.clone(), target, NAMES)
    assert got == {"dice": 1.0, "dice_cortex": 1.0, "dice_medulla": 1.0, "hd95": 0.0}
    assert all(type(v) is float for v in got.values())


@pytest.mark.parametrize("k", [1, 2, 4])
def test_shifted_square_has_hd95_k(k):
    target = square_masks()
    pred = square_masks(shift=k)
    got = segmentation_metrics(pred, target, NAMES[:2])
    assert got["hd95"] == pytest.approx(k)
    assert got["dice"] == pytest.approx((10 - k) / 10)


def test_empty_class_policy():
    target = square_masks()
    target[0, 22:28, 22:28] = 2  # medulla only in image 0
    diagonal = math.hypot(32, 32)

    # medulla predicted where the truth has none: Dice ignores image 1, HD95 counts the diagonal for it
    pred = target.clone()
    pred[1, 0:4, 0:4] = 2
    got = segmentation_metrics(pred, target, NAMES)
    assert got["dice_medulla"] == 1.0
    assert got["hd95"] == pytest.approx((0 + (0 + diagonal) / 2) / 2)

    # medulla missed: Dice 0, HD95 the diagonal
    pred = target.clone()
    pred[pred == 2] = 0
    got = segmentation_metrics(pred, target, NAMES)
    assert got["dice_medulla"] == 0.0 and got["dice"] == 0.5
    assert got["hd95"] == pytest.approx(diagonal / 2)


def test_class_absent_everywhere_is_nan_and_left_out_of_the_mean():
    target = square_masks()
    got = segmentation_metrics(square_masks(shift=2), target, NAMES)
    assert math.isnan(got["dice_medulla"])
    assert got["dice"] == got["dice_cortex"] == pytest.approx(0.8)
    assert got["hd95"] == pytest.approx(2.0)


def test_all_classes_absent_gives_nan():
    empty = torch.zeros(2, 16, 16, dtype=torch.long)
    got = segmentation_metrics(empty, empty, NAMES)
    assert all(math.isnan(v) for v in got.values())


@pytest.fixture(scope="module")
def student():
    return build_student(StudentConfig(model="unet", channels=[4, 8]), 1, len(NAMES), 32)


def test_evaluate_runs_a_real_student_on_a_float16_memmap(tmp_path, student):
    images = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.float16, shape=(5, 1, 32, 32))
    images[:] = np.random.default_rng(0).random((5, 1, 32, 32))
    masks = square_masks(n=5).numpy().astype(np.uint8)
    student.train()
    got = evaluate(student, images, masks, NAMES, batch_size=2)
    assert set(got) == {"val_dice", "val_dice_cortex", "val_dice_medulla", "val_hd95"}
    assert 0 <= got["val_dice_cortex"] <= 1
    assert student.training
    assert set(evaluate(student, images, masks, NAMES, prefix="test_")) == {
        k.replace("val_", "test_") for k in got
    }


def test_count_params(student):
    total = count_params(student)
    assert total == sum(p.numel() for p in student.parameters()) > 0
    for p in list(student.parameters())[:2]:
        p.requires_grad_(False)
    assert 0 < count_params(student, trainable_only=True) < total
    for p in student.parameters():
        p.requires_grad_(True)


@pytest.mark.parametrize("training", [True, False])
def test_latency_ms_is_positive_and_restores_the_mode(student, training):
    student.train(training)
    ms = latency_ms(student, in_chans=1, image_size=32, repeats=3, warmup=1)
    assert isinstance(ms, float) and ms > 0
    assert student.training is training
