"""The data layer: dataset adapters, splits, the preprocessing cache and augmentation."""

# adapters register themselves on import; heavy readers (pydicom, nilearn) load lazily inside them
from tskd_tune.data import busi, chaos, folder, isic2018, kidneyus, kvasir, mni152, phantom  # noqa: F401
from tskd_tune.data.registry import ADAPTERS, Adapter, Record, get_adapter, register

__all__ = ["ADAPTERS", "Adapter", "Record", "get_adapter", "register"]
