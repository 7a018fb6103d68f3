"""The ``ddpm`` generator: its UNet2DModel factory, training, loading a local pipeline, and sampling.

- generator ``ddpm``: a small diffusers ``UNet2DModel`` trained with ``DDPMScheduler`` on every training
  image of the dataset (labelled and unlabelled; never val/test) at ``synthetic.image_size``, with an
  EMA of its weights, bf16 autocast where the device runs bf16 natively (CUDA; CPUs with AMX or
  AVX512-BF16); it is saved as a ``DDPMPipeline`` folder in the cache, so a
  trained generator can also be reused as ``pretrained``.
- generator ``pretrained``: a local diffusers pipeline folder holding an unconditional ``UNet2DModel``
  and its scheduler (e.g. ``DDPMPipeline.save_pretrained``); loaded with ``local_files_only``.

Either is sampled with DDIM or DPM-Solver++ into images at the data's resolution and channels.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tskd_tune.config import SyntheticConfig
from tskd_tune.errors import TskdError
from tskd_tune.runtime import autocast_bf16, native_bf16
from tskd_tune.train import seeded

# a safety belt: nothing here may reach the Hugging Face Hub (pipelines load with local_files_only too)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

Progress = Callable[[str, int, int], None]
"""progress(phase, done, total); phases: ``train`` (generator steps) and ``sample`` (pool images)."""

VERSION = 1
"""Bumped when training or sampling changes, so older cache entries are not reused."""
TRAIN_TIMESTEPS = 1000
BETA_SCHEDULE = "squaredcos_cap_v2"  # the cosine schedule keeps small images from being noised too fast
# v-prediction: with epsilon-prediction the first sampling steps (almost pure noise) estimate the image
# badly, and a briefly trained model's samples drift in overall brightness
PREDICTION = "v_prediction"
SAMPLE_BATCH = 64


# ------------------------------------------------------------------------------------ training
def uses_bf16(gc: SyntheticConfig, device: torch.device) -> bool:
    """Whether the generator trains and samples under bf16 autocast: asked for and native on ``device``."""
    return gc.mixed_precision and native_bf16(device)


def make_unet(gc: SyntheticConfig, channels: int, size: int):
    """The ``ddpm`` generator's UNet2DModel: ``gc.channels`` per level, attention at the lowest if asked."""
    from diffusers import UNet2DModel

    levels = len(gc.channels)
    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if gc.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if all(c % g == 0 for c in gc.channels))
    return UNet2DModel(
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(gc.channels),
        layers_per_block=1,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        norm_num_groups=groups,
        attention_head_dim=min(8, min(gc.channels)),
    )


