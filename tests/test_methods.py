"""The method registry, and each method on its own: golden losses of one tiny seeded step (a silent change
of a loss, a batch order or an initialisation shows up here), what the teacher's cache key depends on."""

from pathlib import Path

import pytest

from tests.conftest import TINY_VIT_STUDENT
from tskd_tune.methods import METHODS, get_method
from tskd_tune.trial import run_trial

# the first epoch's training loss of each method on the tiny config below (one optimisation step);
# computed once with this code on the pinned torch, float32 on CPU (see GOLDEN_TOLERANCE). mae's (its
# fine-tuning loss after one pretraining step, on the tiny ViT student of STUDENT) was added with mae by
# running this test's config through run_trial and copying train_loss; it moves by 2e-3 when
# distill.mask_ratio goes from 0.75 to 0.5, so it does see the pretraining.
GOLDEN = {
    "ts_kd": 1.2973969,
    "ta_kd": 1.0214653,
    "scratch": 1.0239940,
    "teacher": 0.9826647,
    "mae": 0.9820511,
}
GOLDEN_TOLERANCE = 1e-4  # relative: CPU kernels may differ in the last bits between instruction sets
STUDENT = {"mae": TINY_VIT_STUDENT}
"""Methods that need another student than the tiny config's U-Net."""


def test_every_registered_method_says_what_it_needs():
    assert set(METHODS) == {"ts_kd", "ta_kd", "mae", "scratch", "teacher"}
    assert {m: (s.teacher, s.transfer, s.student) for m, s in METHODS.items()} == {
        "ts_kd": ("fine_tuned", True, True),
        "ta_kd": ("frozen", True, True),
        "mae": (None, True, True),
        "scratch": (None, False, True),
        "teacher": ("fine_tuned", False, False),
    }
    from tskd_tune.errors import TskdError

    known = r"\(known: mae, scratch, ta_kd, teacher, ts_kd\)"
    with pytest.raises(TskdError, match=rf"^distill.method: unknown method 'kd' {known}$"):
        get_method("kd")


@pytest.mark.parametrize("method", sorted(GOLDEN))
def test_one_seeded_step_gives_the_golden_loss(tiny, method):
    student = {"epochs": 1, "steps_per_epoch": 1} | STUDENT.get(method, {})
    cfg = tiny(
        distill={"method": method, "pretrain_epochs": 1},
        teacher={"epochs": 1},
        student=student,
        cache={"enabled": False},
    )
    result = run_trial(cfg)
    loss = result["teacher_train_loss"] if method == "teacher" else result["train_loss"]
    assert loss == pytest.approx(GOLDEN[method], rel=GOLDEN_TOLERANCE), (method, loss)


def test_the_teacher_key_follows_every_lora_field_and_no_student_knob(tiny):
    from tskd_tune.data.prepare import load
    from tskd_tune.transfer import teacher_key

    base = tiny(teacher={"adapt": "lora"})
    prepared, splits = load(base)
    key = lambda cfg: teacher_key(cfg, prepared, splits)  # noqa: E731
    lora = {"rank": 2, "alpha": 3.0, "dropout": 0.1, "target_modules": ["qkv", "fc1"], "last_blocks": 1}
    for field, value in lora.items():
        assert key(tiny(teacher={"adapt": "lora", "lora": {field: value}})) != key(base), field
    students = [
        tiny(teacher={"adapt": "lora"}, student={"lr": 0.1}),
        tiny(teacher={"adapt": "lora"}, distill={"temperature": 2.0}),
        tiny(teacher={"adapt": "lora"}, student={"channels": [4, 8, 16]}),
    ]
    assert all(key(cfg) == key(base) for cfg in students)


@pytest.mark.parametrize("rank", [2, 5])
def test_the_lora_rank_reaches_peft(tiny, rank):
    from tskd_tune.models.teacher import adapted, build_teacher

    cfg = tiny(teacher={"adapt": "lora", "lora": {"rank": rank, "alpha": 2.0 * rank}})
    model = adapted(build_teacher(cfg.teacher, in_chans=1, num_classes=4, image_size=32), cfg.teacher)
    a = [m for n, m in model.named_modules() if n.endswith("lora_A.default")]
    b = [m for n, m in model.named_modules() if n.endswith("lora_B.default")]
    assert a and all(m.weight.shape[0] == rank for m in a) and all(m.weight.shape[1] == rank for m in b)
    assert {m.scaling["default"] for n, m in model.named_modules() if n.endswith(".qkv")} == {2.0}


