"""The data layer: dataset adapters, splits, the preprocessing cache and augmentation."""

# adapters register themselves on import; heavy readers (pydicom, nilearn) load lazily inside them
from tskd_tune.data.adapters import ADAPTERS, adapter_options, class_names, get_adapter
from tskd_tune.data.registry import Adapter, Record, register

__all__ = ["ADAPTERS", "Adapter", "Record", "adapter_options", "class_names", "get_adapter", "register"]
