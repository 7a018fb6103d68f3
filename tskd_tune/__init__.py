"""tskd-tune: hyperparameter search for task-specific knowledge distillation (TS-KD)."""

__version__ = "0.1.0"
