"""The search space as data: YAML distributions -> ``optuna.distributions``.

A space maps dotted config paths to distributions::

    search:
      space:
        teacher.lora.rank: {type: choice, values: [2, 4, 8, 16]}
        distill.temperature: {type: uniform, low: 1.0, high: 8.0}
        student.lr: {type: loguniform, low: 1.0e-4, high: 1.0e-2}
        teacher.lora.alpha: {type: int, low: 4, high: 32, step: 4}
        synthetic.ratio: {type: quniform, low: 0.0, high: 2.0, q: 0.5}

This module is a leaf: the config schema uses its distributions as a field type, and the checks of a
space against the config (``tskd_tune.config.validate.check_space``) live with the other config checks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    import optuna


class _Dist(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    def boundary_values(self) -> list[Any]:
        """Values that must all be valid for the config field (ends of ranges, every choice)."""
        return [self.low, self.high]  # type: ignore[attr-defined]

    def contains(self, value: Any) -> bool:
        """Whether ``value`` is one this distribution can propose (a warm start's trials must be)."""
        number = isinstance(value, int | float) and not isinstance(value, bool)
        return number and self.low <= value <= self.high  # type: ignore[attr-defined]

    def describe(self) -> str:
        fields = self.model_dump(exclude={"type"}, exclude_defaults=True)
        return f"{self.type}(" + ", ".join(f"{k}={v}" for k, v in fields.items()) + ")"  # type: ignore[attr-defined]


def _check_range(low: float, high: float) -> None:
    if not low < high:
        raise ValueError(f"`low < high` must hold, but got (low={low}, high={high})")


class Uniform(_Dist):
    type: Literal["uniform"]
    low: float
    """Lower bound (inclusive)."""
    high: float
    """Upper bound."""

    @model_validator(mode="after")
    def _range(self):
        _check_range(self.low, self.high)
        return self

    def to_optuna(self):
        import optuna

        return optuna.distributions.FloatDistribution(self.low, self.high)


class LogUniform(_Dist):
    type: Literal["loguniform"]
    low: float = Field(gt=0)
    """Lower bound (> 0)."""
    high: float
    """Upper bound."""

    @model_validator(mode="after")
    def _range(self):
        _check_range(self.low, self.high)
        return self

    def to_optuna(self):
        import optuna

        return optuna.distributions.FloatDistribution(self.low, self.high, log=True)


class QUniform(_Dist):
    type: Literal["quniform"]
    low: float
    """Lower bound (a grid point)."""
    high: float
    """Upper bound (must lie on the grid low + k*q)."""
    q: float = Field(gt=0)
    """Grid step."""

    @model_validator(mode="after")
    def _range(self):
        _check_range(self.low, self.high)
        steps = (self.high - self.low) / self.q
        if not math.isclose(steps, round(steps), abs_tol=1e-9):
            raise ValueError(
                f"`high - low` must be a multiple of q, but got (low={self.low}, high={self.high}, q={self.q})"
            )
        return self

    def contains(self, value: Any) -> bool:
        on_grid = super().contains(value) and math.isclose(
            (value - self.low) / self.q, round((value - self.low) / self.q), abs_tol=1e-9
        )
        return bool(on_grid)

    def to_optuna(self):
        import optuna

        return optuna.distributions.FloatDistribution(self.low, self.high, step=self.q)


class IntRange(_Dist):
    type: Literal["int"]
    low: int
    """Lower bound (inclusive)."""
    high: int
    """Upper bound (inclusive)."""
    step: int = Field(1, ge=1)
    """Spacing of allowed values."""
    log: bool = False
    """Sample on a log scale (step must be 1)."""

    @model_validator(mode="after")
    def _range(self):
        _check_range(self.low, self.high)
        if self.log and (self.low < 1 or self.step != 1):
            raise ValueError(
                f"log int ranges need low >= 1 and step 1, but got (low={self.low}, step={self.step})"
            )
        if (self.high - self.low) % self.step:
            raise ValueError(
                f"`high - low` must be a multiple of step, but got (low={self.low}, high={self.high}, step={self.step})"
            )
        return self

    def contains(self, value: Any) -> bool:
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        return whole and super().contains(value) and (int(value) - self.low) % self.step == 0

    def to_optuna(self):
        import optuna

        return optuna.distributions.IntDistribution(self.low, self.high, log=self.log, step=self.step)


class Choice(_Dist):
    type: Literal["choice"]
    values: list[Any] = Field(min_length=1)
    """The candidate values (scalars: Optuna stores categorical choices as null/bool/int/float/str)."""

    @model_validator(mode="after")
    def _unique(self):
        odd = [v for v in self.values if v is not None and not isinstance(v, bool | int | float | str)]
        if odd:
            raise ValueError(f"choice values must be null, bool, int, float or str, but got {odd[0]!r}")
        if len({repr(v) for v in self.values}) != len(self.values):
            raise ValueError(f"values must be distinct, but got {self.values}")
        return self

    def boundary_values(self) -> list[Any]:
        return list(self.values)

    def contains(self, value: Any) -> bool:
        return any(
            value == v and type(value) is type(v) or (value == v and {type(value), type(v)} <= {int, float})
            for v in self.values
        )

    def to_optuna(self):
        import optuna

        return optuna.distributions.CategoricalDistribution(self.values)


Distribution = Annotated[Uniform | LogUniform | QUniform | IntRange | Choice, Field(discriminator="type")]
DISTRIBUTION_TYPES = ("uniform", "loguniform", "quniform", "int", "choice")


def to_optuna(space: dict[str, Any]) -> dict[str, optuna.distributions.BaseDistribution]:
    """The search space as the ``{path: optuna distribution}`` mapping that OptunaSearch takes."""
    return {path: dist.to_optuna() for path, dist in space.items()}


def describe_space(space: dict[str, Any]) -> list[tuple[str, str]]:
    """(path, distribution) rows for printing."""
    return [(path, dist.describe()) for path, dist in space.items()]


PARAM_LIMIT = 6000
"""The longest param value MLflow stores (``mlflow.utils.validation.MAX_PARAM_VAL_LENGTH``)."""


def space_params(space: dict[str, Any]) -> dict[str, str]:
    """The space as run params, ``space.<path>`` -> its distribution (``space.student.lr`` ->
    ``loguniform(low=0.0001, high=0.01)``); a value too long for MLflow (a choice of many values) is cut
    to :data:`PARAM_LIMIT` characters, ending in ``…``."""
    out = {}
    for path, text in describe_space(space):
        out[f"space.{path}"] = text if len(text) <= PARAM_LIMIT else text[: PARAM_LIMIT - 1] + "…"
    return out
