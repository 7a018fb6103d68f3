"""Shared fixtures: every test writes its data and cache under pytest's tmp_path."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# two cores on CI: keep torch from oversubscribing them when pytest runs a single process
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def write_yaml(tmp_path):
    """Write a YAML text to a file under tmp_path and return its path."""

    def _write(text: str, name: str = "space.yaml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return _write


TINY_TEACHER = {
    "model": "vit_small_patch16_224",
    "model_kwargs": {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2},
    "decoder_channels": 16,
    "lora": {"rank": 4, "alpha": 8, "target_modules": ["qkv", "proj", "fc1", "fc2"]},
    "lr": 3e-3,
    "epochs": 15,
    "batch_size": 8,
}

TINY_VIT_STUDENT = {"model": "vit_tiny", "model_kwargs": {"depth": 2, "embed_dim": 32, "num_heads": 2}}
"""A 2-block ViT-Tiny student (patch 8: a 4x4 grid on the tiny 32 px images), for methods that need a ViT."""


def tiny_raw(tmp_path: Path, **sections) -> dict:
    """A small but real trial config (phantom 32 px, 2-block ViT teacher, 3-level U-Net student)."""
    raw = {
        "name": "tiny",
        "seed": 0,
        "data": {
            "dataset": "phantom",
            "image_size": 32,
            "labeled": 8,
            "options": {"num_images": 80, "size": 64},
        },
        "teacher": dict(TINY_TEACHER),
        "student": {"model": "unet", "channels": [8, 16, 32], "epochs": 3, "batch_size": 8, "lr": 3e-3},
        "distill": {"method": "ts_kd", "pretrain_epochs": 2},
        "search": {"grace_period": 1},
        "cache": {"dir": str(tmp_path / "cache")},
        "resources": {"threads": 2},
    }
    for name, values in sections.items():
        raw[name] = raw.get(name, {}) | values
    return raw


@pytest.fixture
def tiny(tmp_path):
    """Build a validated tiny Config; keyword sections are merged into the defaults."""
    from tskd_tune.config import validate

    return lambda **sections: validate(tiny_raw(tmp_path, **sections))


def one_line_error(call, *args, **kwargs) -> str:
    """Run ``call`` expecting a DataError; assert its message is one line and return it."""
    from tskd_tune.errors import DataError

    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (for a server to start on, or to find unreachable)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, predicate, timeout: float = 600, every: float = 0.5):
    """``predicate()``'s first truthy value, asked every ``every`` seconds; fails the test after ``timeout``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
