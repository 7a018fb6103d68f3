"""A ViT encoder (timm, or LiteMedSAM's TinyViT) plus a segmentation head, as one module.

The same :class:`Segmenter` serves the teacher (a large pretrained ViT, frozen, with a trained head and
optionally LoRA in its last blocks) and the ViT-Tiny student. Inputs are (B, C, S, S) images in [0, 1]
as the data layer stores them; the encoder adapts channels, normalisation and resolution to what it was
trained with, and the head returns per-class logits at the image size ``out_size``.

A teacher's encoder is cut at ``frozen`` (see :mod:`tskd_tune.models.encoders`): ``prefix(x)`` is the
frozen part, run once per image and cached; ``from_state(state)`` runs the rest (LoRA blocks, if any,
and the head). ``forward(x)`` is both, so the model also works on images directly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tskd_tune.models.encoders import SteppedEncoder, timm_sam, timm_vit


def _conv_block(cin: int, cout: int, k: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.GroupNorm(min(8, cout), cout), nn.GELU()
    )


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x if x.shape[-2:] == size else F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ProgressiveHead(nn.Module):
    """SETR-PUP style: a 1x1 projection and a 3x3 block at the feature resolution, then 2x steps of
    upsample + conv while that stays within the image size; the logits are resized once to the image."""

    def __init__(self, in_dims: list[int], num_classes: int, channels: int, up_steps: int):
        super().__init__()
        self.proj = _conv_block(in_dims[-1], channels, k=1)
        self.refine = _conv_block(channels, channels)
        self.ups = nn.ModuleList(_conv_block(channels, channels) for _ in range(up_steps))
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        x = self.refine(self.proj(feats[-1]))
        for up in self.ups:
            x = up(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return _resize(self.cls(x), out_size)


class UNETRHead(nn.Module):
    """UNETR-style head: the deepest features are upsampled step by step and fused with shallower ones."""

    def __init__(self, in_dims: list[int], num_classes: int, channels: int, up_steps: int):
        super().__init__()
        self.proj = _conv_block(in_dims[-1], channels)
        # one skip per upsampling step, from the shallower intermediates (deepest skip first)
        skip_dims = list(reversed(in_dims[:-1]))[:up_steps]
        self.skips = nn.ModuleList(nn.Conv2d(d, channels, 1) for d in skip_dims)
        self.fuse = nn.ModuleList(
            _conv_block(2 * channels if i < len(skip_dims) else channels, channels) for i in range(up_steps)
        )
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        x = self.proj(feats[-1])
        shallower = list(reversed(feats[:-1]))
        for i, fuse in enumerate(self.fuse):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            if i < len(self.skips):
                x = torch.cat([x, _resize(self.skips[i](shallower[i]), tuple(x.shape[-2:]))], dim=1)
            x = fuse(x)
        return _resize(self.cls(x), out_size)


HEADS = {"progressive": ProgressiveHead, "unetr": UNETRHead}


def up_steps(grid: int, out_size: int) -> int:
    """2x upsampling steps from the feature grid that stay within the image size (0 when the grid is as large)."""
    return max(0, math.floor(math.log2(out_size / grid))) if out_size > grid else 0


class Segmenter(nn.Module):
    """Encoder + head. ``prefix``/``from_state`` split the forward pass at the frozen depth."""

    def __init__(
        self,
        encoder: SteppedEncoder,
        *,
        num_classes: int,
        in_chans: int,
        feature_dims: list[int],
        grid: int,
        out_size: int,
        decoder: str = "progressive",
        decoder_channels: int = 64,
        frozen: int = 0,
        freeze_encoder: bool = False,
        head: nn.Module | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.in_chans, self.num_classes = in_chans, num_classes
        self.feature_dim = feature_dims[-1]
        self.out_size = out_size
        self.frozen = frozen
        """Blocks before the cut: the prefix (cached) runs them, the suffix the rest."""
        self.freeze_encoder = freeze_encoder
        # a head given ready-made (LiteMedSAM's pretrained mask decoder) replaces the conv head
        self.head = head or HEADS[decoder](
            feature_dims, num_classes, decoder_channels, up_steps(grid, out_size)
        )
        if freeze_encoder:
            self.encoder.requires_grad_(False)
        self.train()

    def train(self, mode: bool = True) -> Segmenter:
        """A frozen encoder stays in eval mode: its BatchNorm layers keep their pretrained running statistics
        (in train mode they would normalise by batch statistics and overwrite them) and nothing drops out;
        only LoRA's own dropout follows ``mode``."""
        self.training = mode
        for child in self.children():
            # not chained: TinyViT's attention overrides train() and returns None
            child.train(mode and not (self.freeze_encoder and child is self.encoder))
        if self.freeze_encoder and mode:
            for name, module in self.encoder.named_modules():
                if "lora_dropout" in name:
                    module.training = True
        return self

    def prefix(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The frozen part of the encoder on images: the state the feature cache stores."""
        return self.encoder.prefix(x, self.frozen)

    def features_from(self, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """Encoder feature maps (B, D, h, w), shallow to deep, from a prefix state."""
        return self.encoder.suffix(state, self.frozen)

    def from_state(self, state: list[torch.Tensor]) -> torch.Tensor:
        """Logits at the image size from a prefix state (the trainable part only)."""
        return self.head(self.features_from(state), out_size=(self.out_size, self.out_size))

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder feature maps (B, D, h, w), shallow to deep (one map unless the head needs more)."""
        return self.features_from(self.prefix(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x), out_size=tuple(x.shape[-2:]))


def timm_segmenter(
    name: str,
    *,
    num_classes: int,
    in_chans: int,
    image_size: int,
    decoder: str = "progressive",
    decoder_channels: int = 64,
    model_kwargs: dict | None = None,
    state_dict: dict | None = None,
    frozen_blocks: int | None = None,
    freeze_encoder: bool = False,
) -> Segmenter:
    """A timm ViT (vit_*, samvit_*, *dinov2*, ...) with a segmentation head; weights from ``state_dict``.

    ``frozen_blocks``: where the encoder is cut (None: no cut; -1: after the last block).
    """
    import timm

    kwargs = {"img_size": image_size} | dict(model_kwargs or {})
    net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if state_dict is not None:
        load_encoder_state(net, state_dict, name)
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    chans = net.patch_embed.proj.in_channels
    img = net.patch_embed.img_size
    img = img[0] if isinstance(img, tuple | list) else img
    depth = len(net.blocks)
    n_inter = 4 if decoder == "unetr" else 1
    indices = sorted({max(0, math.ceil((i + 1) * depth / n_inter) - 1) for i in range(n_inter)})
    mean, std = cfg.get("mean"), cfg.get("std")
    mean, std = (tuple(mean)[:chans] if mean else None), (tuple(std)[:chans] if std else None)
    family = timm_sam if hasattr(net, "neck") else timm_vit
    encoder = family(net, indices, img, mean, std)
    # probe once: channel counts and grid differ across families (SAM's neck, register tokens, ...)
    with torch.no_grad():
        encoder.train(False)
        probe = encoder(torch.zeros(1, chans, img, img))
    frozen = encoder.n_blocks if frozen_blocks == -1 else frozen_blocks or 0
    return Segmenter(
        encoder,
        num_classes=num_classes,
        in_chans=in_chans,
        feature_dims=[f.shape[1] for f in probe],
        grid=probe[-1].shape[-1],
        out_size=image_size,
        decoder=decoder,
        decoder_channels=decoder_channels,
        frozen=frozen,
        freeze_encoder=freeze_encoder,
    )


def _resample_sam(state: dict, encoder: nn.Module) -> dict:
    """SAM checkpoints are made at 1024 px (a 64x64 grid): resample the absolute position embedding
    (NHWC) and the relative position tables of each block to this encoder's grid, as SAM itself
    interpolates them, so SAM ViT-B weights also run at 256 px. Other checkpoints pass unchanged."""
    if not hasattr(encoder, "neck"):
        return state
    from timm.layers import resample_abs_pos_embed_nhwc

    own = encoder.state_dict()
    out = dict(state)
    for k, v in state.items():
        if k not in own or own[k].shape == v.shape:
            continue
        if k == "pos_embed" and v.ndim == 4:
            out[k] = resample_abs_pos_embed_nhwc(v, own[k].shape[1:3])
        elif k.endswith(("rel_pos_h", "rel_pos_w")) and v.ndim == 2:
            out[k] = F.interpolate(v.T[None], size=own[k].shape[0], mode="linear", align_corners=False)[0].T
    return out


def load_encoder_state(encoder: nn.Module, state: dict, name: str) -> None:
    """Load a checkpoint into a timm encoder, resampling position embeddings as timm does; strict on the trunk."""
    import sys

    from tskd_tune.errors import TskdError

    filter_fn = getattr(sys.modules[type(encoder).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:
            state = filter_fn(state, encoder)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise TskdError(f"teacher.checkpoint: does not fit {name}: {str(exc).splitlines()[0]}") from None
    state = _resample_sam(state, encoder)
    # a classification head in the checkpoint is expected and dropped: we replace it by a decoder
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.", "head_drop."))}
    try:
        result = encoder.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        first = next(
            (ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0]
        )
        raise TskdError(f"teacher.checkpoint: does not fit {name}: {first}") from None
    missing = [k for k in result.missing_keys if not k.startswith(("head.", "fc_norm."))]
    if missing or result.unexpected_keys:
        raise TskdError(
            f"teacher.checkpoint: does not fit {name}: {len(missing)} missing key(s) (e.g. {missing[:2]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})"
        )
