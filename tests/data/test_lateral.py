"""Left/right classes under horizontal flips: pairing, switching flips off, and flips that keep the sides."""

from pathlib import Path

import numpy as np
import pytest
import torch

from tskd_tune.config import AugmentConfig, DataConfig, StudentConfig, validate
from tskd_tune.data.lateral import find_pairs, flip_permutation, flip_plan, lateral_side
from tskd_tune.data.prepare import Prepared
from tskd_tune.data.transforms import paired_transforms, train_transforms
from tskd_tune.errors import ConfigError

FLIP_ONLY = AugmentConfig(prob=1.0, rotate_deg=0, scale=0, intensity=0)
LEFT, RIGHT = 1, 2
SWAP = (0, RIGHT, LEFT)


def folder(classes: list[str], **fields) -> DataConfig:
    return DataConfig(dataset="folder", options={"num_classes": len(classes)}, classes=classes, **fields)


# ------------------------------------------------------------------------------------------ pairing
def test_pairs_are_found_by_name():
    classes = ["background", "left_kidney", "Kidney-Right", "Left-Hemisphere", "Right-Hemisphere"]
    classes += ["l_lung", "LUNG_R", "liver", "cleft_palate"]
    pairs, unpaired = find_pairs(classes)
    assert sorted(pairs) == [(1, 2), (3, 4), (5, 6)] and unpaired == []
    assert flip_permutation(classes) == (0, 2, 1, 4, 3, 6, 5, 7, 8)
    assert lateral_side("cleft_palate") is None and lateral_side("left_right_boundary") is None
    assert lateral_side("LeftKidney") == ("left", ("kidney",))


def test_explicit_pairs_pair_what_names_cannot():
    data = folder(["background", "LK", "RK", "liver"], lateral_pairs=[["LK", "RK"]])
    plan = flip_plan(data)
    assert plan.label_swap == (0, 2, 1, 3) and plan.augment.flip and plan.note is None
    assert flip_plan(folder(["background", "LK", "RK", "liver"])).label_swap is None  # nothing looks lateral


def test_an_unpaired_lateral_class_switches_flips_off():
    data = folder(["background", "left_lung", "heart"])
    assert flip_permutation(data.classes) is None
    plan = flip_plan(data)
    assert data.augment.flip and not plan.augment.flip and plan.label_swap is None
    assert plan.note == (
        "note: data.augment.flip: off: class 'left_lung' looks lateral but has no pair (set data.lateral_pairs)"
    )
    # two of a side with the same words are ambiguous, so neither pairs
    ambiguous = ["background", "left_kidney", "Left-Kidney", "right_kidney"]
    assert find_pairs(ambiguous)[1] == ambiguous[1:]
    # an explicit pair makes it safe; flips the user switched off need no note
    assert flip_plan(
        folder(["background", "left_lung", "heart"], lateral_pairs=[["left_lung", "heart"]])
    ).augment.flip
    assert flip_plan(folder(["background", "left_lung"], augment={"flip": False})).note is None


def test_no_lateral_classes_change_nothing():
    data = DataConfig()  # phantom: background, central_echo_complex, medulla, cortex
    plan = flip_plan(data)
    assert plan.augment == data.augment and plan.swap == (0, 1, 2, 3) and plan.label_swap is None
    assert plan.cache_key() == {"augment": data.augment.model_dump()}  # the keys cached before stay valid


def test_chaos_mr_declares_its_kidneys_even_when_renamed():
    mr = {"dataset": "chaos", "options": {"modality": "MR"}}
    assert flip_plan(DataConfig(**mr)).label_swap == (0, 1, 3, 2, 4)
    renamed = DataConfig(**mr, classes=["bg", "liver", "kidney_a", "kidney_b", "spleen"])
    assert flip_plan(renamed).label_swap == (0, 1, 3, 2, 4)
    assert flip_plan(DataConfig(dataset="chaos")).label_swap is None  # CT: liver only


