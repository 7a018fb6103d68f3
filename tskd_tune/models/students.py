"""The student registry: small segmentation models a teacher is distilled into.

Every student maps (B, C, S, S) images in [0, 1] to logits (B, K, S, S) at the input resolution, gives its
encoder feature maps with ``features(x)`` (shallow to deep, deepest last) for feature distillation, and
has an int ``feature_dim``, the channel count of the deepest map. Variants are factories in
:data:`STUDENTS`, selected by ``student.model``; each registers under a kind declared in
:data:`tskd_tune.kinds.STUDENT_KINDS` (the names the config accepts, and what callers ask of a student).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tskd_tune.config.schema import StudentConfig
from tskd_tune.errors import TskdError
from tskd_tune.kinds import STUDENT_KINDS, student_kind

StudentFactory = Callable[[StudentConfig, int, int, int], nn.Module]

STUDENTS: dict[str, StudentFactory] = {}
"""``student.model`` -> ``factory(cfg, in_chans, num_classes, image_size)``; filled by :func:`register_student`."""


def register_student(name: str) -> Callable[[StudentFactory], StudentFactory]:
    """Register the decorated factory as student ``name``, a kind declared in ``tskd_tune.kinds``."""
    if name not in STUDENT_KINDS:
        # the config would refuse the name: declare the kind (and what it is) first
        raise ValueError(f"student {name!r} is not declared in tskd_tune.kinds.STUDENT_KINDS")

    def add(factory: StudentFactory) -> StudentFactory:
        STUDENTS[name] = factory
        return factory

    return add


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --------------------------------------------------------------------------------------------- unet
class UNetStudent(nn.Module):
    """MONAI's UNet; ``features`` runs only its encoder path, down to the bottom layer."""

    def __init__(self, net: nn.Module, feature_dim: int):
        super().__init__()
        self.net = net
        self.feature_dim = feature_dim

    def _encoder_path(self) -> tuple[list[nn.Module], nn.Module]:
        # MONAI nests each level as Sequential(down, SkipConnection(submodule), up); SkipConnection feeds
        # its input unchanged to the submodule, so down_0 -> down_1 -> ... -> bottom is exactly the
        # encoder half of forward(). Walking it spares the decoder and the state a hook would keep.
        from monai.networks.layers import SkipConnection

        downs, block = [], self.net.model
        while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
            downs.append(block[0])
            block = block[1].submodule
        return downs, block

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Output of every encoder level and of the bottom layer (deepest last)."""
        downs, bottom = self._encoder_path()
        feats = []
        for down in downs:
            x = down(x)
            feats.append(x)
        feats.append(bottom(x))
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


# these come from the data and student.channels, so model_kwargs may not set them
_UNET_FIXED = ("spatial_dims", "in_channels", "out_channels", "channels", "strides")


@register_student("unet")
def unet(cfg: StudentConfig, in_chans: int, num_classes: int, image_size: int) -> nn.Module:
    """MONAI UNet with ``student.channels`` per level and a stride-2 step between levels."""
    from monai.networks.nets import UNet

    levels = len(cfg.channels)
    factor = 2 ** (levels - 1)
    # the deepest level must keep at least 2x2 pixels: instance norm is undefined on a single one
    if image_size % factor or image_size < 2 * factor:
        raise TskdError(
            f"student.channels: {levels} levels halve the image {levels - 1} times, so data.image_size "
            f"must be a multiple of {factor} and at least {2 * factor}, got {image_size}"
        )
    allowed = [p for p in inspect.signature(UNet.__init__).parameters if p not in ("self", *_UNET_FIXED)]
    for key in cfg.model_kwargs:
        if key in _UNET_FIXED:
            raise TskdError(f"student.model_kwargs: {key!r} is set from the data and student.channels")
        if key not in allowed:
            raise TskdError(
                f"student.model_kwargs: unknown key {key!r} for unet (allowed: {', '.join(allowed)})"
            )
    kwargs = {"num_res_units": 1} | cfg.model_kwargs
    try:
        net = UNet(
            spatial_dims=2,
            in_channels=in_chans,
            out_channels=num_classes,
            channels=tuple(cfg.channels),
            strides=(2,) * (levels - 1),
            **kwargs,
        )
    except (TypeError, ValueError, KeyError, AssertionError) as exc:
        raise TskdError(f"student.model_kwargs: not accepted by unet: {_first_line(exc)}") from None
    return UNetStudent(net, feature_dim=cfg.channels[-1])


# ---------------------------------------------------------------------------------------- timm_unet
def _block(cin: int, cout: int) -> nn.Sequential:
    # GroupNorm rather than BatchNorm: distillation batches can be small, and GN does not care
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.GroupNorm(min(8, cout), cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.GroupNorm(min(8, cout), cout),
        nn.ReLU(inplace=True),
    )


class TimmUNet(nn.Module):
    """A timm feature encoder with a small U-Net decoder: upsample, concatenate the skip, convolve."""

    def __init__(self, encoder: nn.Module, in_chans: int, num_classes: int, widths: list[int]):
        super().__init__()
        enc = list(encoder.feature_info.channels())
        self.encoder = encoder
        self.feature_dim = enc[-1]
        self.bottleneck = _block(enc[-1], widths[-1])
        # ups[i] fuses level i's skip with the upsampled level i + 1
        self.ups = nn.ModuleList(_block(widths[i + 1] + enc[i], widths[i]) for i in range(len(enc) - 1))
        # the encoder's shallowest map is already strided; the raw image is the full-resolution skip that
        # lets boundaries be placed to the pixel
        self.final = _block(widths[0] + in_chans, widths[0])
        self.cls = nn.Conv2d(widths[0], num_classes, 1)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The encoder's feature maps, shallow to deep."""
        return list(self.encoder(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.features(x)
        y = self.bottleneck(feats[-1])
        for i in reversed(range(len(feats) - 1)):
            y = F.interpolate(y, size=feats[i].shape[-2:], mode="bilinear", align_corners=False)
            y = self.ups[i](torch.cat([y, feats[i]], dim=1))
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.cls(self.final(torch.cat([y, x], dim=1)))


_TIMM_FIXED = ("features_only", "pretrained", "in_chans", "out_indices", "feature_cls", "pretrained_cfg")


@register_student("timm_unet")
def timm_unet(cfg: StudentConfig, in_chans: int, num_classes: int, image_size: int) -> nn.Module:
    """Randomly initialised timm encoder (``student.encoder``) cut to ``len(student.channels)`` levels."""
    import timm

    name = cfg.encoder
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise TskdError(f"student.encoder: unknown timm model {name!r}{hint}")
    for key in cfg.model_kwargs:
        if key in _TIMM_FIXED:
            raise TskdError(f"student.model_kwargs: {key!r} is fixed by timm_unet")
    levels = len(cfg.channels)
    kwargs = dict(features_only=True, pretrained=False, in_chans=in_chans, out_indices=tuple(range(levels)))
    try:
        # the "getter" wrapper prunes the layers after the last level used; the default wrapper keeps
        # them for some families (mobilenetv3, efficientnet), as dead weights that inflate the size
        encoder = timm.create_model(name, feature_cls="getter", **kwargs, **cfg.model_kwargs)
    except TypeError as exc:
        raise TskdError(f"student.model_kwargs: not accepted by {name}: {_first_line(exc)}") from None
    except (AssertionError, IndexError) as exc:
        if "out of range" not in str(exc):
            raise TskdError(
                f"student.encoder: {name} cannot be a feature encoder: {_first_line(exc)}"
            ) from None
        available = len(timm.create_model(name, features_only=True, pretrained=False).feature_info)
        raise TskdError(
            f"student.channels: encoder {name} has {available} feature levels, got {levels} channels"
        ) from None
    except (RuntimeError, ValueError, KeyError, AttributeError) as exc:
        raise TskdError(f"student.encoder: {name} cannot be a feature encoder: {_first_line(exc)}") from None
    _dry_run(encoder, name, in_chans, image_size)
    return TimmUNet(encoder, in_chans, num_classes, list(cfg.channels))


def _dry_run(encoder: nn.Module, name: str, in_chans: int, image_size: int) -> None:
    # some encoders only accept their own input size (ViTs); failing here names the field, while a
    # failure in the first training step would end a trial with a traceback
    was_training = encoder.training
    try:
        with torch.no_grad():
            encoder.eval()(torch.zeros(1, in_chans, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise TskdError(
            f"student.encoder: {name} does not run on {image_size}x{image_size} images: {_first_line(exc)}"
        ) from None
    finally:
        encoder.train(was_training)


# ----------------------------------------------------------------------------------------- vit_tiny
@register_student("vit_tiny")
def vit_tiny(cfg: StudentConfig, in_chans: int, num_classes: int, image_size: int) -> nn.Module:
    """ViT-Tiny (patch 8 by default, for small images) with a light progressive-upsampling head."""
    from tskd_tune.models.vit import timm_segmenter

    try:
        return timm_segmenter(
            "vit_tiny_patch16_224",
            num_classes=num_classes,
            in_chans=in_chans,
            image_size=image_size,
            decoder="progressive",
            decoder_channels=32,
            model_kwargs={"patch_size": 8} | cfg.model_kwargs,
        )
    except (TypeError, ValueError, AssertionError) as exc:
        raise TskdError(f"student.model_kwargs: not accepted by vit_tiny: {_first_line(exc)}") from None


# --------------------------------------------------------------------------------------------- build
def build_student(cfg: StudentConfig, in_chans: int, num_classes: int, image_size: int) -> nn.Module:
    """Build the student named by ``cfg.model`` (weights are random; nothing is downloaded)."""
    return STUDENTS[student_kind(cfg.model).name](cfg, in_chans, num_classes, image_size)
