"""tskd_tune.runtime: the one thread count a trial and `tskd-tune synth` both use, and the device."""

import pytest
import torch

from tskd_tune.config import validate
from tskd_tune.errors import TskdError
from tskd_tune.runtime import resolve_device, set_threads, trial_threads


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
