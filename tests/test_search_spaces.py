"""Every shipped YAML in search_spaces/ loads and validates, and searches the knobs the method needs."""

from pathlib import Path

import pytest

from tskd_tune.config import load_config
from tskd_tune.space import to_optuna

SPACES = sorted((Path(__file__).resolve().parents[1] / "search_spaces").glob("*.yaml"))


def test_every_dataset_has_a_shipped_space():
    names = {p.stem for p in SPACES}
    assert {"demo", "kidneyus", "chaos", "busi", "isic2018", "kvasir", "mni152"} <= names


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_shipped_space_validates(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    dists = to_optuna(cfg.search.space)
    assert "student.lr" in dists  # every shipped search tunes at least the student learning rate
    if cfg.data.dataset not in ("phantom", "mni152"):
        assert cfg.data.root is not None  # real datasets say where they expect the data


def test_paper_space_searches_every_required_knob():
    cfg = load_config(SPACES[[p.stem for p in SPACES].index("kidneyus")])
    assert {
        "teacher.lora.rank",
        "teacher.lora.alpha",
        "distill.temperature",
        "distill.kd_weight",
        "distill.sup_weight",
        "synthetic.ratio",
        "student.lr",
        "teacher.lr",
    } <= set(cfg.search.space)
