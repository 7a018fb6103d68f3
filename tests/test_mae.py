"""MAE pretraining (tskd_tune.methods.mae): the random masking, the encoder on the visible patches, the
reconstruction target and loss, what pretraining trains and saves, and an exact resume inside it."""

import math

import pytest
import torch

from tests.conftest import TINY_VIT_STUDENT
from tskd_tune.cache import Store
from tskd_tune.config import StudentConfig
from tskd_tune.data.prepare import load
from tskd_tune.errors import TskdError
from tskd_tune.methods import TrialContext, common
from tskd_tune.methods.mae import (
    MaeDecoder,
    encode_visible,
    mae_loss,
    patch_pixels,
    pretrain,
    random_masking,
    visible_count,
    vit_of,
)
from tskd_tune.models.students import build_student
from tskd_tune.train import Hooks, load_checkpoint
from tskd_tune.transfer import build_transfer_set
from tskd_tune.trial import run_trial

# the reconstruction loss of the first pretraining step of the tiny mae config in
# test_pretraining_trains_the_encoder_alone_and_saves_no_decoder (float32 on CPU), obtained by running that
# test's pretrain() call once with this code and copying metrics["train_loss"]
GOLDEN_RECONSTRUCTION = 1.2823457
GOLDEN_TOLERANCE = 1e-4  # relative, as in test_methods


