"""Losses of the student (and the teacher's fine-tuning): supervised Dice + CE, logit KD, feature matching."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def supervised_loss(
    ce_weight: float, dice_weight: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``ce_weight * CE + dice_weight * Dice`` (MONAI DiceCELoss) of logits (B,K,H,W) against labels (B,H,W)."""
    from monai.losses import DiceCELoss

    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, lambda_ce=ce_weight, lambda_dice=dice_weight)

    def loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # MONAI wants a channel axis on the labels; float32 logits keep the softmax stable under autocast
        return dice_ce(logits.float(), target.long().unsqueeze(1))

    return loss


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton KD: per-pixel KL(teacher_T || student_T) summed over classes, averaged over pixels, times T^2."""
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student and teacher logits must have the same shape, got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    t = float(temperature)
    # cached teacher logits are float16; the teacher is a fixed target, so no gradient reaches it
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    log_p_student = F.log_softmax(student_logits.float() / t, dim=1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(1)
    # T^2 keeps the gradient scale independent of T (Hinton et al. 2015)
    return kl.mean() * t * t


class FeatureLoss(nn.Module):
    """Feature matching through a learned 1x1 projection: ``2 - 2 cos`` per pixel, averaged."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        # the student's and teacher's maps differ in channels; no bias, so the loss cannot be lowered by
        # a constant direction that ignores the student's features
        self.proj = nn.Conv2d(student_dim, teacher_dim, kernel_size=1, bias=False)

    def forward(self, student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
        s = self.proj(student_feat.float())
        t = teacher_feat.detach().float()
        # the maps also differ in resolution (a ViT's patch grid vs. a CNN level): compare on the teacher's
        if s.shape[-2:] != t.shape[-2:]:
            s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
        # unit vectors per pixel: the teacher's feature scale is arbitrary, its direction carries the meaning
        s, t = F.normalize(s, dim=1), F.normalize(t, dim=1)
        return (s - t).pow(2).sum(1).mean()
