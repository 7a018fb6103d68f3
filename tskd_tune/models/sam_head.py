"""LiteMedSAM's own pretrained prompt encoder and mask decoder as a semantic segmentation head (SAMed's recipe).

SAM's mask decoder turns a 64x64 image embedding plus prompt tokens into masks: a two-way transformer lets
its output tokens (one IoU token, four mask tokens) attend to the embedding with dense positional encodings,
and each mask token's hypernetwork MLP turns it into the weights of a per-pixel classifier on the 4x
upscaled embedding. A conv head on the embedding has none of this, and none of its pretraining on about
1.5 M medical image-mask pairs.

As a segmenter of ``K`` classes it takes no user prompt: the prompt encoder's default embeddings (no point,
no mask), or a box around the whole image (``teacher.prompt: box``, what MedSAM was trained with). Class ``k``
gets its own mask token and hypernetwork MLP, both started from the pretrained token ``k mod 4`` (SAMed's
"multimask outputs, one per class"); the IoU head, which would score SAM's four masks, is dropped. The
logits (256x256, from the 64x64 embedding) are resized once to the image size.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class SamMaskHead(nn.Module):
    """SAM prompt encoder + mask decoder with one mask token per class, called like the conv heads:
    ``head(feature_maps, out_size) -> logits``; it reads the deepest map (the 256x64x64 embedding)."""

    def __init__(
        self, prompt_encoder: nn.Module, mask_decoder: nn.Module, num_classes: int, prompt: str = "none"
    ):
        super().__init__()
        if prompt not in ("none", "box"):
            raise ValueError(f"prompt must be `none` or `box`, got {prompt!r}")
        self.prompt_encoder = prompt_encoder
        self.decoder = _per_class_tokens(mask_decoder, num_classes)
        self.prompt = prompt

    def _prompts(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        pe = self.prompt_encoder
        boxes = None
        if self.prompt == "box":
            h, w = pe.input_image_size
            boxes = torch.tensor([[0.0, 0.0, w - 1.0, h - 1.0]], device=device).expand(batch, 1, 4)
        sparse, dense = pe(points=None, boxes=boxes, masks=None)
        # without any prompt the prompt encoder answers for a batch of 1: both broadcast over the images
        return sparse.expand(batch, -1, -1), dense

    def forward(self, feats: list[torch.Tensor], out_size: tuple[int, int]) -> torch.Tensor:
        emb = feats[-1]
        sparse, dense = self._prompts(emb.shape[0], emb.device)
        masks, _ = self.decoder.predict_masks(
            image_embeddings=emb,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
        )
        if masks.shape[-2:] == out_size:
            return masks
        # 256 -> 64 px is a 4x reduction: antialiased, so thin structures are averaged in, not skipped
        return F.interpolate(masks, size=out_size, mode="bilinear", align_corners=False, antialias=True)


def _per_class_tokens(decoder: nn.Module, num_classes: int) -> nn.Module:
    """The decoder with ``num_classes`` mask tokens and hypernetwork MLPs, class k started from pretrained
    token ``k mod 4`` (plus a little noise from the fifth on); its IoU head (SAM's mask-quality score) is replaced by an identity, as nothing reads it."""
    pretrained = decoder.mask_tokens.weight.detach()
    source = [k % pretrained.shape[0] for k in range(num_classes)]
    tokens = nn.Embedding(num_classes, pretrained.shape[1])
    with torch.no_grad():
        tokens.weight.copy_(pretrained[source])
        # a fifth class reuses token 0: a little noise (seeded with the teacher) so that it does not start as an
        # exact copy, whose logits would equal the other class's until training tells them apart
        repeat = torch.arange(num_classes) >= pretrained.shape[0]
        tokens.weight[repeat] += 0.1 * pretrained.std() * torch.randn_like(tokens.weight[repeat])
    mlps = decoder.output_hypernetworks_mlps
    decoder.mask_tokens = tokens
    decoder.output_hypernetworks_mlps = nn.ModuleList(copy.deepcopy(mlps[i]) for i in source)
    decoder.num_mask_tokens = num_classes
    decoder.iou_prediction_head = nn.Identity()
    return decoder
