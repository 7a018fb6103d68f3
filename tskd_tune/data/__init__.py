"""The data layer: dataset adapters, splits, the preprocessing cache and augmentation."""

from tskd_tune.data import phantom  # noqa: F401  (adapters register themselves on import)
from tskd_tune.data.registry import ADAPTERS, Adapter, Record, get_adapter, register

__all__ = ["ADAPTERS", "Adapter", "Record", "get_adapter", "register"]
