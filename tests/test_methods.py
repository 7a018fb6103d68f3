"""The method registry, and each method on its own: golden losses of one tiny seeded step (a silent change
of a loss, a batch order or an initialisation shows up here), what the teacher's cache key depends on."""

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
    students = [tiny(teacher={"adapt": "lora"}, student={"lr": 0.1}), tiny(teacher={"adapt": "lora"}, distill={"temperature": 2.0}),
                tiny(teacher={"adapt": "lora"}, student={"channels": [4, 8, 16]})]  # fmt: skip
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
