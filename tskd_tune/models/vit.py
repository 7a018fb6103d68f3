"""A ViT encoder (timm, or LiteMedSAM's TinyViT) plus a segmentation head, as one module.

The same :class:`Segmenter` serves the teacher (a large pretrained ViT, LoRA-adapted) and the
ViT-Tiny student. Inputs are (B, C, S, S) images in [0, 1] as the data layer stores them; the
segmenter adapts channels, normalisation and resolution to its encoder and returns per-class logits
at the input resolution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(min(8, cout), cout), nn.GELU()
    )


class ProgressiveHead(nn.Module):
    """Progressive upsampling (SETR-PUP style): 2x steps of conv + upsample from the patch grid."""

    def __init__(self, in_dims: list[int], num_classes: int, channels: int, up_steps: int):
        super().__init__()
        self.proj = _conv_block(in_dims[-1], channels)
        self.ups = nn.ModuleList(_conv_block(channels, channels) for _ in range(up_steps))
        self.cls = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        x = self.proj(feats[-1])
        for up in self.ups:
            x = up(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        if x.shape[-2:] != out_size:
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return self.cls(x)


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
                skip = F.interpolate(
                    self.skips[i](shallower[i]), size=x.shape[-2:], mode="bilinear", align_corners=False
                )
                x = torch.cat([x, skip], dim=1)
            x = fuse(x)
        if x.shape[-2:] != out_size:
            x = F.interpolate(x, size=out_size, mode="bilinear", align_corners=False)
        return self.cls(x)


HEADS = {"progressive": ProgressiveHead, "unetr": UNETRHead}


class Segmenter(nn.Module):
    """Encoder + head. ``features(x)`` gives the encoder's feature maps, ``forward(x)`` the logits."""

    def __init__(
        self,
        encoder: nn.Module,
        *,
        num_classes: int,
        in_chans: int,
        encoder_chans: int,
        encoder_size: int,
        feature_dims: list[int],
        stride: int,
        decoder: str = "progressive",
        decoder_channels: int = 64,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        intermediates: int = 1,
    ):
        super().__init__()
        self.encoder = encoder
        self.in_chans, self.encoder_chans, self.encoder_size = in_chans, encoder_chans, encoder_size
        self.intermediates = intermediates
        self.feature_dim = feature_dims[-1]
        self.num_classes = num_classes
        up_steps = max(0, round(math.log2(stride)))
        self.head = HEADS[decoder](feature_dims, num_classes, decoder_channels, up_steps)
        self.register_buffer(
            "mean", torch.tensor(mean or [0.0] * encoder_chans).view(1, -1, 1, 1), persistent=False
        )
        self.register_buffer(
            "std", torch.tensor(std or [1.0] * encoder_chans).view(1, -1, 1, 1), persistent=False
        )

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.encoder_chans:
            x = x.mean(1, keepdim=True).expand(-1, self.encoder_chans, -1, -1) if x.shape[1] in (1, 3) else x
        if x.shape[-1] != self.encoder_size or x.shape[-2] != self.encoder_size:
            x = F.interpolate(
                x, size=(self.encoder_size, self.encoder_size), mode="bilinear", align_corners=False
            )
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder feature maps (B, D, h, w), shallow to deep (one map unless the head needs more)."""
        x = self._prepare(x)
        if hasattr(self.encoder, "forward_intermediates"):
            return self.encoder.forward_intermediates(
                x, indices=self.intermediates, norm=True, intermediates_only=True
            )
        return [self.encoder(x)]

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
) -> Segmenter:
    """A timm ViT (vit_*, samvit_*, *dinov2*, ...) with a segmentation head; weights from ``state_dict``."""
    import timm

    kwargs = {"img_size": image_size} | dict(model_kwargs or {})
    encoder = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    if state_dict is not None:
        load_encoder_state(encoder, state_dict, name)
    cfg = getattr(encoder, "pretrained_cfg", {}) or {}
    chans = encoder.patch_embed.proj.in_channels
    img = encoder.patch_embed.img_size
    img = img[0] if isinstance(img, tuple | list) else img
    depth = len(encoder.blocks)
    n_inter = 4 if decoder == "unetr" else 1
    indices = sorted({max(0, math.ceil((i + 1) * depth / n_inter) - 1) for i in range(n_inter)})
    # probe once: channel counts and grid differ across families (SAM's neck, register tokens, ...)
    with torch.no_grad():
        probe = encoder.forward_intermediates(
            torch.zeros(1, chans, img, img), indices=indices, norm=True, intermediates_only=True
        )
    mean, std = cfg.get("mean"), cfg.get("std")
    return Segmenter(
        encoder,
        num_classes=num_classes,
        in_chans=in_chans,
        encoder_chans=chans,
        encoder_size=img,
        feature_dims=[f.shape[1] for f in probe],
        stride=img // probe[-1].shape[-1],
        decoder=decoder,
        decoder_channels=decoder_channels,
        mean=tuple(mean)[:chans] if mean else None,
        std=tuple(std)[:chans] if std else None,
        intermediates=indices,
    )


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
