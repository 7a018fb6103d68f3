"""The config tree: one pydantic model per YAML section, and the constants that describe it.

Field docstrings are the fields' descriptions. Beside :mod:`tskd_tune.space` (whose distributions are a
field type), :mod:`tskd_tune.secrets` (where passwords go) and :mod:`tskd_tune.kinds` (the names of the
students, generators and methods, which the Literal types below are built from) this module imports nothing
of the package, so the layers below validation (data, models, training) take their config types from here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tskd_tune.kinds import GENERATOR_KINDS, METHOD_NAMES, STUDENT_KINDS
from tskd_tune.secrets import WHERE_PASSWORDS_GO
from tskd_tune.space import Distribution


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, field docstrings are descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)


# --------------------------------------------------------------------------------------------- data
class AugmentConfig(Section):
    enabled: bool = True
    """Apply random augmentation to labelled training images."""
    flip: bool = True
    """Random horizontal flips; left/right classes swap with the image (see data.lateral_pairs), and flips are
    switched off where a class looks lateral but has no pair."""
    rotate_deg: float = Field(10.0, ge=0, le=180)
    """Maximum random rotation in degrees."""
    scale: float = Field(0.1, ge=0, lt=1)
    """Maximum random zoom as a fraction (0.1 = 90%..110%)."""
    intensity: float = Field(0.1, ge=0, le=1)
    """Maximum random intensity shift and contrast change."""
    noise_std: float = Field(0.0, ge=0)
    """Standard deviation of additive Gaussian noise (0 disables)."""
    prob: float = Field(0.5, ge=0, le=1)
    """Probability of each random transform."""


class DataConfig(Section):
    dataset: str = "phantom"
    """Dataset adapter: phantom, mni152, folder, kidneyus, chaos, busi, isic2018, kvasir."""
    root: Path | None = None
    """Dataset folder in the dataset's published layout (relative paths are from the working directory)."""
    image_size: int = Field(64, ge=16, le=2048)
    """Side length in pixels that every image and mask is resized to."""
    channels: Literal[1, 3] = 1
    """Image channels after preprocessing: 1 (grey) or 3 (RGB)."""
    resize: Literal["pad", "stretch"] = "pad"
    """`pad` keeps the aspect ratio by zero-padding to a square before resizing; `stretch` does not."""
    labeled: int = Field(10, ge=1)
    """Number of labelled training images; the other training images form the unlabelled pool."""
    unlabeled: int | None = Field(None, ge=0)
    """Cap on the unlabelled pool (None: every remaining training image)."""
    classes: list[str] | None = None
    """Class names, background first (default: the adapter's classes)."""
    lateral_pairs: list[tuple[str, str]] = Field(default_factory=list)
    """Pairs of class names that swap when an image is flipped horizontally, e.g. [[left_lung, right_lung]];
    besides these, names with left/right (or l_/r_, _l/_r) are paired by themselves."""
    seed: int = 0
    """Seed of the train/val/test split and of the labelled subset."""
    val_fraction: float = Field(0.15, gt=0, lt=1)
    """Fraction of images (by patient/volume where the dataset has them) held out for validation."""
    test_fraction: float = Field(0.15, gt=0, lt=1)
    """Fraction of images (by patient/volume) held out for the final test."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Adapter-specific options (see `tskd-tune validate`); checked against the adapter's own schema."""
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    """Training-time augmentation (MONAI transforms)."""


# ------------------------------------------------------------------------------------------ models
class LoraConfig(Section):
    rank: int = Field(4, ge=1, le=256)
    """LoRA rank r."""
    alpha: float = Field(8.0, gt=0)
    """LoRA scaling alpha (the update is scaled by alpha / rank)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout on the LoRA branch."""
    target_modules: list[str] = Field(default_factory=lambda: ["qkv"], min_length=1)
    """Names of the linear layers that get LoRA (default: the attention qkv projections)."""
    last_blocks: int | None = Field(None, ge=1)
    """LoRA only in the last k encoder blocks (LiteMedSAM: counted across its stages); the blocks before
    them run once per image and are cached. None: every block (nothing cached)."""