def test_a_record_flattens_into_the_trial_metrics_in_metrics_json_order():
    from tskd_tune.methods import Record, TeacherSource
    from tskd_tune.methods.record import FROZEN_ENCODER

    pool = {"synth_pool": 8, "synth_cached": True}
    record = Record(pool=pool, logits_cached=False, synth_drawn=4, synth_kept=3)
    record.teacher = TeacherSource(cached=True, adapter="/cache/teacher/abc")
    record.read_features(cached=True, seconds=1.5)
    record.read_features(cached=False, seconds=0.5, backend="onnx batch 16")
    record.transfer_real, record.transfer_synthetic = 40, 8
    assert list(record.metrics().items()) == [
        ("teacher_features_cached", False),  # one read computed features: not all came from the cache
        ("teacher_features_s", 2.0),
        ("synth_pool", 8),
        ("synth_cached", True),
        ("teacher_features_backend", "onnx batch 16"),
        ("teacher_cached", True),
        ("teacher_adapter", "/cache/teacher/abc"),
        ("logits_cached", False),
        ("transfer_real", 40),
        ("transfer_synthetic", 8),
        ("synth_drawn", 4),
        ("synth_kept", 3),
    ]
    # the teacher-feature figures are always reported; the rest only when measured
    assert Record().metrics() == {"teacher_features_cached": None, "teacher_features_s": None}
    # the frozen encoder is a teacher with nothing fine-tuned to cache: reported as None, with no adapter
    assert Record(teacher=FROZEN_ENCODER).metrics() == Record().metrics() | {"teacher_cached": None}
    timed = Record(timings={"data": 0.25})
    with timed.timed("student"):
        pass
    with timed.timed("data"):  # a phase timed twice adds up, in the order first timed
        pass
    assert list(timed.seconds()) == ["data_s", "student_s"] and timed.seconds()["data_s"] >= 0.25


@pytest.mark.parametrize("method", ["ts_kd", "scratch"])
def test_a_method_returns_its_record_with_typed_fields(tiny, method):
    import torch

    from tskd_tune.cache import Store
    from tskd_tune.data.prepare import load
    from tskd_tune.methods import Record, TeacherSource, TrialContext

    cfg = tiny(distill={"method": method}, teacher={"epochs": 1}, student={"epochs": 1, "steps_per_epoch": 1})
    prepared, splits = load(cfg)
    st = TrialContext(cfg, prepared, splits, Store(cfg.cache.dir), torch.device("cpu"))
    outcome = get_method(method).run(st, None)
    record = outcome.record
    assert isinstance(record, Record) and record is st.record
    assert all(isinstance(s, float) and s >= 0 for s in record.timings.values())
    if method == "scratch":
        assert record.teacher is None and (record.transfer_real, record.transfer_synthetic) == (0, 0)
        assert list(record.timings) == ["student"] and record.teacher_features_cached is None
        return
    assert record.teacher.cached is False and (Path(record.teacher.adapter) / "head.safetensors").is_file()
    assert record.logits_cached is False and record.teacher_features_cached is False
    assert record.transfer_real == len(splits.labeled) + len(splits.unlabeled)
    assert record.transfer_synthetic == 0
    assert record.synth_drawn is None  # no synthetic image, no filter
    assert list(record.timings) == ["teacher", "transfer", "student"]
    # the same teacher again: the record says it came from the cache, with its logits and features
    st = TrialContext(cfg, prepared, splits, Store(cfg.cache.dir), torch.device("cpu"))
    again = get_method(method).run(st, None).record
    assert again.teacher == TeacherSource(cached=True, adapter=record.teacher.adapter)
    assert again.logits_cached is True and again.teacher_features_cached is True
