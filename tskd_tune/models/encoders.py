"""Encoders as a sequence of steps that can be cut before any block: a frozen prefix and a trainable suffix.

Every supported encoder family (timm ViTs incl. DINOv2, timm SAM ViTs, LiteMedSAM's TinyViT) is
described as a flat list of steps, some of them *blocks* (the units LoRA adapts and
``teacher.lora.last_blocks`` counts), plus *taps*: after which steps a feature map leaves the encoder
for the head, and how it is made (final norm, SAM neck, ...). Cutting before block ``f`` gives

- ``prefix(x, f)``: the steps before block f, run once per image (and cached): its *state* is the
  token tensor at the cut followed by the taps already taken; with ``f == n_blocks`` (the whole encoder
  frozen) the state is just the feature maps;
- ``suffix(state, f)``: the remaining steps and taps; the feature maps, shallow to deep.

``suffix(prefix(x, f), f)`` equals the uncut forward for every f (tested per family).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Step:
    """One step of an encoder: ``fn(x) -> x``; ``block`` marks the units LoRA adapts."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    block: nn.Module | None = None


class SteppedEncoder(nn.Module):
    """An encoder (registered as ``self.net``, so state-dict keys are ``net.*``) described as steps."""

    def __init__(self, net: nn.Module, steps: list[Step], taps: dict[int, Callable], prepare: Callable):
        super().__init__()
        self.net = net
        self._steps = steps
        self._taps = taps  # step index -> fn(x) giving a feature map after that step
        self._prepare = prepare
        self._block_steps = [i for i, s in enumerate(steps) if s.block is not None]

    @property
    def n_blocks(self) -> int:
        return len(self._block_steps)

    def blocks(self) -> list[nn.Module]:
        """The blocks in forward order (for LiteMedSAM: across its stages)."""
        return [self._steps[i].block for i in self._block_steps]

    def block_names(self) -> list[str]:
        """Qualified module names of the blocks, relative to this encoder (``net.blocks.3``)."""
        names = {id(m): n for n, m in self.named_modules()}
        return [names[id(b)] for b in self.blocks()]

    def _cut(self, frozen: int) -> int:
        if not 0 <= frozen <= self.n_blocks:
            raise ValueError(f"frozen depth must be in 0..{self.n_blocks}, got {frozen}")
        return len(self._steps) if frozen == self.n_blocks else self._block_steps[frozen]

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] as the encoder's first step takes them (its channels, size and normalisation)."""
        return self._prepare(x)

    def prefix(self, x: torch.Tensor, frozen: int) -> list[torch.Tensor]:
        """State after the frozen part: [tokens at the cut, *taps taken before it] (only taps when all frozen)."""
        cut = self._cut(frozen)
        x = self.prepare(x)
        taps = []
        for i, step in enumerate(self._steps[:cut]):
            x = step.fn(x)
            if i in self._taps:
                taps.append(self._taps[i](x))
        return taps if cut == len(self._steps) else [x, *taps]

    def suffix(self, state: list[torch.Tensor], frozen: int) -> list[torch.Tensor]:
        """Feature maps (B, D, h, w), shallow to deep, from a prefix state."""
        cut = self._cut(frozen)
        if cut == len(self._steps):
            return list(state)
        x, taps = state[0], list(state[1:])
        for i in range(cut, len(self._steps)):
            x = self._steps[i].fn(x)
            if i in self._taps:
                taps.append(self._taps[i](x))
        return taps

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.suffix(self.prefix(x, 0), 0)


def _preparer(encoder_chans: int, encoder_size: int, mean, std) -> Callable:
    mean_t = torch.tensor(mean or [0.0] * encoder_chans).view(1, -1, 1, 1)
    std_t = torch.tensor(std or [1.0] * encoder_chans).view(1, -1, 1, 1)

    def prepare(x: torch.Tensor) -> torch.Tensor:
        """Channels, resolution and normalisation the encoder was trained with; images arrive in [0, 1]."""
        if x.shape[1] != encoder_chans and x.shape[1] in (1, 3):
            x = x.mean(1, keepdim=True).expand(-1, encoder_chans, -1, -1)
        if x.shape[-2:] != (encoder_size, encoder_size):
            x = F.interpolate(x, size=(encoder_size, encoder_size), mode="bilinear", align_corners=False)
        return (x - mean_t.to(x)) / std_t.to(x)

    return prepare


# ----------------------------------------------------------------------------------- timm families
def timm_vit(net: nn.Module, indices: list[int], encoder_size: int, mean=None, std=None) -> SteppedEncoder:
    """A timm ``VisionTransformer`` (ViT, DeiT, DINOv2, ...) with taps after ``indices`` (as
    ``forward_intermediates(norm=True)``: final norm, prefix tokens dropped, NCHW)."""
    chans = net.patch_embed.proj.in_channels

    def embed(x):
        return net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))

    def tap(x):
        y = net.norm(x)[:, net.num_prefix_tokens :]
        h, w = net.patch_embed.dynamic_feat_size((encoder_size, encoder_size))
        return y.reshape(y.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()

    steps = [Step(embed)] + [Step(b, block=b) for b in net.blocks]
    return SteppedEncoder(
        net, steps, {1 + i: tap for i in indices}, _preparer(chans, encoder_size, mean, std)
    )


def timm_sam(net: nn.Module, indices: list[int], encoder_size: int, mean=None, std=None) -> SteppedEncoder:
    """A timm ``VisionTransformerSAM``; taps go through the neck (as ``forward_intermediates(norm=True)``)."""
    from timm.layers import resample_abs_pos_embed_nhwc

    chans = net.patch_embed.proj.in_channels

    def embed(x):
        x = net.patch_embed(x)
        if net.pos_embed is not None:
            x = x + resample_abs_pos_embed_nhwc(net.pos_embed, x.shape[1:3])
        return net.norm_pre(net.patch_drop(net.pos_drop(x)))

    def tap(x):
        return net.neck(x.permute(0, 3, 1, 2))

    steps = [Step(embed)] + [Step(b, block=b) for b in net.blocks]
    return SteppedEncoder(
        net, steps, {1 + i: tap for i in indices}, _preparer(chans, encoder_size, mean, std)
    )


def tiny_vit(net: nn.Module, encoder_size: int) -> SteppedEncoder:
    """LiteMedSAM's TinyViT: patch embedding, 4 stages of blocks with merges between, the SAM neck.

    Its 12 blocks (2 MBConv, then 2 + 6 + 2 attention blocks) are counted across the stages.
    """
    steps = [Step(net.patch_embed)]
    for layer in net.layers:
        steps += [Step(b, block=b) for b in layer.blocks]
        if layer.downsample is not None:
            steps.append(Step(layer.downsample))
    grid = int(math.isqrt(net.layers[-1].input_resolution[0] * net.layers[-1].input_resolution[1]))

    def tap(x):
        return net.neck(x.view(x.shape[0], grid, grid, x.shape[-1]).permute(0, 3, 1, 2))

    # MedSAM scales each image to [0, 1] and feeds 3 channels: no mean/std
    return SteppedEncoder(net, steps, {len(steps) - 1: tap}, _preparer(3, encoder_size, None, None))