class TeacherConfig(Section):
    model: str = "litemedsam"
    """Foundation model: `litemedsam` (pretrained weights ship with it) or a timm ViT name (vit_*,
    samvit_*, *dinov2*) with local weights in teacher.checkpoint."""
    checkpoint: Path | None = None
    """Local weights (safetensors, or .pth loaded with weights_only=True); never downloaded."""
    random_init: bool = False
    """Ignore the pretrained weights and initialise the encoder randomly: an ablation, not a teacher."""
    adapt: Literal["head", "lora"] = "head"
    """What fine-tuning trains on the frozen encoder: `head` (only the segmentation head, on cached
    encoder features) or `lora` (LoRA in teacher.lora.last_blocks blocks, plus the head)."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the model factory (e.g. depth, embed_dim for tiny test models)."""
    head: Literal["conv", "sam_decoder"] = "conv"
    """Segmentation head: `conv` (a conv head trained from scratch on the encoder's features, see
    teacher.decoder) or `sam_decoder` (LiteMedSAM's pretrained prompt encoder and mask decoder, one mask token
    per class, no user prompt; fine-tuned like a head)."""
    prompt: Literal["none", "box"] = "none"
    """head: sam_decoder: the prompt it is given, the same for every image: `none` (the prompt encoder's
    default embeddings, as SAMed) or `box` (a box around the whole image, as MedSAM was trained with)."""
    decoder: Literal["progressive", "unetr"] = "progressive"
    """Conv head (head: conv) on the encoder tokens."""
    decoder_channels: int = Field(64, ge=4)
    """Width of the decoder head."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    """Low-rank adaptation of the frozen encoder (teacher.adapt: lora)."""
    lr: float = Field(1e-3, gt=0)
    """Learning rate of LoRA and decoder parameters."""
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay."""
    epochs: int = Field(20, ge=1)
    """Fine-tuning epochs over the labelled images (and their augmented views)."""
    warmup_epochs: int = Field(0, ge=0)
    """Epochs of linear learning-rate warm-up before the cosine decay (0: none)."""
    augment_views: int = Field(0, ge=0, le=64)
    """With a cached prefix (no pixel augmentation there): augmented copies (data.augment) of each labelled
    image whose features are cached too and train the teacher beside the originals. 0: none."""
    batch_size: int = Field(8, ge=1)
    """Fine-tuning batch size."""
    ce_weight: float = Field(0.2, ge=0)
    """Weight of cross-entropy in the supervised loss (SAMed: 0.2)."""
    dice_weight: float = Field(0.8, ge=0)
    """Weight of Dice in the supervised loss (SAMed: 0.8)."""

    def head_problem(self) -> str | None:
        """Why ``head`` cannot go with ``model`` (the one text of the config check and the teacher factory)."""
        if self.head == "sam_decoder" and self.model != "litemedsam":
            # the pretrained mask decoder ships with LiteMedSAM alone; a timm SAM checkpoint has only the encoder
            return (
                "teacher.head: sam_decoder is LiteMedSAM's pretrained mask decoder (teacher.model: litemedsam), "
                f"got model {self.model}; use head: conv"
            )
        return None


# the names the kinds' fields accept are those declared in tskd_tune.kinds (an unknown one is a literal_error:
# one line naming the field, like any other); Method is also what a search's reference trials may name
StudentName = Literal[tuple(STUDENT_KINDS)]
GeneratorName = Literal[tuple(GENERATOR_KINDS)]
Method = Literal[METHOD_NAMES]


class StudentConfig(Section):
    model: StudentName = "unet"
    """Student architecture from the registry: unet, timm_unet, vit_tiny."""
    channels: list[int] = Field(default_factory=lambda: [16, 32, 64, 128], min_length=2)
    """Channels per resolution level (unet; decoder widths and encoder levels of timm_unet)."""
    encoder: str = "resnet18"
    """timm encoder of `timm_unet` (randomly initialised)."""
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for the student factory."""
    lr: float = Field(1e-3, gt=0)
    """Student learning rate (AdamW)."""
    weight_decay: float = Field(1e-4, ge=0)
    """Student AdamW weight decay."""
    epochs: int = Field(30, ge=1)
    """Student training epochs (each one is reported to the search scheduler)."""
    batch_size: int = Field(8, ge=1)
    """Student batch size."""
    steps_per_epoch: int | None = Field(None, ge=1)
    """Optimisation steps per epoch (default: one pass over the transfer set, for every method alike)."""
    checkpoint_every: int = Field(1, ge=1)
    """Save a resumable checkpoint every this many epochs (and after the last)."""
    ce_weight: float = Field(0.2, ge=0)
    """Weight of cross-entropy in the student's supervised loss on labelled images."""
    dice_weight: float = Field(0.8, ge=0)
    """Weight of Dice in the student's supervised loss on labelled images."""


