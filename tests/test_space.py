import optuna
import pytest

from tskd_tune.config import validate
from tskd_tune.errors import ConfigError
from tskd_tune.space import to_optuna

REQUIRED = {
    "teacher.lora.rank": {"type": "choice", "values": [2, 4, 8]},
    "teacher.lora.alpha": {"type": "int", "low": 4, "high": 32, "step": 4},
    "distill.temperature": {"type": "uniform", "low": 1.0, "high": 8.0},
    "distill.kd_weight": {"type": "uniform", "low": 0.0, "high": 2.0},
    "distill.sup_weight": {"type": "quniform", "low": 0.0, "high": 2.0, "q": 0.5},
    "synthetic.ratio": {"type": "quniform", "low": 0.0, "high": 2.0, "q": 0.25},
    "student.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    "teacher.lr": {"type": "loguniform", "low": 1e-4, "high": 1e-2},
    "student.epochs": {"type": "int", "low": 2, "high": 64, "log": True},
}


def space_problems(space: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate({"search": {"space": space}})
    return info.value.problems


def test_required_dimensions_turn_into_optuna_distributions():
    cfg = validate({"search": {"space": REQUIRED}})
    dists = to_optuna(cfg.search.space)
    assert dists["teacher.lora.rank"] == optuna.distributions.CategoricalDistribution([2, 4, 8])
    assert dists["teacher.lora.alpha"] == optuna.distributions.IntDistribution(4, 32, step=4)
    assert dists["student.lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    assert dists["synthetic.ratio"] == optuna.distributions.FloatDistribution(0.0, 2.0, step=0.25)
    assert dists["student.epochs"] == optuna.distributions.IntDistribution(2, 64, log=True)


def test_sampled_values_apply_to_the_config():
    from tskd_tune.config import apply_values

    cfg = validate({"search": {"space": REQUIRED}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask(to_optuna(cfg.search.space))
    new = apply_values(cfg, trial.params)
    assert new.teacher.lora.rank == trial.params["teacher.lora.rank"]
    assert new.distill.temperature == pytest.approx(trial.params["distill.temperature"])


def test_unknown_path_is_an_error_listing_the_fields():
    (msg,) = space_problems({"distill.temperatur": {"type": "uniform", "low": 1, "high": 2}})
    assert msg.startswith("search.space.distill.temperatur: no field 'temperatur' in distill (fields:")


def test_range_ends_must_be_valid_for_the_field():
    (msg,) = space_problems({"teacher.lora.rank": {"type": "int", "low": 0, "high": 8}})
    assert msg == (
        "search.space.teacher.lora.rank: int(low=0, high=8) allows 0, but teacher.lora.rank: must be >= 1, got 0"
    )


def test_choice_values_are_checked_against_adapter_options():
    (msg,) = space_problems({"data.options.target": {"type": "choice", "values": ["regions", "liver"]}})
    assert "allows 'liver'" in msg and "data.options.target: must be one of" in msg


@pytest.mark.parametrize(
    "dist, expected",
    [
        ({"type": "uniform", "low": 3, "high": 2}, "`low < high` must hold, but got (low=3.0, high=2.0)"),
        ({"type": "loguniform", "low": 0, "high": 1}, "search.space.student.lr.low: must be > 0, got 0"),
        ({"type": "quniform", "low": 0, "high": 1, "q": 0.3}, "must be a multiple of q"),
        ({"type": "int", "low": 0, "high": 8, "log": True}, "log int ranges need low >= 1"),
        ({"type": "choice", "values": []}, "must have at least 1 item"),
        ({"type": "choice", "values": [[1, 2]]}, "choice values must be null, bool, int, float or str"),
        ({"type": "normal", "low": 0, "high": 1}, "search.space.student.lr: input tag 'normal'"),
        ({"low": 0, "high": 1}, "search.space.student.lr: unable to extract tag"),
    ],
)
def test_bad_distributions(dist, expected):
    got = space_problems({"student.lr": dist})
    assert len(got) == 1 and expected in got[0]


def test_sections_and_search_itself_cannot_be_searched():
    assert "is a section" in space_problems({"teacher.lora": {"type": "choice", "values": [1]}})[0]
    assert "cannot be searched" in space_problems({"search.seed": {"type": "int", "low": 0, "high": 3}})[0]


def test_points_to_evaluate_must_lie_in_the_space():
    space = {"distill.temperature": {"type": "uniform", "low": 1, "high": 8}}
    with pytest.raises(ConfigError) as info:
        validate(
            {
                "search": {
                    "space": space,
                    "points_to_evaluate": [{"student.lr": 0.1}, {"distill.temperature": -1}],
                }
            }
        )
    assert info.value.problems == [
        "search.points_to_evaluate[0]: student.lr not in search.space",
        "search.points_to_evaluate[1]: distill.temperature: must be > 0, got -1",
    ]
