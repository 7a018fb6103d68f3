"""tskd_tune.runtime: the one thread count a trial and `tskd-tune synth` both use, the device, the allocator."""

import json
import platform
import subprocess
import sys

import pytest
import torch

from tskd_tune.config import validate
from tskd_tune.errors import TskdError
from tskd_tune.runtime import keep_freed_memory, resolve_device, set_threads, trial_threads


def test_threads_are_resources_threads_else_the_cpus_rounded_up():
    assert trial_threads(validate({"resources": {"threads": 3, "cpu": 8}})) == 3
    assert trial_threads(validate({"resources": {"cpu": 2.5}})) == 3
    assert trial_threads(validate({"resources": {"cpu": 0.5}})) == 1
    assert trial_threads(validate({})) == 1  # resources.cpu defaults to 1


def test_set_threads_sets_torch_and_returns_the_count():
    before = torch.get_num_threads()
    try:
        assert set_threads(validate({"resources": {"threads": 1}})) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_device():
    assert resolve_device(validate({"resources": {"device": "cpu", "gpu": 1}})) == torch.device("cpu")
    assert resolve_device(validate({"resources": {"device": "auto", "gpu": 0}})) == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device(validate({"resources": {"device": "auto", "gpu": 1}})) == torch.device("cuda")
        return
    assert resolve_device(validate({"resources": {"device": "auto", "gpu": 1}})) == torch.device("cpu")
    with pytest.raises(TskdError) as raised:
        resolve_device(validate({"resources": {"device": "cuda"}}))
    assert str(raised.value) == "resources.device: cuda requested but no CUDA device is visible"


# a step's pattern, 12 times: two 128 MB tensors alive at once, then both freed; the page faults that took
# with glibc's defaults, then after keep_freed_memory (in a child: the setting cannot be undone in a process)
FAULTS = """
import json, resource, torch
from tskd_tune.config import validate
from tskd_tune.runtime import keep_freed_memory

def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(12):
        x = torch.ones(32 * 2**20)
        y = x * 2
        del x, y
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = faults()
applied = keep_freed_memory(validate({}))
print(json.dumps([default, applied, faults()]))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_keep_freed_memory_stops_large_blocks_faulting_in_again():
    out = subprocess.run([sys.executable, "-c", FAULTS], capture_output=True, text=True, check=True)
    default, applied, kept = json.loads(out.stdout)
    assert applied  # on by default
    pages = 128 * 2**20 // 4096
    assert default > 12 * 2 * pages * 0.9  # every step maps both tensors afresh and faults them in
    assert kept < default / 2  # the heap grows for a few steps, then its blocks are reused


def test_keep_freed_memory_is_off_when_turned_off():
    assert keep_freed_memory(validate({"resources": {"keep_freed_memory": False}})) is False