class SyntheticConfig(Section):
    generator: GeneratorName = "none"
    """Source of synthetic transfer images: none, ddpm (a small DDPM trained on the training images) or
    pretrained (a local pipeline, synthetic.pretrained_path)."""
    ratio: float = Field(0.0, ge=0)
    """Synthetic images per real transfer image, min(pool_size, round(ratio * real)) drawn from the pool (0: none)."""
    pool_size: int = Field(256, ge=0)
    """Number of synthetic images generated once and cached."""
    pretrained_path: Path | None = None
    """Local diffusers pipeline folder (unconditional UNet2DModel + scheduler) for generator `pretrained`."""
    train_steps: int = Field(2000, ge=1)
    """Training steps of the `ddpm` generator."""
    sample_steps: int = Field(25, ge=1)
    """Denoising steps of the sampler per synthetic image."""
    sampler: Literal["ddim", "dpm"] = "ddim"
    """Fast sampler: DDIM or DPM-Solver++ (multistep)."""
    image_size: int | None = Field(None, ge=8, le=2048)
    """Side length the `ddpm` generator trains and samples at (None: data.image_size); samples are resized to data.image_size."""
    channels: list[int] = Field(default_factory=lambda: [32, 64, 64], min_length=2)
    """Channels per resolution level of the `ddpm` UNet2DModel (block_out_channels)."""
    attention: bool = False
    """Self-attention at the lowest resolution of the `ddpm` UNet (slower; helps the layout of large images)."""
    batch_size: int = Field(16, ge=1)
    """Training batch size of the `ddpm` generator."""
    lr: float = Field(1e-3, gt=0)
    """Learning rate of the `ddpm` generator (AdamW, warm-up then cosine decay)."""
    ema_decay: float = Field(0.999, ge=0, lt=1)
    """Decay of the moving average of generator weights that is sampled (0: sample the raw weights)."""
    snap_background: bool = True
    """Where the training images have a background of one exact value (their minimum on at least 5% of the
    pixels: skull-stripped MRI, the outside of an ultrasound fan), set the pool's darkest pixels, as large a
    share, to it before the pool is gated. A diffusion model's background comes out as a faint haze, which
    the teacher's encoder reads as another kind of image: on mni152 it put 99% of a well-trained
    generator's images outside the real images' feature manifold, 9% once snapped (docs/BENCHMARKS.md,
    synthetic pools)."""
    mixed_precision: bool = True
    """bf16 autocast for generator training and sampling where the device runs bf16 natively: CUDA, and CPUs
    with AMX or AVX512-BF16 (about 1.7x faster there); other CPUs run float32. The effective precision keys
    the generator and its pool."""
    filter: Literal["none", "confidence", "manifold", "both"] = "none"
    """Per-image filter of the drawn synthetic images: keep those on which the fine-tuned teacher is confident
    (mean max-softmax >= synthetic.min_confidence; ts_kd, the method with teacher predictions), those inside
    the real images' manifold in the teacher encoder's feature space (the semantic gate's k-NN balls; every
    method), or both. The trial records how many were drawn and kept."""
    min_confidence: float = Field(0.9, ge=0, le=1)
    """The confidence filter's threshold: the teacher's mean max-softmax over an image's pixels."""


