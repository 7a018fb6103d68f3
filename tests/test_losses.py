import math

import pytest
import torch

from tskd_tune.losses import FeatureLoss, kd_loss, supervised_loss


def logits(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_kd_loss_is_zero_for_equal_logits_and_positive_otherwise():
    s = logits(2, 4, 8, 8)
    assert kd_loss(s, s.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert kd_loss(s, logits(2, 4, 8, 8, seed=1), 4.0).item() > 0


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_loss_matches_a_hand_computed_value(temperature):
    # one pixel, two classes: teacher softmax at T=1 is (3/4, 1/4), student is uniform
    s = torch.zeros(1, 2, 1, 1)
    t = torch.tensor([math.log(3.0), 0.0]).view(1, 2, 1, 1)
    a = 3.0 ** (1 / temperature)
    p = [a / (a + 1), 1 / (a + 1)]
    expected = temperature**2 * sum(pi * math.log(pi / 0.5) for pi in p)
    assert kd_loss(s, t, temperature).item() == pytest.approx(expected, rel=1e-5)


def test_kd_loss_averages_over_pixels_and_batch():
    s, t = logits(1, 3, 1, 1), logits(1, 3, 1, 1, seed=1)
    tiled = kd_loss(s.expand(2, 3, 5, 5), t.expand(2, 3, 5, 5), 2.0)
    assert tiled.item() == pytest.approx(kd_loss(s, t, 2.0).item(), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0, 4.0])
def test_kd_loss_scales_with_t_squared(temperature):
    # softening by T and multiplying by T^2: logits scaled by T give T^2 times the T=1 loss
    s, t = logits(2, 4, 3, 3), logits(2, 4, 3, 3, seed=1)
    scaled = kd_loss(s * temperature, t * temperature, temperature)
    assert scaled.item() == pytest.approx(temperature**2 * kd_loss(s, t, 1.0).item(), rel=1e-4)


def test_kd_loss_gradients_reach_the_student_only_and_accept_float16_teachers():
    s = logits(2, 4, 4, 4).requires_grad_()
    t = logits(2, 4, 4, 4, seed=1).half().requires_grad_()
    loss = kd_loss(s, t, 3.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_kd_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        kd_loss(logits(1, 4, 8, 8), logits(1, 4, 4, 4), 1.0)


def test_supervised_loss_is_lower_for_a_prediction_that_matches_the_target():
    target = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    loss = supervised_loss(ce_weight=0.2, dice_weight=0.8)
    right = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float() * 10
    wrong = right.roll(1, dims=1)
    random = logits(2, 3, 8, 8)
    l_right, l_random, l_wrong = (loss(x, target.to(torch.uint8)).item() for x in (right, random, wrong))
    assert l_right < 0.05 < l_random < l_wrong


def test_supervised_loss_weights_select_the_terms():
    target = torch.randint(0, 3, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    x = logits(2, 3, 8, 8)
    ce = torch.nn.functional.cross_entropy(x, target).item()
    assert supervised_loss(1.0, 0.0)(x, target).item() == pytest.approx(ce, rel=1e-5)
    both = supervised_loss(1.0, 1.0)(x, target).item()
    dice = supervised_loss(0.0, 1.0)(x, target).item()
    assert both == pytest.approx(ce + dice, rel=1e-5)


@pytest.mark.parametrize("teacher_hw", [4, 8, 16])
def test_feature_loss_across_dims_and_resolutions(teacher_hw):
    loss_fn = FeatureLoss(student_dim=8, teacher_dim=16)
    s = logits(2, 8, 8, 8).requires_grad_()
    t = logits(2, 16, teacher_hw, teacher_hw, seed=1).half().requires_grad_()
    loss = loss_fn(s, t)
    assert loss.ndim == 0 and 0 < loss.item() <= 4
    loss.backward()
    assert s.grad is not None and loss_fn.proj.weight.grad is not None
    assert t.grad is None


def identity_feature_loss(dim: int) -> FeatureLoss:
    loss_fn = FeatureLoss(dim, dim)
    with torch.no_grad():
        loss_fn.proj.weight.copy_(torch.eye(dim).view(dim, dim, 1, 1))
    return loss_fn


def test_feature_loss_is_two_minus_two_cosine():
    loss_fn = identity_feature_loss(4)
    f = logits(2, 4, 6, 6)
    # identical directions (any positive scale) match; orthogonal ones give 2 - 2*0; opposite ones 4
    assert loss_fn(f, 5 * f).item() == pytest.approx(0.0, abs=1e-6)
    e0 = torch.zeros(1, 4, 3, 3)
    e0[:, 0] = 1
    e1 = e0.roll(1, dims=1)
    assert loss_fn(e0, e1).item() == pytest.approx(2.0)
    assert loss_fn(e0, -e0).item() == pytest.approx(4.0)
