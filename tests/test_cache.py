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

    raw = tiny_raw(
        tmp_path, student={"epochs": 1}, teacher={"epochs": 2}, synthetic=TINY_SYNTH, resources={"threads": 1}
    )
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, "-m", "tskd_tune", "trial", str(space), "--json", "--out"]
    procs = [
        subprocess.Popen([*cmd, str(tmp_path / n)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for n in ("a", "b")
    ]
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
    for kind, names in [
        ("data", ["images.npy"]),
        ("teacher", teacher),
        ("logits", ["outputs.npy"]),
        ("synth_pool", ["images.npy"]),
    ]:
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


# ---------------------------------------------------------------------------------------------- usage, pruning
def _aged(store, kind: str, key, size: int, hours_ago: float):
    """An entry of ``size`` bytes last used ``hours_ago``."""
    import os

    hit = store.get_or_build(kind, key, _write(b"x" * size))
    stamp = time.time() - hours_ago * 3600
    os.utime(hit.path / "MANIFEST.json", (stamp, stamp))
    return hit.path


def test_entries_are_listed_least_recently_used_first_and_a_hit_counts_as_use(tmp_path):
    from tskd_tune.cache import entries

    store = Store(tmp_path)
    a = _aged(store, "teacher", 1, 1000, hours_ago=5)
    b = _aged(store, "features", 2, 3000, hours_ago=1)
    (tmp_path / "features" / ".tmp-dead-1234").mkdir()  # a killed build's leftover
    found = entries(tmp_path)
    assert [e.path for e in found if e.complete] == [a, b]
    assert sum(e.size for e in found if e.complete) > 4000 and [e for e in found if not e.complete]
    store.get_or_build("teacher", 1, _write(b"never called"))  # a hit: used now
    assert [e.path for e in entries(tmp_path) if e.complete] == [b, a]


def test_prune_by_size_age_and_kind_least_recently_used_first(tmp_path):
    from tskd_tune.cache import GB, entries, prune

    store = Store(tmp_path)
    old = _aged(store, "logits", 1, 4000, hours_ago=48)
    mid = _aged(store, "features", 2, 4000, hours_ago=10)
    new = _aged(store, "features", 3, 4000, hours_ago=1)
    assert [e.path for e in prune(tmp_path, older_than_s=24 * 3600, dry_run=True)] == [old] and old.exists()
    assert [e.path for e in prune(tmp_path, older_than_s=5 * 3600, kind="features")] == [mid]
    assert old.exists() and not mid.exists() and new.exists()
    # down to at most ~1 entry's worth: the least recently used goes first
    assert [e.path for e in prune(tmp_path, max_gb=5000 / GB)] == [old]
    assert [e.path for e in entries(tmp_path) if e.complete] == [new]


def test_prune_spares_entries_in_use_and_entries_being_built(tmp_path):
    from filelock import FileLock

    from tskd_tune.cache import prune

    store = Store(tmp_path)
    building = _aged(store, "teacher", 1, 4000, hours_ago=30)
    recent = _aged(store, "teacher", 2, 4000, hours_ago=0.5)  # used by the running search
    with FileLock(str(building) + ".lock"):  # another process (re)builds it
        removed = prune(tmp_path, max_gb=0.0, keep_since=time.time() - 3600)
    assert removed == [] and building.exists() and recent.exists()
    assert [e.path for e in prune(tmp_path, max_gb=0.0)] == [building, recent]


def test_a_full_disk_fails_in_one_line_naming_the_cache_and_what_to_prune(tmp_path):
    import errno

    from tskd_tune.errors import StorageError

    store = Store(tmp_path)
    _aged(store, "features", 1, 2000, hours_ago=2)

    def full(tmp):
        (tmp / "part.bin").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(StorageError) as info:
        store.get_or_build("teacher", 2, full)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"cache.dir: cannot write {tmp_path / 'teacher'}")
    assert "No space left on device" in msg and f"tskd-tune cache prune --dir {tmp_path} --max-gb N" in msg
    assert not [p for p in (tmp_path / "teacher").iterdir() if p.is_dir()]  # nothing half-written is left


def test_cache_ls_and_prune_commands(tmp_path):
    """The real CLI in a subprocess."""
    import subprocess
    import sys

    def cli(*args) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "tskd_tune", "cache", *args, "--dir", str(tmp_path / "c")],
            capture_output=True,
            text=True,
            timeout=120,
        )

    store = Store(tmp_path / "c")
    _aged(store, "features", 1, 5000, hours_ago=72)
    _aged(store, "teacher", 2, 1000, hours_ago=1)
    ls = cli("ls")
    assert ls.returncode == 0 and "features" in ls.stdout and "teacher" in ls.stdout
    assert ls.stdout.splitlines()[-1].split()[:2] == ["total", "2"]
    pruned = cli("prune", "--older-than", "2d")
    assert pruned.returncode == 0 and "removed 1 entry" in pruned.stdout
    assert (
        not (tmp_path / "c" / "features" / digest(1)).exists()
        and (tmp_path / "c" / "teacher" / digest(2)).exists()
    )
    for bad, field in (
        (("prune",), "cache prune: give --max-gb"),
        (("prune", "--max-gb", "1", "--kind", "nope"), "--kind:"),
        (("prune", "--older-than", "3x"), "--older-than:"),
    ):
        proc = cli(*bad)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]
        assert proc.stderr.startswith(f"error: {field}") and "Traceback" not in proc.stderr


def test_written_json_is_strict_an_undefined_number_is_null(tmp_path):
    import json
    import math

    import numpy as np

    from tskd_tune.cache import json_text, write_json

    obj = {
        "rank_correlation": [{"epoch": 2, "spearman": math.nan}],
        "best": np.float32(0.5),
        "worst": -math.inf,
        "test_dice": np.float64("nan"),
        "per_class": np.array([0.25, np.nan]),
        "path": tmp_path,
        "n": 3,
    }
    write_json(tmp_path / "summary.json", obj)

    def refuse(constant):  # what strict parsers (jq, browsers) do with NaN or Infinity
        raise ValueError(constant)

    back = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert back == {
        "rank_correlation": [{"epoch": 2, "spearman": None}],
        "best": 0.5,
        "worst": None,
        "test_dice": None,
        "per_class": [0.25, None],
        "path": str(tmp_path),
        "n": 3,
    }
    assert json.loads(json_text(obj, indent=None), parse_constant=refuse) == back