def vit(in_chans: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_student(StudentConfig(**TINY_VIT_STUDENT), in_chans, 4, 32)


@pytest.mark.parametrize(("n", "ratio"), [(16, 0.75), (64, 0.75), (49, 0.6), (16, 0.1)])
def test_masking_keeps_the_same_number_of_patches_per_image_and_differs_between_images(n, ratio):
    keep = random_masking(8, n, ratio, torch.Generator().manual_seed(0))
    k = round((1 - ratio) * n)
    assert keep.shape == (8, k)
    for row in keep.tolist():
        assert row == sorted(set(row)) and row[0] >= 0 and row[-1] < n
    assert len({tuple(row) for row in keep.tolist()}) > 1
    # drawn from the generator alone: a resumed epoch masks as the uninterrupted one did
    assert torch.equal(random_masking(8, n, ratio, torch.Generator().manual_seed(0)), keep)


def test_at_least_one_patch_is_seen_and_one_masked():
    assert (visible_count(16, 0.99), visible_count(16, 0.01), visible_count(16, 0.75)) == (1, 15, 4)


def test_the_encoder_on_visible_tokens_keeps_their_positions():
    model = vit().eval()
    net, x = vit_of(model), torch.rand(2, 1, 32, 32)
    prepared = model.encoder.prepare(x)
    n = net.patch_embed.num_patches
    with torch.no_grad():
        # every patch visible: the student's own deepest features
        every = encode_visible(net, prepared, torch.arange(n).expand(2, n))
        assert torch.allclose(every, model.features(x)[-1].flatten(2).transpose(1, 2), atol=1e-5)
        keep = random_masking(2, n, 0.75, torch.Generator().manual_seed(1))
        visible = encode_visible(net, prepared, keep)
        assert visible.shape == (2, 4, net.embed_dim)
        # a token's position embedding goes with it, not with its place in the sequence
        shuffled = encode_visible(net, prepared, keep[:, [2, 0, 3, 1]])
        assert torch.allclose(shuffled, visible[:, [2, 0, 3, 1]], atol=1e-5)
    with pytest.raises(
        TskdError, match="^distill.method: mae pretrains a ViT student's encoder, got a UNetStudent$"
    ):
        vit_of(build_student(StudentConfig(channels=[4, 8, 16]), 1, 4, 32))


def test_the_target_patches_are_in_the_order_the_patch_embedding_reads_them():
    net = vit_of(vit())
    x = torch.rand(2, 3, 32, 32)
    proj = net.patch_embed.proj  # a stride-8 convolution is a linear map of each patch's pixels
    linear = patch_pixels(x, 8) @ proj.weight.permute(0, 2, 3, 1).flatten(1).T + proj.bias
    with torch.no_grad():
        assert torch.allclose(linear, net.patch_embed(x), atol=1e-5)


def test_the_reconstruction_loss_decreases_on_a_tiny_set():
    model = vit()
    decoder = MaeDecoder(vit_of(model).embed_dim, (4, 4), 8 * 8 * 3)
    assert decoder.pos.shape == (1, 16, 32)
    # ramps in random directions: normalised per patch, every patch of an image is the same ramp, so the
    # masked ones follow from the visible ones; a model that ignores them does no better than 1 (the mean)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-0.5, 0.5, 32), torch.linspace(-0.5, 0.5, 32), indexing="ij")
    angle = 2 * math.pi * torch.rand(8, 1, 1, generator=g)
    images = (0.5 + 0.5 * (torch.cos(angle) * xx + torch.sin(angle) * yy))[:, None]
    opt = torch.optim.Adam([*model.parameters(), *decoder.parameters()], lr=3e-3)
    losses = []
    for _ in range(40):
        loss = mae_loss(model, decoder, images, random_masking(8, 16, 0.75, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1 and sum(losses[-5:]) / 5 < 0.3, losses


def test_pretraining_trains_the_encoder_alone_and_saves_no_decoder(tiny, tmp_path):
    cfg = tiny(distill={"method": "mae", "pretrain_epochs": 1}, student=TINY_VIT_STUDENT | {"epochs": 1})
    prepared, splits = load(cfg)
    st = TrialContext(cfg, prepared, splits, Store(cfg.cache.dir, False), torch.device("cpu"))
    student = common.student(st)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    metrics = pretrain(st, student, build_transfer_set(splits), steps=1)
    assert metrics["train_loss"] == pytest.approx(GOLDEN_RECONSTRUCTION, rel=GOLDEN_TOLERANCE), metrics
    after = student.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {k for k in before if k.startswith("encoder.")}  # the head waits for the labels
    # a whole trial saves the student alone: exactly a fresh student's weights, no decoder
    run_trial(cfg, out_dir=tmp_path / "out")
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "student.safetensors")
    assert set(saved) == set(before)
    common.student(st).load_state_dict(saved, strict=True)


class Interrupt(Exception):
    pass


def test_a_run_resumed_inside_pretraining_matches_an_uninterrupted_one(tiny, tmp_path):
    cfg = tiny(distill={"method": "mae", "pretrain_epochs": 2}, student=TINY_VIT_STUDENT | {"epochs": 1})
    whole = run_trial(cfg, out_dir=tmp_path / "whole")

    def crash(phase, epoch, step, loss):
        if (phase, epoch) == ("pretrain", 2):
            raise Interrupt  # as if the worker died after the first pretraining epoch's checkpoint
        return loss

    with pytest.raises(Interrupt):
        run_trial(cfg, out_dir=tmp_path / "part", hooks=Hooks(on_loss=crash))
    state = load_checkpoint(tmp_path / "part" / "checkpoint")
    assert (state["phase"], state["epoch"], set(state["modules"])) == ("pretrain", 1, {"student", "decoder"})
    resumed = run_trial(cfg, out_dir=tmp_path / "part", resume_from=tmp_path / "part" / "checkpoint")
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], abs=1e-6)
    assert resumed["val_dice"] == pytest.approx(whole["val_dice"], abs=1e-6)


def test_mae_pretrains_on_synthetic_images_too_and_has_no_teacher_premise(tiny):
    from tskd_tune.methods.checks import premise_warning, search_uses_transfer

    synth = {"generator": "ddpm", "image_size": 16, "channels": [8, 16], "train_steps": 2, "sample_steps": 2}
    synth |= {"batch_size": 4, "pool_size": 8, "ratio": 1.0}
    student = TINY_VIT_STUDENT | {"epochs": 1}
    cfg = tiny(distill={"method": "mae", "pretrain_epochs": 1}, student=student, synthetic=synth)
    result = run_trial(cfg)
    assert result["transfer_synthetic"] == 8 and result["teacher_params"] is None
    # the tiny teacher is random: a warning for distilling it, none for mae, which reads no teacher
    assert premise_warning(cfg) is None and premise_warning(tiny()) is not None
    # a search whose mae reference trial draws synthetic images builds the pool before its trials
    reference = tiny(
        distill={"method": "scratch"},
        student=student,
        synthetic=synth,
        search={"baselines": ["scratch", "mae"]},
    )
    assert search_uses_transfer(reference)
