"""Synthetic transfer images: a diffusion generator (trained here or loaded from disk) and a cached pool.

``pool`` keys and builds the pool (the orchestration a trial or a search calls), ``generator`` trains,
loads and samples the diffusion model, ``gate`` checks the pool against the real training images. The
`tskd-tune synth` command's presentation lives in ``tskd_tune.cli_synth``.
"""

from tskd_tune.synth.gate import (
    COPY_FACTOR,
    GATE_FIGURES,
    GATE_MAX_COPY_FRACTION,
    GATE_MAX_HIST_DISTANCE,
    GATE_MAX_IMAGES,
    GATE_MAX_MEAN_DISTANCE,
    GATE_MAX_NN_RATIO,
    GATE_MAX_STD_DISTANCE,
    GATE_ROUGHNESS_RANGE,
    NN_SIZE,
    quality_gate,
)
from tskd_tune.synth.generator import (
    BETA_SCHEDULE,
    PREDICTION,
    SAMPLE_BATCH,
    TRAIN_TIMESTEPS,
    VERSION,
    Progress,
    load_pipeline,
    make_unet,
    sample_images,
    train_generator,
)
from tskd_tune.synth.pool import (
    Pool,
    build_pool,
    draws_synthetic,
    generator_key,
    generator_size,
    pipeline_fingerprint,
    pool_for_search,
    pool_key,
    pool_semantics,
    training_indices,
)

__all__ = [
    "BETA_SCHEDULE",
    "COPY_FACTOR",
    "GATE_FIGURES",
    "GATE_MAX_COPY_FRACTION",
    "GATE_MAX_HIST_DISTANCE",
    "GATE_MAX_IMAGES",
    "GATE_MAX_MEAN_DISTANCE",
    "GATE_MAX_NN_RATIO",
    "GATE_MAX_STD_DISTANCE",
    "GATE_ROUGHNESS_RANGE",
    "NN_SIZE",
    "PREDICTION",
    "SAMPLE_BATCH",
    "TRAIN_TIMESTEPS",
    "VERSION",
    "Pool",
    "Progress",
    "build_pool",
    "generator_key",
    "generator_size",
    "load_pipeline",
    "make_unet",
    "pipeline_fingerprint",
    "pool_for_search",
    "pool_key",
    "pool_semantics",
    "quality_gate",
    "sample_images",
    "train_generator",
    "training_indices",
    "draws_synthetic",
]
