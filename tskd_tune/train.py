"""Training loops: labelled batches, and the epoch loop with resumable checkpoints.

A loop reseeds every random source at the start of each epoch from (seed, phase, epoch), so a run
resumed from the checkpoint of epoch e continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tskd_tune.cache import atomic_write
from tskd_tune.config.schema import AugmentConfig
from tskd_tune.data.transforms import train_transforms
from tskd_tune.errors import TrialFailed, TskdError

__all__ = ["TrialFailed"]  # raised here; defined with the other errors

CHECKPOINT = "state.safetensors"
"""The resumable state in a checkpoint folder."""

Report = Callable[[int, dict, Path | None], None]
"""report(epoch, metrics, checkpoint_dir): called after every reported epoch."""


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int):
    """Build modules under a fixed torch seed, so their initialisation never depends on what ran before
    (e.g. whether the teacher came from the cache or was trained in this process)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def epoch_seed(seed: int, phase: str, epoch: int) -> int:
    return int.from_bytes(f"{seed}:{phase}:{epoch}".encode(), "little") % (2**31 - 1)


class LabeledBatches:
    """Random labelled batches (with replacement, so 10 images still fill a batch of 16), augmented;
    ``label_swap`` is the class permutation a flip applies (:attr:`tskd_tune.data.lateral.FlipPlan.label_swap`)."""

    def __init__(
        self,
        images: np.ndarray,
        masks: np.ndarray,
        indices: np.ndarray,
        aug: AugmentConfig,
        label_swap: Sequence[int] | None,
    ):
        order = np.sort(indices)
        self.images = torch.from_numpy(np.asarray(images[order], dtype=np.float32))
        self.masks = torch.from_numpy(np.asarray(masks[order], dtype=np.int64))
        self.aug_cfg = aug
        self.label_swap = label_swap
        self.aug = None

    def reseed(self, seed: int) -> torch.Generator:
        self.aug = train_transforms(self.aug_cfg, seed=seed, label_swap=self.label_swap)
        return torch.Generator().manual_seed(seed)

    def sample(self, batch_size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(len(self.images), (batch_size,), generator=g)
        if not self.aug_cfg.enabled:
            return self.images[idx], self.masks[idx]
        out = [self.aug({"image": self.images[i], "label": self.masks[i][None].float()}) for i in idx]
        x = torch.stack([torch.as_tensor(o["image"]) for o in out]).float()
        y = torch.stack([torch.as_tensor(o["label"])[0] for o in out]).round().long()
        return x, y


def _same_loss(phase: str, epoch: int, step: int, loss: torch.Tensor) -> torch.Tensor:
    return loss


def _nothing() -> None:
    return None


def _plain_write(phase: str, epoch: int) -> None:
    return None


@dataclass(frozen=True)
class Hooks:
    """What an adapter hooks into the loop (the loop knows nothing of watchdogs or fault injection);
    the defaults do nothing. A search's trials get :func:`tskd_tune.faults.trial_hooks`."""

    on_loss: Callable[[str, int, int, torch.Tensor], torch.Tensor] = _same_loss
    """``on_loss(phase, epoch, step, loss)``: the loss of each step, before its finiteness check."""
    after_step: Callable[[], None] = _nothing
    """Called after every optimiser step (progress)."""
    checkpoint_writer: Callable[[str, int], Callable[[Path, bytes], None] | None] = _plain_write
    """``checkpoint_writer(phase, epoch)``: a function that writes the checkpoint file instead of the plain write."""


@dataclass(kw_only=True)
class Loop:
    """One optimisation phase: modules, optimiser settings, epochs and the per-step loss."""

    phase: str
    modules: dict[str, nn.Module]
    step: Callable[[torch.Generator], torch.Tensor]
    epochs: int
    steps_per_epoch: int
    lr: float
    weight_decay: float
    seed: int
    evaluate: Callable[[], dict] | None = None
    checkpoint_every: int = 1
    checkpoint_trainable: bool = False
    """Checkpoint only the trainable parameters and the buffers (a LoRA teacher: adapters and head, not the
    frozen encoder, which is rebuilt from its weights on resume)."""
    checkpoint_every_s: float | None = None
    """Instead of every ``checkpoint_every`` epochs: after the first epoch that ends this many seconds after
    the last checkpoint (or the start), and after the last epoch."""
    autocast: bool = False
    """Run each step's forward pass under CUDA bf16 autocast (backward and the optimiser stay outside)."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up before the cosine decay."""
    hooks: Hooks = field(default_factory=Hooks)


def lr_factor(total: int, warmup: int) -> Callable[[int], float]:
    """The learning rate at step s as a fraction of the peak: linear warm-up over ``warmup`` steps (a
    pretrained decoder's first steps from a random-prompt start are large), then cosine decay to 0."""
    warmup = min(warmup, total - 1)

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * min(s - warmup, total - warmup) / (total - warmup)))

    return factor


