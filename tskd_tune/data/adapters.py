"""Every dataset adapter, registered: import from here to look adapters up by name.

Importing this module imports each adapter module, and each one registers itself with
:mod:`tskd_tune.data.registry`; the look-ups re-exported here therefore see every adapter. A new
adapter module is added to the import below.
"""

from tskd_tune.data import busi, chaos, folder, isic2018, kidneyus, kvasir, mni152, phantom  # noqa: F401
from tskd_tune.data.registry import ADAPTERS, adapter_options, class_names, get_adapter

__all__ = ["ADAPTERS", "adapter_options", "class_names", "get_adapter"]
