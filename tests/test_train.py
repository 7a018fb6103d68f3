"""The epoch loop on its own: the hooks an adapter installs, checkpoint cadence, reseeding."""

import pytest
import torch

from tskd_tune.train import Hooks, Loop, load_checkpoint, run_loop


def _loop(tmp=None, **kw) -> tuple[Loop, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.rand(16, 3), torch.rand(16, 1)

    def step(g):
        i = torch.randint(16, (4,), generator=g)
        return torch.nn.functional.mse_loss(model(x[i]), y[i])

    settings = {
        "phase": "p",
        "modules": {"m": model},
        "step": step,
        "epochs": 3,
        "steps_per_epoch": 2,
        "lr": 1e-2,
        "weight_decay": 0.0,
        "seed": 0,
    } | kw
    return Loop(**settings), model


def test_hooks_see_every_step_and_can_change_its_loss():
    seen, beats = [], []

    def on_loss(phase, epoch, step, loss):
        seen.append((phase, epoch, step))
        return loss * 0  # a hook that zeroes the loss: nothing is learnt

    loop, model = _loop(hooks=Hooks(on_loss=on_loss, after_step=lambda: beats.append(1)))
    before = model.weight.detach().clone()
    metrics = run_loop(loop, None, None)
    assert seen == [("p", e, s) for e in (1, 2, 3) for s in (0, 1)] and len(beats) == 6
    assert metrics["train_loss"] == 0.0 and torch.equal(model.weight, before)


def test_default_hooks_do_nothing_and_the_loop_learns():
    loop, _ = _loop()
    first = run_loop(_loop(epochs=1)[0], None, None)["train_loss"]
    assert run_loop(loop, None, None)["train_loss"] < first


def test_checkpoints_follow_checkpoint_every_and_the_last_epoch(tmp_path):
    reports = []
    loop, _ = _loop(epochs=5, checkpoint_every=2)
    run_loop(loop, tmp_path, lambda e, m, c: reports.append((e, c is not None)))
    assert reports == [(1, False), (2, True), (3, False), (4, True), (5, True)]
    assert load_checkpoint(tmp_path / "checkpoint")["epoch"] == 5


def test_the_checkpoint_writer_hook_writes_the_file(tmp_path):
    written = []

    def writer(phase, epoch):
        def write(path, data):
            written.append((phase, epoch))
            path.write_bytes(data)

        return write

    run_loop(_loop(epochs=2, hooks=Hooks(checkpoint_writer=writer))[0], tmp_path, None)
    assert written == [("p", 1), ("p", 2)] and load_checkpoint(tmp_path / "checkpoint")["epoch"] == 2


def test_learning_rate_warms_up_linearly_then_decays_as_a_cosine():
    import math

    from tskd_tune.train import lr_factor

    plain = lr_factor(100, 0)  # no warm-up: the cosine every loop had before teacher.warmup_epochs
    assert [plain(s) for s in (0, 50, 100)] == pytest.approx([1.0, 0.5, 0.0])
    warm = lr_factor(100, 10)
    assert [warm(s) for s in range(10)] == pytest.approx([(s + 1) / 11 for s in range(10)])
    assert warm(10) == pytest.approx(1.0) and warm(55) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warm(100) == pytest.approx(0.0) and max(warm(s) for s in range(101)) == pytest.approx(1.0)


def test_each_epoch_reports_the_learning_rate_its_steps_used_never_the_zero_after_the_last():
    from tskd_tune.train import lr_factor

    reported = []
    loop, _ = _loop(epochs=3, steps_per_epoch=2)
    run_loop(loop, None, lambda epoch, metrics, ckpt: reported.append(metrics["lr"]))
    factor = lr_factor(6, 0)  # 3 epochs of 2 steps: the cosine reaches 0 only after the last step
    used = [1e-2 * (factor(2 * e) + factor(2 * e + 1)) / 2 for e in range(3)]
    assert reported == pytest.approx(used) and reported[-1] > 0