def train_generator(
    images: torch.Tensor,
    gc: SyntheticConfig,
    *,
    seed: int,
    device: torch.device,
    progress: Progress | None = None,
):
    """Train a UNet2DModel on ``images`` (N, C, S, S) in [0, 1] with the DDPM noise-prediction loss.

    Batches, flips, noise and timesteps come from one CPU generator seeded with ``seed``, so a run is
    reproducible; the returned UNet holds the EMA weights (when ``gc.ema_decay`` > 0).
    """
    from diffusers import DDPMScheduler

    n, c, size = images.shape[0], images.shape[1], images.shape[-1]
    with seeded(seed):
        unet = make_unet(gc, c, size)
    unet.to(device).train()
    scheduler = DDPMScheduler(
        num_train_timesteps=TRAIN_TIMESTEPS, beta_schedule=BETA_SCHEDULE, prediction_type=PREDICTION
    )
    data = (images.float() * 2 - 1).to(device)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=gc.lr, weight_decay=0.0)
    warmup = max(1, min(200, gc.train_steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / warmup)
            * 0.5
            * (1 + math.cos(math.pi * min(s, gc.train_steps) / gc.train_steps))
        ),
    )
    ema = [p.detach().clone().float() for p in params] if gc.ema_decay > 0 else None
    amp = uses_bf16(gc, device)
    g = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    t0 = time.perf_counter()
    for step in range(gc.train_steps):
        idx = torch.randint(n, (gc.batch_size,), generator=g)
        flip = torch.rand(gc.batch_size, generator=g) < 0.5
        x = data[idx.to(device)]
        x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
        noise = torch.randn(x.shape, generator=g).to(device)
        t = torch.randint(TRAIN_TIMESTEPS, (gc.batch_size,), generator=g).to(device)
        with autocast_bf16(device, amp):
            pred = unet(scheduler.add_noise(x, noise, t), t).sample
        target = noise if PREDICTION == "epsilon" else scheduler.get_velocity(x, noise, t)
        loss = F.mse_loss(pred.float(), target)
        if not torch.isfinite(loss):
            raise TskdError(
                f"synthetic: generator loss became {loss.item()} at step {step + 1}; lower synthetic.lr"
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if ema is not None:
            # the usual warm-up (as in diffusers' EMAModel): early weights are not averaged in for long
            decay = min(gc.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for e, p in zip(ema, params, strict=True):
                    e.lerp_(p.detach().float(), 1 - decay)
        losses.append(loss.item())
        if progress is not None:
            progress("train", step + 1, gc.train_steps)
    if ema is not None:
        with torch.no_grad():
            for e, p in zip(ema, params, strict=True):
                p.copy_(e)
    unet.eval()
    k = max(1, len(losses) // 10)
    stats = {
        "steps": gc.train_steps,
        "images": n,
        "image_size": size,
        "params": sum(p.numel() for p in params),
        "loss_first": float(np.mean(losses[:k])),
        "loss_last": float(np.mean(losses[-k:])),
        "train_s": time.perf_counter() - t0,
        "device": device.type,
        "mixed_precision": amp,
        "precision": "bf16" if pred.dtype == torch.bfloat16 else "fp32",  # what the UNet ran in
    }
    return unet, scheduler, stats


# ------------------------------------------------------------------------------------ sampling
def load_pipeline(path: Path, where: str = "synthetic.pretrained_path"):
    """(UNet2DModel, scheduler config) of a local diffusers pipeline folder; never downloads."""
    import diffusers
    from diffusers import DiffusionPipeline, UNet2DModel

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    path = Path(path)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loading problem is the user's folder, reported in one line
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise TskdError(
            f"{where}: {path}: cannot load the diffusers pipeline ({exc.__class__.__name__}: {first})"
        ) from None
    unet, scheduler = getattr(pipe, "unet", None), getattr(pipe, "scheduler", None)
    if not isinstance(unet, UNet2DModel) or scheduler is None:
        raise TskdError(
            f"{where}: {path}: {type(pipe).__name__} is not an unconditional UNet2DModel pipeline (such as DDPMPipeline)"
        )
    return unet, dict(scheduler.config)


def sample_images(
    unet,
    scheduler_config: dict,
    out: np.ndarray,
    gc: SyntheticConfig,
    *,
    seed: int,
    device: torch.device,
    progress: Progress | None = None,
) -> None:
    """Fill ``out`` (N, C, S, S) with samples in [0, 1], converted to C channels and resized to S."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    kind = DDIMScheduler if gc.sampler == "ddim" else DPMSolverMultistepScheduler
    # trailing spacing starts from the last training timestep: better samples at few steps
    scheduler = kind.from_config(scheduler_config, timestep_spacing="trailing")
    unet = unet.to(device).eval()
    size = unet_size(unet)
    cin = unet.config.in_channels
    n, c, s = out.shape[0], out.shape[1], out.shape[-1]
    amp = uses_bf16(gc, device)
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        for start in range(0, n, SAMPLE_BATCH):
            b = min(SAMPLE_BATCH, n - start)
            x = torch.randn((b, cin, size, size), generator=g).to(device) * scheduler.init_noise_sigma
            scheduler.set_timesteps(gc.sample_steps, device=device)
            for t in scheduler.timesteps:
                with autocast_bf16(device, amp):
                    pred = unet(scheduler.scale_model_input(x, t), t).sample
                x = scheduler.step(pred.float(), t, x).prev_sample
            img = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
            img = _convert_channels(img, c)
            if size != s:
                img = F.interpolate(
                    img, size=(s, s), mode="bilinear", antialias=s < size, align_corners=False
                )
            out[start : start + b] = img.clamp(0, 1).numpy().astype(np.float16)
            if progress is not None:
                progress("sample", start + b, n)


def unet_size(unet) -> int:
    """The side length a UNet2DModel samples at (its ``sample_size``, an int or a pair)."""
    size = unet.config.sample_size
    return size if isinstance(size, int) else size[0]


def _convert_channels(x: torch.Tensor, c: int) -> torch.Tensor:
    if x.shape[1] == c:
        return x
    if c == 1 and x.shape[1] == 3:
        return (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if c == 3 and x.shape[1] == 1:
        return x.repeat(1, 3, 1, 1)
    raise TskdError(f"synthetic: the generator makes {x.shape[1]}-channel images; data.channels is {c}")
