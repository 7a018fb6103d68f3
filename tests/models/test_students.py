import typing

import pytest
import torch

from tskd_tune.config import StudentConfig
from tskd_tune.errors import TskdError
from tskd_tune.losses import supervised_loss
from tskd_tune.metrics import count_params
from tskd_tune.models.students import STUDENTS, build_student

SIZE, CLASSES = 32, 4
TINY = {"channels": [4, 8, 16]}


def tiny(model: str, **kw) -> StudentConfig:
    return StudentConfig(model=model, **(TINY | kw))


def fixed_batch(in_chans: int, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Images whose intensity encodes the class of three squares, plus a little noise."""
    g = torch.Generator().manual_seed(0)
    y = torch.zeros(n, SIZE, SIZE, dtype=torch.long)
    for i in range(n):
        for c in range(1, CLASSES):
            r, q = torch.randint(0, SIZE - 8, (2,), generator=g).tolist()
            y[i, r : r + 8, q : q + 8] = c
    x = (y.float() / (CLASSES - 1)).unsqueeze(1).expand(-1, in_chans, -1, -1)
    return x + 0.1 * torch.rand(n, in_chans, SIZE, SIZE, generator=g), y


def test_config_literal_lists_exactly_the_registry():
    assert set(typing.get_args(StudentConfig.model_fields["model"].annotation)) == set(STUDENTS)


@pytest.mark.parametrize("in_chans", [1, 3])
@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_student_shapes(name, in_chans):
    model = build_student(tiny(name), in_chans, CLASSES, SIZE)
    x = torch.rand(2, in_chans, SIZE, SIZE)
    assert model(x).shape == (2, CLASSES, SIZE, SIZE)
    feats = model.features(x)
    assert isinstance(model.feature_dim, int) and feats[-1].shape[1] == model.feature_dim
    assert all(f.ndim == 4 and f.shape[0] == 2 for f in feats)
    assert count_params(model) > 0


@pytest.mark.parametrize("name", sorted(STUDENTS))
def test_student_learns_a_fixed_batch(name):
    torch.manual_seed(0)
    kw = {"model_kwargs": {"depth": 2}} if name == "vit_tiny" else {}
    model = build_student(tiny(name, **kw), 1, CLASSES, SIZE)
    x, y = fixed_batch(1)
    loss_fn = supervised_loss(0.5, 0.5)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("name", ["unet", "timm_unet"])
def test_every_parameter_is_used(name):
    # dead weights would inflate the parameter count a search trades off against Dice
    model = build_student(tiny(name, encoder="mobilenetv3_small_100"), 1, CLASSES, SIZE)
    model(torch.rand(2, 1, SIZE, SIZE)).sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_unet_features_are_the_bottom_layer_output_of_forward():
    model = build_student(tiny("unet"), 1, CLASSES, SIZE)
    _, bottom = model._encoder_path()
    seen = []
    handle = bottom.register_forward_hook(lambda m, i, out: seen.append(out))
    x = torch.rand(2, 1, SIZE, SIZE)
    model(x)
    handle.remove()
    feats = model.features(x)
    assert len(feats) == 3 and torch.equal(feats[-1], seen[0])
    assert [f.shape[-1] for f in feats] == [16, 8, 8]


def test_params_grow_with_channels():
    small = build_student(tiny("unet"), 1, CLASSES, SIZE)
    big = build_student(tiny("unet", channels=[8, 16, 32]), 1, CLASSES, SIZE)
    assert count_params(big) > count_params(small)
    deeper = build_student(tiny("timm_unet", channels=[4, 8, 16, 32]), 1, CLASSES, SIZE)
    assert count_params(deeper) > count_params(build_student(tiny("timm_unet"), 1, CLASSES, SIZE))


@pytest.mark.parametrize(
    ("cfg", "start"),
    [
        (tiny("timm_unet", encoder="resnet19"), "student.encoder: unknown timm model 'resnet19'"),
        (tiny("timm_unet", model_kwargs={"bogus": 1}), "student.model_kwargs: "),
        (tiny("timm_unet", channels=[4] * 6), "student.channels: encoder resnet18 has 5 feature levels"),
        (
            tiny("timm_unet", encoder="vit_tiny_patch16_224"),
            "student.encoder: vit_tiny_patch16_224 does not run",
        ),
        (tiny("unet", model_kwargs={"bogus": 1}), "student.model_kwargs: unknown key 'bogus' for unet"),
        (tiny("unet", model_kwargs={"act": "nope"}), "student.model_kwargs: not accepted by unet"),
        (tiny("unet", model_kwargs={"strides": [1, 1]}), "student.model_kwargs: 'strides' is set from"),
        (tiny("unet", channels=[4] * 6), "student.channels: 6 levels"),
        (tiny("vit_tiny", model_kwargs={"bogus": 1}), "student.model_kwargs: not accepted by vit_tiny"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_field(cfg, start):
    with pytest.raises(TskdError) as info:
        build_student(cfg, 1, CLASSES, SIZE)
    msg = str(info.value)
    assert msg.startswith(start) and "\n" not in msg, msg
