"""Metrics: MONAI Dice and HD95 per foreground class, parameter counts and inference latency."""

from __future__ import annotations

import math
import statistics
import time
import warnings

import numpy as np
import torch
from torch import nn

# images per MONAI call: one-hot tensors of a whole validation set would not fit in memory
_CHUNK = 64


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def segmentation_metrics(pred: torch.Tensor, target: torch.Tensor, class_names: list[str]) -> dict:
    """Foreground Dice and HD95 (pixels) of label maps (N,H,W), per class and averaged over classes.

    Empty-mask policy:
      - Dice ignores an image for a class absent from its ground truth (MONAI ``ignore_empty``); false
        positives there are penalised by HD95 instead.
      - HD95 skips an image where both prediction and ground truth lack the class; where exactly one
        lacks it, the image counts the image diagonal (a worst-case penalty instead of inf/nan).
      - A class that leaves no image to score gives nan (``dice_<name>``) and is left out of the means;
        if every class is nan, the mean is nan.
    Returns ``{"dice", "dice_<name>" per foreground class, "hd95"}`` as plain floats.
    """
    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    from monai.metrics.utils import do_metric_reduction
    from monai.networks.utils import one_hot

    pred, target = torch.as_tensor(pred), torch.as_tensor(target)
    if pred.shape != target.shape or pred.ndim != 3:
        raise ValueError(
            f"pred and target must both be (N, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    if len(pred) == 0:
        raise ValueError("no images to score")
    k = len(class_names)
    diagonal = math.hypot(*pred.shape[-2:])
    dice = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True, get_not_nans=True)
    hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="mean_batch")
    hd_rows = []
    for i in range(0, len(pred), _CHUNK):
        p = one_hot(pred[i : i + _CHUNK, None].long().cpu(), k)
        t = one_hot(target[i : i + _CHUNK, None].long().cpu(), k)
        dice(y_pred=p, y=t)
        with warnings.catch_warnings():
            # MONAI warns about empty masks, which the policy above scores
            warnings.simplefilter("ignore", UserWarning)
            # and MONAI 1.6 warns about its own internal use of a deprecated argument
            warnings.simplefilter("ignore", FutureWarning)
            d = hd(y_pred=p, y=t)
        p_has, t_has = p[:, 1:].flatten(2).any(-1), t[:, 1:].flatten(2).any(-1)
        one_empty = torch.full_like(d, diagonal).where(p_has ^ t_has, torch.full_like(d, math.nan))
        hd_rows.append(d.where(p_has & t_has, one_empty))
    dice_c, dice_n = dice.aggregate()
    hd_c, hd_n = do_metric_reduction(torch.cat(hd_rows), hd.reduction)
    # MONAI reduces a class with no scored image to 0, which would read as a (terrible) score
    dice_c = dice_c.where(dice_n > 0, math.nan).tolist()
    hd_c = hd_c.where(hd_n > 0, math.nan).tolist()
    out = {"dice": _nanmean(dice_c)}
    out |= {f"dice_{name}": float(v) for name, v in zip(class_names[1:], dice_c, strict=True)}
    out["hd95"] = _nanmean(hd_c)
    return out


def _tensor(array) -> torch.Tensor:
    return array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))


@torch.inference_mode()
def _predict(model: nn.Module, images, batch_size: int, device) -> torch.Tensor:
    preds = []
    for i in range(0, len(images), batch_size):
        # images may be a float16 memmap: read one batch, compute in float32; a list is a cached teacher state
        batch = images[i : i + batch_size]
        x = (
            [_tensor(b).to(device, torch.float32) for b in batch]
            if isinstance(batch, list)
            else _tensor(batch).to(device, torch.float32)
        )
        preds.append(model(x).argmax(1).to("cpu", torch.uint8))
    return torch.cat(preds)


def evaluate(
    model: nn.Module,
    images,
    masks,
    class_names: list[str],
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    prefix: str = "val_",
) -> dict:
    """Segment ``images`` (N,C,S,S; or a sliceable of state lists for a teacher's trainable part) and score
    against ``masks`` (N,S,S); keys get ``prefix`` (``val_dice``)."""
    was_training = model.training
    model.eval()
    try:
        pred = _predict(model, images, batch_size, device)
    finally:
        model.train(was_training)
    target = _tensor(masks).cpu().long()
    return {prefix + k: v for k, v in segmentation_metrics(pred, target, class_names).items()}


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once); only those with ``requires_grad`` if ``trainable_only``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def latency_ms(
    model: nn.Module,
    in_chans: int,
    image_size: int,
    batch: int = 1,
    repeats: int = 10,
    warmup: int = 2,
    device: str | torch.device = "cpu",
) -> float:
    """Median wall time in ms of one forward pass on random input; the model must already be on ``device``."""
    device = torch.device(device)
    x = torch.rand(batch, in_chans, image_size, image_size, device=device)

    def sync() -> None:
        # CUDA kernels run asynchronously: without a sync we would time the launch, not the work
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    was_training = model.training
    model.eval()
    times = []
    try:
        with torch.inference_mode():
            for _ in range(warmup):
                model(x)
            sync()
            for _ in range(max(1, repeats)):
                t0 = time.perf_counter()
                model(x)
                sync()
                times.append(time.perf_counter() - t0)
    finally:
        model.train(was_training)
    return statistics.median(times) * 1000.0