def test_lateral_pairs_are_validated(tmp_path):
    def problems(pairs) -> list[str]:
        data = folder(["background", "left_lung", "right_lung"], root=tmp_path)
        raw = {"data": data.model_dump(mode="json") | {"lateral_pairs": pairs}}
        with pytest.raises(ConfigError) as info:
            validate(raw)
        return info.value.problems

    assert problems([["left_lung", "foo"]]) == [
        "data.lateral_pairs: 'foo' is not a class (classes: background, left_lung, right_lung)"
    ]
    assert problems([["left_lung", "right_lung"], ["right_lung", "background"]]) == [
        "data.lateral_pairs: 'right_lung' is in more than one pair"
    ]
    assert problems([["left_lung", "left_lung"]]) == [
        "data.lateral_pairs: 'left_lung' cannot pair with itself"
    ]


# ------------------------------------------------------------------------------- flips keep the sides
def sides_image(size: int = 16, row: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright blob on the left labelled LEFT and a dim one on the right labelled RIGHT, at ``row``."""
    image, label = torch.zeros(1, size, size), torch.zeros(1, size, size)
    rows, q = slice(row, row + 4), size // 4
    image[:, rows, 1:q], label[:, rows, 1:q] = 1.0, LEFT
    image[:, rows, size - q : size - 1], label[:, rows, size - q : size - 1] = 0.5, RIGHT
    return image, label


def halves(label: torch.Tensor) -> tuple[set, set]:
    """The foreground classes in the left and the right half of a (..., H, W) label map."""
    w = label.shape[-1] // 2
    return set(label[..., :w].unique().tolist()) - {0}, set(label[..., w:].unique().tolist()) - {0}


def test_train_transforms_swap_the_labels_of_a_flipped_sample():
    image, label = sides_image()
    out = train_transforms(FLIP_ONLY, seed=0, label_swap=SWAP)({"image": image, "label": label})
    flipped = torch.as_tensor(out["image"])
    assert torch.equal(flipped, image.flip(-1))  # the bright blob moved to the right...
    assert halves(torch.as_tensor(out["label"])) == ({LEFT}, {RIGHT})  # ...and is labelled right there
    # without the swap a flip would put the left label on the right: what the swap prevents
    plain = train_transforms(FLIP_ONLY, seed=0)({"image": image, "label": label})
    assert halves(torch.as_tensor(plain["label"])) == ({RIGHT}, {LEFT})
    # not flipped (prob 0): nothing swaps either
    kept = train_transforms(FLIP_ONLY.model_copy(update={"prob": 0.0}), label_swap=SWAP)(
        {"image": image, "label": label}
    )
    assert torch.equal(torch.as_tensor(kept["label"]), label)


def test_paired_transforms_swap_class_channels_not_feature_channels():
    image, label = sides_image()
    soft = torch.nn.functional.one_hot(label[0].long(), 3).permute(2, 0, 1)[None].float()  # (1, 3, H, W)
    x, t = paired_transforms(
        image[None], soft, FLIP_ONLY, torch.Generator().manual_seed(0), channel_swap=SWAP
    )
    assert torch.equal(x, image[None].flip(-1))
    assert halves(t.argmax(1)) == ({LEFT}, {RIGHT})
    # feature maps have no class channels: they only move with the image
    _, f = paired_transforms(
        image[None], soft, FLIP_ONLY, torch.Generator().manual_seed(0), channel_swap=None
    )
    assert torch.equal(f, soft.flip(-1))
    # a batch flips per sample: the unflipped ones keep their channels
    half = FLIP_ONLY.model_copy(update={"prob": 0.5})
    batch = image[None].repeat(16, 1, 1, 1), soft.repeat(16, 1, 1, 1)
    xs, ts = paired_transforms(*batch, half, torch.Generator().manual_seed(1), channel_swap=SWAP)
    for ti in ts:
        assert halves(ti.argmax(0)) == ({LEFT}, {RIGHT})
    assert 0 < sum(torch.equal(xi, image) for xi in xs) < 16


def test_the_flips_in_effect_are_in_the_cache_keys(tmp_path: Path):
    from tskd_tune.config import Config
    from tskd_tune.data.prepare import Splits
    from tskd_tune.features import views_source
    from tskd_tune.transfer import teacher_key

    classes = ["background", "left_lung", "right_lung"]
    prepared = Prepared(np.zeros((1, 1, 8, 8)), np.zeros((1, 8, 8)), ["a"], ["a"], classes, tmp_path, True)
    splits = Splits(*(np.arange(1),) * 4)

    def keys(data: dict) -> tuple[dict, dict]:
        cfg = Config(data=folder(classes, **data))
        return views_source(cfg, prepared, 0), teacher_key(cfg, prepared, splits)

    swapped, off = (
        keys({}),
        keys({"lateral_pairs": [["left_lung", "background"]]}),
    )  # right_lung left unpaired
    assert swapped[0]["flip_swap"] == [0, 2, 1] and swapped[1]["flip_swap"] == [0, 2, 1]
    assert off[0]["augment"]["flip"] is False and "flip_swap" not in off[1]
    assert swapped[0] != off[0] and swapped[1] != off[1]


# ------------------------------------------------------------------------------------------ learning
def sides_dataset(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two identical blobs at random rows: only their side tells LEFT from RIGHT."""
    rng = np.random.default_rng(seed)
    images, masks = np.zeros((n, 1, 16, 16), np.float32), np.zeros((n, 16, 16), np.uint8)
    for i in range(n):
        for cls, cols in ((LEFT, slice(1, 5)), (RIGHT, slice(11, 15))):
            r = rng.integers(0, 12)
            images[i, 0, r : r + 4, cols], masks[i, r : r + 4, cols] = 1.0, cls
    return images, masks


def side_accuracy(swap) -> float:
    """Train a tiny U-Net (the production factory) on flipped batches and score its side calls on new images."""
    from tskd_tune.models.students import build_student
    from tskd_tune.train import LabeledBatches

    torch.manual_seed(0)
    model = build_student(StudentConfig(channels=[8, 16, 32]), 1, 3, 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    images, masks = sides_dataset(16, seed=0)
    batches = LabeledBatches(images, masks, np.arange(16), FLIP_ONLY.model_copy(update={"prob": 0.5}), swap)
    g = batches.reseed(0)
    for _ in range(60):
        x, y = batches.sample(8, g)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    test_images, test_masks = sides_dataset(16, seed=1)
    with torch.no_grad():
        pred = model(torch.from_numpy(test_images)).argmax(1).numpy()
    right = [
        np.bincount(pred[i][test_masks[i] == c], minlength=3).argmax() == c
        for i in range(16)
        for c in (LEFT, RIGHT)
    ]
    return float(np.mean(right))


def test_flips_with_the_swap_learn_the_sides_and_flips_without_it_cannot():
    assert side_accuracy(SWAP) >= 0.95
    # the same flips keeping the labels contradict themselves half the time: the sides are a coin toss
    # (0.44-0.78 over five initialisations; with the swap 1.0 for each)
    assert side_accuracy(None) <= 0.85


def test_validate_says_when_flips_are_switched_off(tmp_path, capfd):
    from tskd_tune.cli import main

    space = tmp_path / "lungs.yaml"
    space.write_text(
        f"data: {{dataset: folder, root: {tmp_path}, options: {{num_classes: 3}}, "
        "classes: [background, left_lung, heart]}\n"
    )
    assert main(["validate", str(space)]) == 0
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [
        "note: data.augment.flip: off: class 'left_lung' looks lateral but has no pair (set data.lateral_pairs)"
    ]
    space.write_text(
        f"data: {{dataset: folder, root: {tmp_path}, options: {{num_classes: 3}}, "
        "classes: [background, left_lung, right_lung]}\n"
    )
    assert main(["validate", str(space)]) == 0
    captured = capfd.readouterr()
    assert captured.err == "" and "# flips swap: left_lung <-> right_lung" in captured.out