def run_loop(loop: Loop, out_dir: Path | None, report: Report | None, resume: dict | None = None) -> dict:
    """Train ``loop`` (from ``resume`` when given), evaluating and reporting after every epoch."""
    params = [p for m in loop.modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=loop.lr, weight_decay=loop.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_factor(loop.epochs * loop.steps_per_epoch, loop.warmup_steps)
    )
    start = 0
    if resume is not None and resume.get("phase") == loop.phase:
        for name, module in loop.modules.items():
            module.load_state_dict(resume["modules"][name], strict=not loop.checkpoint_trainable)
        opt.load_state_dict(resume["optimizer"])
        sched.load_state_dict(resume["scheduler"])
        start = resume["epoch"]
    metrics: dict = {}
    last_ckpt = time.perf_counter()
    for epoch in range(start + 1, loop.epochs + 1):
        t0 = time.perf_counter()
        s = epoch_seed(loop.seed, loop.phase, epoch)
        seed_all(s)
        g = torch.Generator().manual_seed(s)
        for m in loop.modules.values():
            m.train()
        losses, lrs = [], []
        for i in range(loop.steps_per_epoch):
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=loop.autocast):
                loss = loop.hooks.on_loss(loop.phase, epoch, i, loop.step(g))
            if not torch.isfinite(loss):
                # a NaN would poison the weights and reach the searcher as a score: the trial fails instead
                raise TrialFailed(
                    f"{loop.phase}: loss became {loss.item()} at epoch {epoch}, step {i + 1}; "
                    "lower the learning rate"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
            losses.append(loss.item())
            loop.hooks.after_step()
        # the rate the epoch's steps used (their mean), not the scheduler's next one: after the last step
        # of the cosine that is 0, which reads as a bug
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)), "lr": float(np.mean(lrs))}
        if loop.evaluate is not None:
            metrics |= loop.evaluate()
        metrics["epoch_s"] = time.perf_counter() - t0
        ckpt = None
        due = (
            time.perf_counter() - last_ckpt >= loop.checkpoint_every_s
            if loop.checkpoint_every_s is not None
            else epoch % loop.checkpoint_every == 0
        )
        if out_dir is not None and (due or epoch == loop.epochs):
            ckpt = save_checkpoint(out_dir / "checkpoint", loop, opt, sched, epoch)
            last_ckpt = time.perf_counter()
        if report is not None:
            report(epoch, metrics, ckpt)
    return metrics


def save_checkpoint(folder: Path, loop: Loop, opt, sched, epoch: int) -> Path:
    """Write the resumable state atomically: a reader sees the previous checkpoint or this one, never half.

    The state is a safetensors file (no pickle): the tensors, and the nested structure around them
    (optimiser and scheduler settings, epoch) as JSON in the file's metadata. A full disk or an
    unwritable folder raises a one-line StorageError and keeps the previous checkpoint.
    """
    from safetensors.torch import save

    state = {
        "phase": loop.phase,
        "epoch": epoch,
        "modules": {k: _module_state(m, loop.checkpoint_trainable) for k, m in loop.modules.items()},
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
    }
    tensors: dict[str, torch.Tensor] = {}
    skeleton = json.dumps(_encode(state, tensors))
    # serialised in memory, then written by Python: a library writing straight to the file turns a
    # full disk into an opaque error
    data = save(tensors, metadata={"tskd.state": skeleton})
    atomic_write(folder / CHECKPOINT, data, loop.hooks.checkpoint_writer(loop.phase, epoch))
    return folder


def _module_state(m: nn.Module, trainable_only: bool) -> dict[str, torch.Tensor]:
    state = m.state_dict()
    if not trainable_only:
        return state
    keep = {n for n, p in m.named_parameters() if p.requires_grad} | {n for n, _ in m.named_buffers()}
    return {k: v for k, v in state.items() if k in keep}


def load_checkpoint(folder: Path) -> dict | None:
    """The state saved by :func:`save_checkpoint`, or None when there is none."""
    from safetensors import safe_open

    path = Path(folder) / CHECKPOINT
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            skeleton = json.loads((f.metadata() or {})["tskd.state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not a dict
        return _decode(skeleton, tensors)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint must not be mistaken for a good one
        raise TskdError(f"{path}: cannot load checkpoint ({exc.__class__.__name__})") from None


def _encode(obj, tensors: dict[str, torch.Tensor]):
    """JSON skeleton of a nested state; tensors go to ``tensors`` (copied: safetensors refuses shared memory)."""
    if isinstance(obj, torch.Tensor):
        key = str(len(tensors))
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):  # keys may be ints (optimiser state is keyed by parameter index)
        return {"__dict__": [[_encode(k, tensors), _encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"checkpoint: cannot store a {type(obj).__name__}")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
    return obj