class DistillConfig(Section):
    method: Method = "ts_kd"
    """ts_kd (task-specific KD), ta_kd (task-agnostic KD), mae (MAE pretraining of a ViT student), scratch
    (labels only) or teacher (evaluate the teacher)."""
    temperature: float = Field(4.0, gt=0)
    """KD softmax temperature T (the KL term is scaled by T^2)."""
    kd_weight: float = Field(1.0, ge=0)
    """Weight of the KD term on the transfer set."""
    sup_weight: float = Field(1.0, ge=0)
    """Weight of the supervised Dice+CE term on labelled images."""
    feature_weight: float = Field(0.0, ge=0)
    """Weight of the feature-matching term (through a learned projection); 0 disables it."""
    pretrain_epochs: int = Field(10, ge=1)
    """ta_kd and mae: epochs of pretraining on the transfer set (ta_kd: distilling the frozen teacher's
    features; mae: masked-image modelling) before fine-tuning on the labels."""
    mask_ratio: float = Field(0.75, gt=0, lt=1)
    """mae: fraction of each image's patches masked in pretraining; the encoder sees the rest (MAE: 0.75)."""


# ------------------------------------------------------------------------------------ search & run
class SearchConfig(Section):
    metric: str = "val_dice"
    """Metric the search optimises."""
    mode: Literal["max", "min"] = "max"
    """Whether the metric is maximised or minimised."""
    num_samples: int = Field(16, ge=1)
    """Number of trials."""
    max_concurrent: int = Field(2, ge=1)
    """Trials running at once."""
    algorithm: Literal["tpe", "random", "cmaes", "gp"] = "tpe"
    """Optuna sampler."""
    startup_trials: int | None = Field(None, ge=1)
    """Random proposals before the sampler (tpe, cmaes, gp) starts modelling the finished trials (Optuna's
    n_startup_trials; unset: Optuna's defaults, 10 for tpe and gp, 1 for cmaes). Keep it below
    search.num_samples, or the whole search is a random one."""
    scheduler: Literal["asha", "hyperband", "fifo"] = "asha"
    """Trial scheduler: ASHA early stopping, asynchronous Hyperband (ASHA over every bracket from the grace
    period up: some trials are judged later), or FIFO (run every trial to the end)."""
    grace_period: int | None = Field(None, ge=1)
    """Epochs every trial runs before ASHA or Hyperband may stop it. None: from the data: the first
    search.pilot_trials trials to finish run to the end, and the grace period is the first epoch from which
    their scores rank them like their final ones (rank correlation >= 0.9 at every later epoch); if none
    does, no trial is stopped."""
    pilot_trials: int = Field(5, ge=4)
    """Trials that run to the end before a grace period is taken from their curves (grace_period unset)."""
    reduction_factor: float = Field(3.0, gt=1)
    """ASHA / Hyperband reduction factor."""
    seed: int = 0
    """Seed of the sampler."""
    space: dict[str, Distribution] = Field(default_factory=dict)
    """Search space: dotted config path -> distribution."""
    points_to_evaluate: list[dict[str, Any]] = Field(default_factory=list)
    """Known-good configs (dotted path -> value) tried first."""
    study_storage: str | None = None
    """Optuna storage that outlives the driver: an RDB URL (no password) or a journal file path; None: in memory."""
    objectives: dict[str, Literal["max", "min"]] = Field(default_factory=dict)
    """Multi-objective search (metric -> max/min, e.g. val_dice: max, student_latency_ms: min): reports the
    Pareto front; needs scheduler fifo. Overrides metric/mode; the first objective sorts the leaderboard."""
    baselines: list[Method] = Field(default_factory=lambda: ["scratch", "teacher"])
    """Reference trials run once beside the search (outside the Optuna study), each a method on the search's
    config: by default the `scratch` student and the fine-tuned `teacher` (also e.g. `ta_kd`, `mae`); every
    trial's Dice gain over scratch is shown. []: none."""
    strategy: Literal["joint", "staged"] = "joint"
    """`joint`: one study over the whole space. `staged`: first the teacher.* knobs alone (each trial a
    teacher, judged on its val Dice), then every other knob with the best teachers as one more choice."""
    teacher_trials: int = Field(8, ge=1)
    """Staged search: trials of the teacher stage."""
    top_teachers: int = Field(2, ge=1)
    """Staged search: how many of the best teachers the student stage chooses from."""
    time_budget_s: float | None = Field(None, gt=0)
    """Wall-clock budget of the search (each stage of a staged one): once spent, no new trial is proposed
    and the running trials are stopped; the leaderboard, best.yaml and the best finished trial's test
    score are still written. None: no budget."""
    trial_timeout_s: float | None = Field(None, gt=0)
    """Stop a trial that makes no progress (no training step, no report) for this many seconds (None: never)."""
    max_failures: int = Field(2, ge=0)
    """How many times Ray retries a trial whose worker died (a lost node, a killed or out-of-memory process),
    from its last checkpoint, on any node. A trial that raised is not retried (the same config would fail the
    same way). Raise it on preemptible (spot) workers; `tskd-tune resume` finishes a trial that ran out."""

    def objective_items(self) -> list[tuple[str, str]]:
        """(metric, mode) pairs the search optimises: the objectives, or the single metric."""
        return list(self.objectives.items()) if self.objectives else [(self.metric, self.mode)]


