import multiprocessing as mp
import time

import pytest

from tskd_tune.cache import Store, digest, verify


def _write(content: bytes):
    def build(tmp):
        (tmp / "blob.bin").write_bytes(content)

    return build


def test_digest_ignores_key_order_and_sees_values():
    assert digest({"a": 1, "b": [1, 2]}) == digest({"b": [1, 2], "a": 1})
    assert digest({"a": 1}) != digest({"a": 2})


def test_build_once_then_hit(tmp_path):
    store = Store(tmp_path)
    calls = []

    def build(tmp):
        calls.append(1)
        (tmp / "x.txt").write_text("hello")

    first = store.get_or_build("k", {"a": 1}, build)
    second = store.get_or_build("k", {"a": 1}, build)
    assert (first.cached, second.cached) == (False, True)
    assert first.path == second.path and (second.path / "x.txt").read_text() == "hello"
    assert calls == [1]
    assert not list((tmp_path / "k").glob(".tmp-*"))  # no leftovers


def test_corrupt_or_truncated_entry_is_rebuilt(tmp_path):
    store = Store(tmp_path)
    hit = store.get_or_build("k", 1, _write(b"0123456789"))
    (hit.path / "blob.bin").write_bytes(b"01234")  # truncated
    assert not verify(hit.path)
    again = store.get_or_build("k", 1, _write(b"0123456789"))
    assert not again.cached and (again.path / "blob.bin").read_bytes() == b"0123456789"


def test_failed_build_leaves_nothing_behind(tmp_path):
    store = Store(tmp_path)

    def broken(tmp):
        (tmp / "half.bin").write_bytes(b"half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.get_or_build("k", 1, broken)
    assert not verify(store.path("k", digest(1)))
    assert [p.name for p in (tmp_path / "k").iterdir() if not p.name.endswith(".lock")] == []


def test_disabled_store_always_builds(tmp_path):
    store = Store(tmp_path, enabled=False)
    a = store.get_or_build("k", 1, _write(b"a"))
    b = store.get_or_build("k", 1, _write(b"a"))
    assert not a.cached and not b.cached and a.path != b.path
    assert not (tmp_path / "k").exists()


def _racer(root, log):
    def build(tmp):
        with open(log, "a") as f:
            f.write("built\n")
        time.sleep(0.5)
        (tmp / "v").write_text("v")

    Store(root).get_or_build("k", "same", build)


def test_concurrent_builders_compute_once(tmp_path):
    log = tmp_path / "log.txt"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_racer, args=(tmp_path / "store", log)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert log.read_text().count("built") == 1


@pytest.mark.faults
def test_trials_racing_for_one_teacher_build_it_once_and_corrupt_entries_are_rebuilt(tmp_path):
    """Two `tskd-tune trial` processes start together on one cache: data, generator, synthetic pool,
    teacher and its logits are each built by one of them. Then one file of each kind of entry is cut
    in half: the next trial detects it by checksum and rebuilds it instead of using it."""
    import json
    import subprocess
    import sys

    import yaml

    from tests.conftest import tiny_raw
    from tests.test_synth import TINY_SYNTH
    from tskd_tune.config import validate
    from tskd_tune.trial import run_trial

    raw = tiny_raw(tmp_path, student={"epochs": 1}, teacher={"epochs": 2}, synthetic=TINY_SYNTH,
                   resources={"threads": 1})  # fmt: skip
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "tskd_tune", "trial", str(space), "--json", "--out"]
    procs = [subprocess.Popen([*cmd, str(tmp_path / n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in ("a", "b")]  # fmt: skip
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    first = [json.loads(out) for out, _ in outs]
    for flag in ("teacher_cached", "logits_cached", "synth_cached"):
        assert sorted(r[flag] for r in first) == [False, True], flag  # built once, found once
    assert first[0]["teacher_val_dice"] == first[1]["teacher_val_dice"]

    cache = tmp_path / "cache"
    damaged = {}
    # a teacher entry holds its trained head (teacher.adapt: head) or its LoRA adapter (lora)
    teacher = ["head.safetensors", "adapter/adapter_model.safetensors"]
    for kind, names in [("data", ["images.npy"]), ("teacher", teacher), ("logits", ["outputs.npy"]),
                        ("synth_pool", ["images.npy"])]:  # fmt: skip
        (entry,) = [p for p in (cache / kind).iterdir() if p.is_dir()]
        f = next(entry / n for n in names if (entry / n).is_file())
        size = f.stat().st_size
        f.write_bytes(f.read_bytes()[: size // 2])
        assert not verify(entry)
        damaged[kind] = (entry, f, size)
    again = run_trial(validate(raw))
    assert (again["teacher_cached"], again["logits_cached"], again["synth_cached"]) == (False, False, False)
    for kind, (entry, f, size) in damaged.items():
        assert verify(entry) and f.stat().st_size == size, kind  # rebuilt whole, in place
    assert again["teacher_val_dice"] == first[0]["teacher_val_dice"]  # the same teacher, rebuilt
