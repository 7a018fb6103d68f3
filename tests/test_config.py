from pathlib import Path

import pytest

from tskd_tune.config import Config, apply_values, load_config, parse_overrides, to_yaml, validate
from tskd_tune.errors import ConfigError


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate(raw)
    return info.value.problems


def test_defaults_validate_and_round_trip_through_yaml(tmp_path):
    cfg = validate({})
    assert cfg.data.dataset == "phantom" and cfg.distill.method == "ts_kd"
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(path).model_dump(exclude={"name"}) == cfg.model_dump(exclude={"name"})


def test_error_names_yaml_path_and_value():
    assert problems({"distill": {"temperature": -1}}) == ["distill.temperature: must be > 0, got -1"]


def test_unknown_keys_are_errors_at_every_level():
    got = problems({"data": {"colour": "red"}, "teacher": {"lora": {"rnak": 4}}, "extra": 1})
    assert set(got) == {"data.colour: unknown key", "teacher.lora.rnak: unknown key", "extra: unknown key"}


def test_every_problem_is_reported_once_per_line():
    got = problems({"data": {"labeled": 0, "image_size": 8}, "distill": {"method": "magic"}})
    assert len(got) == 3
    assert "data.labeled: must be >= 1, got 0" in got
    assert "data.image_size: must be >= 16, got 8" in got
    assert any(p.startswith("distill.method: must be one of") and "'magic'" in p for p in got)
    assert all("\n" not in p for p in got)


def test_wrong_types_name_the_field():
    (msg,) = problems({"student": {"epochs": "many"}})
    assert msg.startswith("student.epochs:") and "'many'" in msg


def test_adapter_options_are_checked_with_their_path():
    (msg,) = problems({"data": {"options": {"target": "liver"}}})
    assert msg.startswith("data.options.target: must be one of") and "'liver'" in msg
    (msg,) = problems({"data": {"options": {"bogus": 1}}})
    assert msg == "data.options.bogus: unknown key"


def test_class_count_must_match_the_adapter():
    (msg,) = problems({"data": {"classes": ["background", "kidney"]}})
    assert msg.startswith("data.classes: phantom with these options has 4 classes")
    cfg = validate({"data": {"classes": ["bg", "kidney"], "options": {"target": "capsule"}}})
    assert cfg.data.classes == ["bg", "kidney"]


def test_unknown_dataset_and_missing_root():
    assert problems({"data": {"dataset": "nope"}})[0].startswith("data.dataset: unknown dataset 'nope'")


def test_cross_field_rules():
    (msg,) = problems({"distill": {"kd_weight": 0, "sup_weight": 0}})
    assert "learns nothing" in msg
    (msg,) = problems({"search": {"grace_period": 50}, "student": {"epochs": 10}})
    assert msg == "search.grace_period: must be <= student.epochs (10), got 50"


def test_mae_needs_a_vit_student():
    need = "mae pretrains a ViT student's encoder (student.model: vit_tiny), got unet"
    assert problems({"distill": {"method": "mae"}}) == [f"distill.method: {need}"]
    assert problems({"search": {"baselines": ["scratch", "mae"]}}) == [f"search.baselines: {need}"]
    vit = validate(
        {"distill": {"method": "mae"}, "student": {"model": "vit_tiny"}, "search": {"baselines": ["mae"]}}
    )
    assert vit.distill.mask_ratio == 0.75
    # searching the method checks each choice against the student
    (msg,) = problems(
        {"search": {"space": {"distill.method": {"type": "choice", "values": ["ts_kd", "mae"]}}}}
    )
    assert msg.startswith("search.space.distill.method:") and msg.endswith(f"distill.method: {need}")
    for ratio in (0, 1):
        (msg,) = problems({"distill": {"mask_ratio": ratio}})
        assert msg.startswith("distill.mask_ratio: must be")