class TrackingConfig(Section):
    uri: str = "sqlite:///runs/mlflow.db"
    """MLflow tracking URI (without a password: that comes from the environment)."""
    experiment: str = "tskd-tune"
    """MLflow experiment name."""
    system_metrics: bool = False
    """Log CPU, memory, disk, network and (with pynvml and an NVIDIA GPU) GPU use on each trial's run (off by
    default: MLflow's UI lists them before the scores in a run's metrics and picks one to compare runs on)."""
    system_metrics_interval_s: float = Field(10.0, ge=1)
    """Seconds between system-metric samples."""

    @field_validator("uri")
    @classmethod
    def _no_password(cls, v: str) -> str:
        if urlsplit(v).password:
            # the message must not repeat the URI: errors are printed and configs are logged
            raise ValueError(
                f"holds a password; put it in the environment instead ({WHERE_PASSWORDS_GO}): "
                "the config is logged with every run"
            )
        return v


class ResourcesConfig(Section):
    cpu: float = Field(1.0, gt=0)
    """CPUs per trial."""
    gpu: float = Field(0.0, ge=0)
    """GPUs per trial (fractions share a GPU)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where a trial trains: auto picks CUDA when present."""
    threads: int | None = Field(None, ge=1)
    """CPU threads per trial (default: resources.cpu, rounded up)."""
    mixed_precision: bool = False
    """bf16 autocast for teacher fine-tuning, teacher outputs and student training on CUDA (CPU: float32)."""
    keep_freed_memory: bool = True
    """On Linux (glibc), keep large freed CPU tensors' memory for reuse instead of unmapping it each step: a
    LoRA teacher's step on CPU is about 1.9x faster, its peak memory about 1.8x higher (docs/BENCHMARKS.md)."""


class CacheConfig(Section):
    dir: Path = Path("runs/cache")
    """Content-addressed cache: preprocessed data, teachers, teacher outputs, generators, synthetic pools."""
    enabled: bool = True
    """Reuse cached entries (False: recompute everything, as with --no-cache)."""
    max_gb: float | None = Field(None, gt=0)
    """A search keeps the cache at most this size: at its start and after each trial it removes the least
    recently used entries that none of its trials has used (None: the cache only grows; `tskd-tune cache
    prune` trims it by hand)."""


class Config(Section):
    """The whole configuration of a search (and of each of its trials)."""

    name: str | None = None
    """Search name (default: the YAML file's stem)."""
    seed: int = 0
    """Seed of model initialisation, augmentation and batch order (data.seed fixes the split)."""
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)
    student: StudentConfig = Field(default_factory=StudentConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    cache: CacheConfig = Field(default_factory=CacheConfig)


# metrics every finished trial reports (per epoch or at its end) that a search may optimise
OBJECTIVE_METRICS = ("val_dice", "val_hd95", "student_latency_ms", "student_params")
END_OF_TRIAL_METRICS = ("student_latency_ms", "student_params")

# Every field that names a file or folder, as a dotted path. Relative values are read against the working
# directory, which a Ray trial or a cluster job does not share, so they are resolved (see `absolutize`)
# before a config leaves the driver. search.study_storage is a path only when it is a journal file (no
# "://"); an RDB URL is left as it is. A test checks that every Path-typed field is listed here.
PATH_FIELDS = (
    "data.root",
    "teacher.checkpoint",
    "synthetic.pretrained_path",
    "cache.dir",
    "search.study_storage",
)
