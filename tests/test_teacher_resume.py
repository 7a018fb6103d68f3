"""An interrupted teacher fine-tuning resumes from its checkpoint in the cache, and ends as an uninterrupted one."""

from __future__ import annotations

import shutil

import pytest

from tskd_tune.cache import Store, digest, entries, prune
from tskd_tune.methods import common
from tskd_tune.train import Hooks, load_checkpoint
from tskd_tune.trial import run_trial


class Interrupt(Exception):
    pass


def crash_at(epoch: int):
    def on_loss(phase, e, step, loss):
        if (phase, e) == ("teacher", epoch):
            raise Interrupt  # as if the process died after the previous epoch's checkpoint
        return loss

    return Hooks(on_loss=on_loss)


def test_an_interrupted_lora_teacher_resumes_where_it_stopped_and_ends_as_an_uninterrupted_one(
    tiny, tmp_path, monkeypatch
):
    from safetensors.torch import load_file

    monkeypatch.setattr(common, "TEACHER_CHECKPOINT_S", 0.0)  # a checkpoint after every epoch
    # LoRA in the last block over the cached prefix, with augmented views: the shipped LiteMedSAM recipe's shape
    raw = {"adapt": "lora", "lora": {"last_blocks": 1}, "epochs": 3, "augment_views": 2}
    cfg = tiny(distill={"method": "teacher"}, teacher=raw)
    teachers = tmp_path / "cache" / "teacher"
    whole = run_trial(cfg)
    assert whole["teacher_resumed_after_epoch"] == 0
    assert not list(teachers.glob(".partial-*"))  # nothing left once the entry exists
    (entry,) = [p for p in teachers.iterdir() if p.is_dir()]
    (weights,) = entry.rglob("*.safetensors")
    trained = load_file(weights)
    shutil.rmtree(entry)  # the same teacher again, from its start (data and features stay cached)

    with pytest.raises(Interrupt):
        run_trial(cfg, hooks=crash_at(3))
    (partial,) = teachers.glob(".partial-*")
    state = load_checkpoint(partial / "checkpoint")
    assert (state["phase"], state["epoch"]) == ("teacher", 2)
    saved = state["modules"]["teacher"]  # the adapters and the head: the frozen encoder is rebuilt on resume
    assert saved and all(
        "lora_" in k or "head" in k
        for k in saved
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    # the cache lists it (so `cache prune` and cache.max_gb see it) as an incomplete entry
    (e,) = [e for e in entries(tmp_path / "cache") if e.path == partial]
    assert not e.complete and e.size > 0

    epochs = []
    resumed = run_trial(cfg, report=lambda epoch, metrics, ckpt: epochs.append((epoch, ckpt)))
    # epochs 1-2 were not run again; the checkpoints are the cache's, not handed to the trial's reporter
    assert resumed["teacher_resumed_after_epoch"] == 2 and epochs == [(3, None)]
    assert resumed["val_dice"] == pytest.approx(whole["val_dice"], abs=1e-6)
    assert resumed["teacher_train_loss"] == pytest.approx(whole["teacher_train_loss"], abs=1e-6)
    (weights,) = [p for p in teachers.iterdir() if p.is_dir()][0].rglob("*.safetensors")
    again = load_file(weights)
    assert set(again) == set(trained) and all(again[k].equal(v) for k, v in trained.items())
    assert not partial.exists()


def test_a_left_behind_partial_build_is_pruned_when_stale_and_only_without_its_build(tmp_path):
    import os
    import time

    store = Store(tmp_path)
    partial = store.partial("teacher", {"k": 1})
    (partial / "checkpoint").mkdir(parents=True)
    (partial / "checkpoint" / "state.safetensors").write_bytes(b"0" * 1000)
    assert prune(tmp_path, older_than_s=0) == []  # fresh: maybe a build in progress
    week = time.time() - 7 * 86400
    for path in (partial, partial / "checkpoint", partial / "checkpoint" / "state.safetensors"):
        os.utime(path, (week, week))
    from filelock import FileLock

    with FileLock(str(store.path("teacher", digest({"k": 1}))) + ".lock"):  # its build runs
        assert prune(tmp_path, older_than_s=3600) == []
    assert [e.path for e in prune(tmp_path, older_than_s=3600)] == [partial] and not partial.exists()
