"""Checks of a config against what its methods need, run before any data is prepared or trial started."""

from __future__ import annotations

from tskd_tune.config import Config
from tskd_tune.methods.registry import METHODS, get_method
from tskd_tune.models.teacher import LITEMEDSAM, adapted, build_teacher, is_pretrained, weights_identity
from tskd_tune.synth.pool import draws_synthetic


def search_methods(cfg: Config) -> set[str]:
    """The methods a trial of ``cfg`` (or of its search space) can run."""
    space = cfg.search.space
    return (
        set(space["distill.method"].boundary_values()) if "distill.method" in space else {cfg.distill.method}
    )


def uses_pool(cfg: Config) -> bool:
    """Whether a trial of ``cfg`` draws synthetic images: its method distils on the transfer set and the
    synthetic settings give images (a generator, a pool, ratio > 0)."""
    return get_method(cfg.distill.method).transfer and draws_synthetic(cfg)


def search_uses_transfer(cfg: Config) -> bool:
    """Whether any trial of the search (of its space, or a reference trial) trains on a transfer set (so may
    draw synthetic images)."""
    return any(METHODS[m].transfer for m in search_methods(cfg) | set(cfg.search.baselines))


def search_distils(cfg: Config) -> bool:
    """Whether any trial of the search (or of its space) distils a teacher on the transfer set (mae trains
    on it with no teacher)."""
    return any(METHODS[m].transfer and METHODS[m].teacher for m in search_methods(cfg))


def check_teacher(cfg: Config) -> None:
    """Build the configured teacher once, LoRA included, and drop it: an unknown model, a missing or
    mismatched checkpoint, bad model_kwargs or LoRA targets fail in one line before data preparation or
    any trial starts (in a search, each trial would otherwise fail on it, after retries)."""
    spec = get_method(cfg.distill.method)
    if spec.teacher is None:
        return
    from tskd_tune.data.adapters import class_names

    model = build_teacher(
        cfg.teacher,
        in_chans=cfg.data.channels,
        num_classes=len(class_names(cfg.data)),
        image_size=cfg.data.image_size,
        seed=cfg.seed,
    )
    if spec.teacher == "fine_tuned":
        adapted(model, cfg.teacher)
    weights_identity(cfg.teacher, cfg.seed)


def premise_warning(cfg: Config) -> str | None:
    """One line when a distillation method would distil a teacher without pretrained weights."""
    if not search_distils(cfg) or is_pretrained(cfg.teacher):
        return None
    why = (
        "teacher.random_init is set"
        if cfg.teacher.random_init
        else f"{cfg.teacher.model} has no teacher.checkpoint"
    )
    return (
        f"warning: the teacher has no pretrained weights ({why}), so the method's premise is not met: "
        f"this distils a random encoder (an ablation); use teacher.model: {LITEMEDSAM} or pass teacher.checkpoint"
    )