def test_overrides_are_typed_yaml_and_revalidated(write_yaml):
    path = write_yaml("distill: {temperature: 4.0}\n")
    cfg = load_config(
        path,
        parse_overrides(
            ["distill.temperature=2.5", "data.classes=[bg,kidney]", "data.options.target=capsule"]
        ),
    )
    assert cfg.distill.temperature == 2.5
    assert cfg.data.classes == ["bg", "kidney"]
    assert cfg.name == "space"  # default name is the file stem
    with pytest.raises(ConfigError) as info:
        load_config(path, parse_overrides(["distill.temperature=-2"]))
    assert info.value.lines() == [f"{path}: distill.temperature: must be > 0, got -2"]


@pytest.mark.parametrize("item", ["novalue", "=3"])
def test_malformed_override(item):
    with pytest.raises(ConfigError) as info:
        parse_overrides([item])
    assert "expected KEY=VALUE" in info.value.problems[0]


def test_override_into_a_value_is_refused(write_yaml):
    with pytest.raises(ConfigError) as info:
        load_config(write_yaml("distill: {temperature: 4}\n"), parse_overrides(["distill.temperature.x=1"]))
    assert "distill.temperature: is a value, not a section" in info.value.problems[0]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data: [1\n", "invalid YAML: line 2, column 1"),
        ("data:\n  seed: 1\n  seed: 2\n", "duplicate key 'seed'"),
        ("- a\n- b\n", "top level must be a mapping, got list"),
        ("!!python/object:os.system {}\n", "invalid YAML"),  # safe loading: no object construction
    ],
)
def test_bad_yaml_files(write_yaml, text, expected):
    path = write_yaml(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (line,) = info.value.lines()
    assert line.startswith(f"{path}: ") and expected in line


def test_missing_file():
    with pytest.raises(ConfigError) as info:
        load_config(Path("/nonexistent/space.yaml"))
    assert info.value.lines() == ["/nonexistent/space.yaml: file not found"]


def test_apply_values_sets_by_path_and_revalidates():
    cfg = Config()
    new = apply_values(cfg, {"teacher.lora.rank": 16, "distill.temperature": 1.5})
    assert (new.teacher.lora.rank, new.distill.temperature) == (16, 1.5)
    assert cfg.teacher.lora.rank == 4  # the original is untouched
    with pytest.raises(ConfigError):
        apply_values(cfg, {"teacher.lora.rank": 0})


def test_every_field_has_a_description():
    from pydantic import BaseModel

    def walk(model: type[BaseModel], prefix: str):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, f"{prefix}{name}.")
            elif prefix:  # top-level sections are described by their own fields
                assert field.description, f"{prefix}{name} has no docstring"

    walk(Config, "")


def test_multi_objective_search_rules():
    fifo = {"scheduler": "fifo", "objectives": {"val_dice": "max", "student_latency_ms": "min"}}
    cfg = validate({"search": fifo})
    assert cfg.search.objective_items() == [("val_dice", "max"), ("student_latency_ms", "min")]
    assert validate({}).search.objective_items() == [("val_dice", "max")]
    assert problems({"search": fifo | {"scheduler": "asha"}}) == [
        "search.scheduler: asha needs a single objective; use fifo with search.objectives, got 'asha'"
    ]
    assert problems({"search": fifo | {"scheduler": "hyperband"}})[0].startswith(
        "search.scheduler: hyperband needs"
    )
    assert problems({"search": fifo | {"objectives": {"val_dice": "max"}}})[0].startswith(
        "search.objectives: needs at least two metrics"
    )
    assert problems({"search": fifo | {"objectives": {"val_dice": "max", "speed": "min"}}})[0].startswith(
        "search.objectives.speed: not a reported metric"
    )
    assert problems({"search": fifo | {"objectives": {"val_dice": "up", "val_hd95": "min"}}})[0].startswith(
        "search.objectives.val_dice: must be one of"
    )
    assert problems({"search": fifo | {"metric": "val_hd95"}})[0].startswith("search.metric: the first of")


