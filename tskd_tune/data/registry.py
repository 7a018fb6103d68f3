"""The adapter registry: what a dataset adapter is, the table of adapters, and file-reading helpers.

An adapter is data, not a subclass: a name, a pydantic schema of its options, its class names, a
``scan`` function and the text that tells a user which layout was expected. Each adapter module calls
:func:`register` when it is imported; :mod:`tskd_tune.data.adapters` imports every adapter module. This
module imports none of them (they import it), and the package ``tskd_tune.data`` imports
``tskd_tune.data.adapters``, so the table is full once anything under ``tskd_tune.data`` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict

from tskd_tune.errors import DataError

if TYPE_CHECKING:
    from tskd_tune.config.schema import DataConfig


class Options(BaseModel):
    """Base of adapter options: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


@dataclass(frozen=True)
class Record:
    """One image/mask pair, read lazily.

    ``read`` returns ``(image, mask)``: image float32 in [0, 1], shape HxW or HxWx3; mask integer class
    indices, shape HxW (values outside the class list are reported by preprocessing).
    """

    id: str
    group: str
    """Patient or volume id: splits never divide a group."""
    read: Callable[[], tuple[np.ndarray, np.ndarray]]
    sources: tuple[Path, ...] = ()
    """Files the record reads (cache keys); the mask's file comes last, as mask errors name it."""


@dataclass(frozen=True)
class Adapter:
    """A dataset adapter: how to find, read and describe one dataset's published layout."""

    name: str
    options: type[Options]
    classes: Callable[[Any], list[str]]
    """Default class names (background first) for the given options."""
    scan: Callable[[Path | None, Any], list[Record]]
    layout: str
    """The expected on-disk layout, shown when the root is missing or empty."""
    source: str = ""
    """Where to get the dataset."""
    needs_root: bool = True
    version: int = 1
    """Bumped when the adapter's output changes, so old cache entries are not reused."""
    lateral_pairs: tuple[tuple[str, str], ...] = ()
    """Pairs of its default class names that swap when an image is flipped horizontally (left/right organs),
    used for the options whose classes include both; see :mod:`tskd_tune.data.lateral`."""
    extra: dict = field(default_factory=dict)


ADAPTERS: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    """Add an adapter to the registry (called at import time by each adapter module)."""
    ADAPTERS[adapter.name] = adapter
    return adapter


def get_adapter(name: str) -> Adapter:
    """The registered adapter called ``name``; an unknown name lists the known ones."""
    try:
        return ADAPTERS[name]
    except KeyError:
        raise DataError(
            f"data.dataset: unknown dataset {name!r} (known: {', '.join(sorted(ADAPTERS))})"
        ) from None


def adapter_options(data: DataConfig) -> Options:
    """The validated options of ``data``'s adapter."""
    return get_adapter(data.dataset).options.model_validate(data.options)


def class_names(data: DataConfig) -> list[str]:
    """The class names in effect: the configured ones, or the adapter's defaults."""
    if data.classes is not None:
        return list(data.classes)
    return get_adapter(data.dataset).classes(adapter_options(data))


# ------------------------------------------------------------------------------ file reading helpers
def read_image(path: Path, mode: str | None = None) -> np.ndarray:
    """Decode an image file into a numpy array; a corrupt or unreadable file names itself."""
    try:
        with Image.open(path) as im:
            im.load()
            if mode is not None:
                im = im.convert(mode)
            return np.asarray(im)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except PermissionError:
        raise DataError(f"{path}: cannot read (permission denied)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode image ({exc.__class__.__name__})") from None


def to_unit_float(image: np.ndarray) -> np.ndarray:
    """Scale an integer or float image to float32 in [0, 1] (integers by their dtype's range)."""
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if np.issubdtype(image.dtype, np.integer):
        return image.astype(np.float32) / float(np.iinfo(image.dtype).max)
    if image.dtype == bool:
        return image.astype(np.float32)
    return robust_scale(image)


def robust_scale(image: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> np.ndarray:
    """Map the [low_pct, high_pct] percentile range of a scan to [0, 1] (MR has no fixed units)."""
    image = image.astype(np.float32)
    lo, hi = np.percentile(image, [low_pct, high_pct])
    if hi <= lo:
        return np.zeros_like(image)
    return np.clip((image - lo) / (hi - lo), 0, 1)


def require_dir(
    root: Path | None, adapter_name: str, layout: str, source: str, sub: str | None = None
) -> Path:
    """The dataset root (or a required subfolder of it); a missing one explains the expected layout."""
    if root is None:
        raise DataError(f"data.root: required for dataset {adapter_name!r} (expected layout: {layout})")
    where = root / sub if sub else root
    if not where.is_dir():
        hint = f"; get it from {source}" if source else ""
        raise DataError(f"{where}: not found; {adapter_name} expects {layout}{hint}")
    return where


def check_unique(names: list[str], what: Path) -> None:
    """Duplicate record names would silently overwrite each other: refuse them."""
    seen: dict[str, int] = {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
    dups = sorted(n for n, c in seen.items() if c > 1)
    if dups:
        raise DataError(f"{what}: duplicate names {', '.join(dups[:5])}{' ...' if len(dups) > 5 else ''}")
