"""The search's feature fill: which teacher variants a space needs, and Ray workers filling an entry that
equals the one a trial would compute itself."""

import io

import numpy as np
import pytest
import torch

from tskd_tune.cache import Store, digest
from tskd_tune.data.prepare import load
from tskd_tune.features import data_source, encoder_features, feature_key, load_states
from tskd_tune.models.teacher import build_teacher
from tskd_tune.reporter import Reporter
from tskd_tune.search.features import needed_variants, teacher_notice
from tskd_tune.trial import run_trial

TINY = {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}


def test_needed_variants_follow_the_space_methods_and_references(tiny):
    cfg = tiny()
    assert needed_variants(cfg) == [("head", None)]
    lora = tiny(
        teacher={"adapt": "lora"},
        search={
            "baselines": ["scratch"],
            "space": {"teacher.lora.last_blocks": {"type": "int", "low": 1, "high": 2}},
        },
    )
    assert needed_variants(lora) == [("lora", 1), ("lora", 2)]
    both = tiny(
        search={
            "baselines": [],
            "space": {"distill.method": {"type": "choice", "values": ["scratch", "ta_kd"]}},
        }
    )
    assert needed_variants(both) == [("head", None)]  # ta_kd distils the whole frozen encoder
    only_scratch = tiny(distill={"method": "scratch"}, search={"baselines": ["scratch"]})
    assert needed_variants(only_scratch) == []


def test_a_search_says_when_its_first_trial_will_fine_tune_the_teacher(tiny):
    cfg = tiny(teacher={"adapt": "lora", "epochs": 1})
    line = teacher_notice(cfg, *load(cfg))
    assert line.startswith("teacher: vit_small_patch16_224 is not fine-tuned for this split yet (LoRA rank 4")
    assert "1 epoch on 8 labelled images" in line and "\n" not in line
    run_trial(tiny(teacher={"adapt": "lora", "epochs": 1}, distill={"method": "teacher"}))
    assert teacher_notice(cfg, *load(cfg)) is None  # now in the trial cache: nothing to wait for
    other = tiny(teacher={"adapt": "lora", "epochs": 1}, seed=1)  # another teacher: not cached
    assert "not fine-tuned" in teacher_notice(other, *load(other))
    searched = tiny(search={"space": {"teacher.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2}}})
    assert "in the first trial of each teacher.* configuration" in teacher_notice(searched, *load(searched))
    scratch = tiny(distill={"method": "scratch"}, search={"baselines": ["scratch"]})
    assert teacher_notice(scratch, *load(scratch)) is None


@pytest.fixture
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield ray
    ray.shutdown()


def test_workers_fill_the_same_entry_a_trial_would(tiny, tmp_path, local_ray, monkeypatch):
    from rich.console import Console

    import tskd_tune.search.features as sf
    from tskd_tune.data.prepare import load

    monkeypatch.setattr(sf, "ON_DRIVER_S", 0.0)  # the tiny encoder would otherwise be filled on the driver
    cfg = tiny(teacher={"adapt": "lora", "lora": {"last_blocks": 1}, "augment_views": 2})
    prepared, splits = load(cfg)
    payload = (prepared, splits)  # what launch puts in the object store for its trials
    summary = sf.fill_features(
        cfg, prepared, splits, local_ray.put(payload), None, Reporter(Console(file=io.StringIO()))
    )
    assert summary["teacher_features_workers"] == 2
    model = build_teacher(
        cfg.teacher, in_chans=1, num_classes=len(prepared.classes), image_size=32, seed=cfg.seed
    )
    assert model.frozen == 1
    store = Store(cfg.cache.dir)
    filled = load_states(store.path("features", digest(feature_key(cfg, model, data_source(prepared)))))
    # a trial now finds the entry, with the states its own prefix would have computed
    found = encoder_features(cfg, model, prepared, store, torch.device("cpu"))
    assert found.cached and len(filled[0]) == len(prepared)
    with torch.no_grad():
        expected = model.prefix(torch.from_numpy(np.asarray(prepared.images[:5], np.float32)))[0]
    torch.testing.assert_close(
        torch.from_numpy(np.asarray(filled[0][:5], np.float32)), expected, atol=2e-2, rtol=1e-2
    )
    # the labelled images' augmented views went to one entry per image, which the trial's teacher finds
    from tskd_tune.features import augmented_views

    views = augmented_views(cfg, model, prepared, splits.labeled, store, torch.device("cpu"))
    assert views.cached and len(views) == 2 * len(splits.labeled)
    assert summary["teacher_features_filled"] == len(prepared) + 2 * len(splits.labeled)
    again = sf.fill_features(
        cfg, prepared, splits, local_ray.put(payload), None, Reporter(Console(file=io.StringIO()))
    )
    assert again == {"teacher_features_filled": 0}