def test_pareto_front_keeps_only_non_dominated_trials():
    import numpy as np
    import pandas as pd

    from tskd_tune.report import pareto_front

    board = pd.DataFrame({"val_dice": [0.9, 0.8, 0.7, 0.85, np.nan], "lat": [5.0, 2.0, 3.0, 6.0, 1.0]})
    front = pareto_front(board, [("val_dice", "max"), ("lat", "min")])
    # 0.7@3 is beaten by 0.8@2, 0.85@6 by 0.9@5; a trial with no result is never on the front
    assert front.tolist() == [True, True, False, False, False]


def _path_typed_fields(model, prefix: str = "") -> set[str]:
    """Dotted names of every field whose type mentions Path (Path, Path | None, list[Path], ...)."""
    from typing import get_args

    from pydantic import BaseModel

    def mentions_path(ann) -> bool:
        return (isinstance(ann, type) and issubclass(ann, Path)) or any(
            mentions_path(a) for a in get_args(ann)
        )

    out = set()
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out |= _path_typed_fields(ann, f"{prefix}{name}.")
        elif mentions_path(ann):
            out.add(f"{prefix}{name}")
    return out


def test_every_path_typed_field_is_a_path_field():
    from tskd_tune.config import PATH_FIELDS

    assert _path_typed_fields(Config) <= set(PATH_FIELDS)
    assert len(set(PATH_FIELDS)) == len(PATH_FIELDS)
    for dotted in PATH_FIELDS:  # each entry names a real field
        node = Config
        for key in dotted.split("."):
            node = node.model_fields[key].annotation
        assert node is not None


def test_absolutize_resolves_every_path_field(tmp_path, monkeypatch):
    from tskd_tune.config import PATH_FIELDS, absolutize

    monkeypatch.chdir(tmp_path)
    relative = {
        "data.root": "data/set",
        "teacher.checkpoint": "weights/teacher.pth",
        "synthetic.pretrained_path": "pipelines/ddpm",
        "cache.dir": "my-cache",
        "search.study_storage": "runs/study.journal",
    }
    assert set(relative) == set(PATH_FIELDS)  # a new path field gets a case here
    cfg = apply_values(Config(), relative)
    out = absolutize(cfg)
    for dotted, rel in relative.items():
        section, key = dotted.split(".")
        value = getattr(getattr(out, section), key)
        assert str(value) == str(tmp_path / rel), dotted
        assert type(value) is type(getattr(getattr(cfg, section), key)), dotted  # a str stays a str
    assert out.synthetic.pretrained_path == tmp_path / "pipelines" / "ddpm"
    assert cfg.data.root == Path("data/set")  # the original is untouched
    # unset paths stay unset; URLs and absolute paths are left as they are
    url = "postgresql://optuna@db/optuna"
    out = absolutize(apply_values(Config(), {"search.study_storage": url, "data.root": "/abs/root"}))
    assert out.search.study_storage == url and out.data.root == Path("/abs/root")
    assert out.teacher.checkpoint is None and out.synthetic.pretrained_path is None
    assert out.cache.dir == tmp_path / "runs" / "cache"


def test_a_search_resolves_every_path_and_the_tracking_uri(tmp_path, monkeypatch):
    """Trials run in other folders (and on other nodes): the search hands them absolute paths only. A
    relative synthetic.pretrained_path used to be left relative and would have failed in every trial."""
    from tskd_tune.search import absolutize

    monkeypatch.chdir(tmp_path)
    cfg = validate(
        {
            "synthetic": {"generator": "pretrained", "pretrained_path": "pipe"},
            "teacher": {"checkpoint": "w.safetensors"},
            "tracking": {"uri": "sqlite:///runs/m.db"},
        }
    )
    out = absolutize(cfg)
    assert (
        out.synthetic.pretrained_path == tmp_path / "pipe"
        and out.teacher.checkpoint == tmp_path / "w.safetensors"
    )
    assert (
        out.cache.dir == tmp_path / "runs" / "cache" and out.tracking.uri == f"sqlite:///{tmp_path}/runs/m.db"
    )
