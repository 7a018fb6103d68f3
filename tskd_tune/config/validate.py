"""From a raw mapping to a valid Config: pydantic errors as one line each, then cross-field checks.

Every problem is reported as ``yaml.path: message, got value`` so that a user can find it in the file.
Validation runs in two phases: pydantic checks each field, then the checks that need the whole tree
(dataset options and class names, loss weights, the generator, the search objectives and the search
space). Loading a file, applying sampled values and resolving path fields all end in :func:`validate`
or keep its result valid.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from tskd_tune.config.schema import OBJECTIVE_METRICS, PATH_FIELDS, Config, DataConfig, SearchConfig
from tskd_tune.config.yaml_io import read_yaml, set_by_path
from tskd_tune.errors import ConfigError, DataError
from tskd_tune.kinds import STUDENT_KINDS, generator_kind, names_where, student_kind
from tskd_tune.space import DISTRIBUTION_TYPES

# ---------------------------------------------------------------------------------- error messages
_RULES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "too_short": "must have at least {min_length} item(s)",
    "too_long": "must have at most {max_length} item(s)",
}


def _path(loc: tuple) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts)


def _strip_tags(loc: tuple, value_tags: set[str]) -> tuple:
    # discriminated unions add the tag name (e.g. 'uniform') to the location; it is not a YAML key
    return tuple(x for x in loc if not (isinstance(x, str) and x in value_tags))


def _num(v: Any) -> Any:
    return int(v) if isinstance(v, float) and v.is_integer() else v


def format_error(err: dict, prefix: str = "") -> str:
    """One line for one pydantic error: ``path: message, got value``."""
    loc = _strip_tags(tuple(err["loc"]), set(DISTRIBUTION_TYPES))
    path = prefix + _path(loc) if loc else prefix.rstrip(".") or "(top level)"
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        return f"{path}: unknown key"
    if kind == "missing":
        return f"{path}: required"
    if kind in _RULES:
        msg = _RULES[kind].format(**{k: _num(v) for k, v in ctx.items()})
    elif kind == "literal_error":
        msg = f"must be one of {ctx.get('expected')}"
    elif kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        return f"{path}: {msg}"
    else:
        msg = err["msg"][0].lower() + err["msg"][1:]
    return f"{path}: {msg}, got {err.get('input')!r}"


# ------------------------------------------------------------------------------------------ checks
def validate(raw: dict, source: str | None = None, *, check_search_space: bool = True) -> Config:
    """Validate a raw mapping into a Config; raise ConfigError listing every problem with its path."""
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError([format_error(e) for e in exc.errors()], source) from None
    problems = _cross_checks(cfg, check_search_space)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def _cross_checks(cfg: Config, check_search_space: bool) -> list[str]:
    """Problems that involve more than one field; the search space is checked only on a sound config."""
    problems = check_data_config(cfg.data)
    d = cfg.distill
    if d.method == "ts_kd" and d.kd_weight == 0 and d.sup_weight == 0:
        problems.append("distill: kd_weight and sup_weight are both 0, so the student learns nothing")
    for where, methods in (("distill.method", [d.method]), ("search.baselines", cfg.search.baselines)):
        # masked-image modelling drops patch tokens: only a ViT encoder can run on the visible ones alone
        if "mae" in methods and not student_kind(cfg.student.model).vit:
            problems.append(
                f"{where}: mae pretrains a ViT student's encoder "
                f"(student.model: {names_where(STUDENT_KINDS, 'vit')}), got {cfg.student.model}"
            )
    if cfg.teacher.head_problem():
        problems.append(cfg.teacher.head_problem())
    for section in ("teacher", "student"):
        weights = getattr(cfg, section)
        if weights.ce_weight == 0 and weights.dice_weight == 0:
            problems.append(
                f"{section}: ce_weight and dice_weight are both 0, so the {section} learns nothing from labels"
            )
    synthetic = cfg.synthetic
    generator = generator_kind(synthetic.generator)
    if generator.folder and synthetic.pretrained_path is None:
        problems.append("synthetic.pretrained_path: required when synthetic.generator is pretrained")
    levels = 2 ** (len(synthetic.channels) - 1)
    size = synthetic.image_size or cfg.data.image_size
    if generator.trained and size % levels:
        problems.append(
            f"synthetic.image_size: must be divisible by {levels} (the UNet halves it "
            f"{len(synthetic.channels) - 1} time(s)), got {size}"
        )
    if cfg.search.scheduler != "fifo" and (cfg.search.grace_period or 0) > cfg.student.epochs:
        problems.append(
            f"search.grace_period: must be <= student.epochs ({cfg.student.epochs}), "
            f"got {cfg.search.grace_period}"
        )
    problems += _objective_checks(cfg.search)
    problems += _strategy_checks(cfg)
    if check_search_space and not problems:
        problems += check_space(cfg)
    return problems


def check_data_config(data: DataConfig) -> list[str]:
    """Cross-field problems of ``data``: unknown adapter, bad options, class count, missing root."""
    # Imported here rather than at the top: importing tskd_tune.config.schema (as the data layer does)
    # runs this package's __init__, and so this module, first; at the top this import could then meet
    # tskd_tune.data half-initialised.
    from tskd_tune.data.adapters import get_adapter
    from tskd_tune.data.lateral import pair_problems

    try:
        adapter = get_adapter(data.dataset)
    except DataError as exc:
        return [str(exc)]
    try:
        opts = adapter.options.model_validate(data.options)
    except ValidationError as exc:
        return [format_error(e, prefix="data.options.") for e in exc.errors()]
    problems = []
    default = adapter.classes(opts)
    if data.classes is not None and len(data.classes) != len(default):
        problems.append(
            f"data.classes: {data.dataset} with these options has {len(default)} classes "
            f"({', '.join(default)}), got {len(data.classes)} ({', '.join(data.classes)})"
        )
    if data.classes is not None and len(set(data.classes)) != len(data.classes):
        problems.append(f"data.classes: names must be distinct, got {data.classes}")
    problems += pair_problems(data.classes if data.classes is not None else default, data.lateral_pairs)
    if adapter.needs_root and data.root is None:
        problems.append(
            f"data.root: required for dataset {data.dataset!r} (expected layout: {adapter.layout})"
        )
    return problems


def _strategy_checks(cfg: Config) -> list[str]:
    s = cfg.search
    if s.strategy != "staged":
        return []
    problems = []
    if not any(k.startswith("teacher.") for k in s.space):
        problems.append(
            "search.strategy: staged searches the teacher.* knobs first, but search.space has none; use joint"
        )
    if cfg.distill.method != "ts_kd" or "distill.method" in s.space:
        problems.append(
            f"search.strategy: staged distils the best fine-tuned teachers, so distill.method must be ts_kd "
            f"(and not searched), got {cfg.distill.method!r}"
        )
    return problems


def _objective_checks(s: SearchConfig) -> list[str]:
    problems = [
        f"search.objectives.{m}: not a reported metric (one of {', '.join(OBJECTIVE_METRICS)})"
        for m in s.objectives
        if m not in OBJECTIVE_METRICS
    ]
    if s.objectives and len(s.objectives) < 2:
        problems.append(
            "search.objectives: needs at least two metrics; for one, use search.metric and search.mode"
        )
    elif s.objectives and s.scheduler != "fifo":
        problems.append(
            f"search.scheduler: {s.scheduler} needs a single objective; use fifo with search.objectives, "
            f"got {s.scheduler!r}"
        )
    elif s.objectives and "metric" in s.model_fields_set and s.metric != next(iter(s.objectives)):
        problems.append(
            f"search.metric: the first of search.objectives sorts a multi-objective search, got {s.metric!r}"
        )
    return problems


def _field_exists(cfg: BaseModel, dotted: str) -> str | None:
    """None when ``dotted`` names a config field (or a key inside a free-form mapping); else the problem."""
    node: Any = cfg
    keys = dotted.split(".")
    for i, key in enumerate(keys):
        if isinstance(node, BaseModel):
            if key not in type(node).model_fields:
                where = ".".join(keys[:i]) or "the config"
                known = ", ".join(type(node).model_fields)
                return f"no field {key!r} in {where} (fields: {known})"
            node = getattr(node, key)
        elif isinstance(node, dict):
            return None  # free-form mappings (model_kwargs, data.options) accept any key
        else:
            return f"{'.'.join(keys[:i])} is a value, not a section"
    if isinstance(node, BaseModel):
        return f"{dotted} is a section; search a field inside it"
    return None


def check_space(cfg: Config) -> list[str]:
    """Problems of ``cfg.search.space``: unknown paths, and range ends or choices the config rejects."""
    problems = []
    if "search" in {p.split(".")[0] for p in cfg.search.space}:
        problems.append("search.space: the search section itself cannot be searched")
        return problems
    for path, dist in cfg.search.space.items():
        missing = _field_exists(cfg, path)
        if missing:
            problems.append(f"search.space.{path}: {missing}")
            continue
        for value in dist.boundary_values():
            try:
                apply_values(cfg, {path: value})
            except ConfigError as exc:
                problems.append(
                    f"search.space.{path}: {dist.describe()} allows {value!r}, but {exc.problems[0]}"
                )
                break
    for i, point in enumerate(cfg.search.points_to_evaluate):
        unknown = sorted(set(point) - set(cfg.search.space))
        if unknown:
            problems.append(f"search.points_to_evaluate[{i}]: {', '.join(unknown)} not in search.space")
            continue
        try:
            apply_values(cfg, point)
        except ConfigError as exc:
            problems.append(f"search.points_to_evaluate[{i}]: {exc.problems[0]}")
    return problems


# ------------------------------------------------------------------------------------------ loading
def load_config(path: Path | str, overrides: dict[str, Any] | None = None) -> Config:
    """Load a search-space YAML, apply ``--set`` overrides by dotted path and validate the result."""
    path = Path(path)
    raw = read_yaml(path)
    for key, value in (overrides or {}).items():
        set_by_path(raw, key, value)
    cfg = validate(raw, str(path))
    if cfg.name is None:
        cfg = cfg.model_copy(update={"name": path.stem})
    return cfg


def apply_values(cfg: Config, values: dict[str, Any]) -> Config:
    """Return a copy of ``cfg`` with sampled values set by dotted path, re-validated."""
    raw = copy.deepcopy(cfg.model_dump(mode="json", exclude_none=False))
    for key, value in values.items():
        set_by_path(raw, key, value)
    # the space itself is unchanged by applying values from it, so it is not re-checked
    return validate(raw, check_search_space=False)


def apply_search_overrides(cfg: Config, num_samples: int | None, max_concurrent: int | None) -> Config:
    """Apply `launch --num-samples/--max-concurrent` (they override search.* like --set would)."""
    values = {}
    if num_samples is not None:
        values["search.num_samples"] = num_samples
    if max_concurrent is not None:
        values["search.max_concurrent"] = max_concurrent
    return apply_values(cfg, values) if values else cfg


def absolutize(cfg: Config) -> Config:
    """A copy of ``cfg`` with every path in PATH_FIELDS made absolute against the working directory.

    Unset fields and URLs (search.study_storage on a database) are left as they are; nothing is re-validated.
    """
    out = cfg
    for dotted, value in path_values(cfg).items():
        resolved = Path(value).resolve()
        out = _replace(out, dotted, resolved if isinstance(value, Path) else str(resolved))
    return out


def path_values(cfg: Config) -> dict[str, Path | str]:
    """The set path fields of ``cfg`` (PATH_FIELDS order), URLs left out: what must resolve on every node."""
    out = {}
    for dotted in PATH_FIELDS:
        value = _get(cfg, dotted)
        if value and not (isinstance(value, str) and "://" in value):
            out[dotted] = value
    return out


def _get(model: BaseModel, dotted: str) -> Any:
    for key in dotted.split("."):
        model = getattr(model, key)
    return model


def _replace(model: BaseModel, dotted: str, value: Any) -> BaseModel:
    # model_copy, not apply_values: a resolved path is as valid as the relative one, and re-validating
    # would re-read the data adapter's options and the search space for nothing
    key, _, rest = dotted.partition(".")
    new = _replace(getattr(model, key), rest, value) if rest else value
    return model.model_copy(update={key: new})
