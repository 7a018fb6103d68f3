"""Per-process set-up shared by a trial and `tskd-tune synth`: the device, the CPU thread count and the allocator.

A leaf: it imports only the config, the errors and torch, so any stage may use it without an import cycle.
"""

from __future__ import annotations

import math

import torch

from tskd_tune.config import Config
from tskd_tune.errors import TskdError


def resolve_device(cfg: Config) -> torch.device:
    """CUDA when asked for or available (``resources.device: auto``), else CPU."""
    want = cfg.resources.device
    if want == "cuda" or (want == "auto" and torch.cuda.is_available() and cfg.resources.gpu > 0):
        if not torch.cuda.is_available():
            raise TskdError("resources.device: cuda requested but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


def trial_threads(cfg: Config) -> int:
    """CPU threads of one trial (or one `tskd-tune synth`): ``resources.threads``, else ``resources.cpu``
    rounded up, so a process never runs more threads than the CPUs Ray reserved for it."""
    return cfg.resources.threads or max(1, math.ceil(cfg.resources.cpu))


# glibc's malloc serves a block above its mmap threshold (adjusted on the fly, at most 32 MiB) with a fresh
# mmap and unmaps it on free, so a training step whose activations are larger (a LoRA teacher's blocks at
# 64x64 tokens: 168 MB each) faults every page of them in again, step after step; measured, the kernel's share
# was 45% of the CPU time (benchmarks/cpu_malloc.py). Raising both thresholds keeps those blocks in the heap.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP = 2**31 - 1


def keep_freed_memory(cfg: Config) -> bool:
    """Make glibc's malloc keep large freed blocks of this process for reuse (``resources.keep_freed_memory``);
    returns whether it now does (False off glibc, where the thresholds do not exist, or when turned off)."""
    import ctypes
    import platform

    if not cfg.resources.keep_freed_memory or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(
            libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(_KEEP))
            and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_KEEP))
        )
    except (OSError, AttributeError):  # a libc without mallopt: keep its defaults
        return False


def set_threads(cfg: Config) -> int:
    """Set torch's intra-op threads of this process to ``trial_threads(cfg)``; returns that count."""
    threads = trial_threads(cfg)
    torch.set_num_threads(threads)
    return threads


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 matmuls natively: CUDA, or a CPU with AMX or AVX512-BF16 (oneDNN
    then uses bf16 kernels; elsewhere a CPU emulates bf16 and autocast would only slow it down)."""
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def autocast_bf16(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` (a no-op context when not ``enabled``)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
