"""YAML in and out: strict reading (duplicate keys refused), ``--set`` overrides by dotted path, dumping."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tskd_tune.errors import ConfigError

if TYPE_CHECKING:
    from tskd_tune.config.schema import Config


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML loader that rejects duplicate keys instead of silently keeping the last one."""


def _no_duplicates(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (line {mark.line + 1})", mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)


def read_yaml(path: Path) -> dict:
    """Read a YAML mapping safely; any problem becomes a one-line ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(["file not found"], str(path)) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as exc:
        raise ConfigError([f"cannot read: {exc.__class__.__name__}"], str(path)) from None
    try:
        raw = yaml.load(text, Loader=_StrictLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"invalid YAML: {where}{problem}"], str(path)) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError([f"top level must be a mapping, got {type(raw).__name__}"], str(path))
    return raw


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Parse ``--set key.path=value`` items; values are YAML (so lists and numbers get their types)."""
    out: dict[str, Any] = {}
    problems = []
    for item in items or []:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. distill.temperature=2.0")
            continue
        try:
            out[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            problems.append(f"--set {key}: value {value!r} is not valid YAML")
    if problems:
        raise ConfigError(problems)
    return out


def set_by_path(raw: dict, dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``a.b.c``, creating intermediate mappings."""
    keys = dotted.split(".")
    node, i = raw, 0
    while True:
        # search-space keys contain dots themselves ("search.space.student.lr.low"): prefer the longest
        # existing key, so such a key is addressed as one step
        j = next((j for j in range(len(keys), i, -1) if ".".join(keys[i:j]) in node), i + 1)
        key = ".".join(keys[i:j])
        if j == len(keys):
            node[key] = value
            return
        nxt = node.get(key)
        if nxt is None:
            nxt = node[key] = {}
        if not isinstance(nxt, dict):
            raise ConfigError([f"{'.'.join(keys[:j])}: is a value, not a section; cannot set {dotted}"])
        node, i = nxt, j


def to_yaml(cfg: Config) -> str:
    """The resolved config as YAML (what a trial records so that it can be re-run)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False, width=120)
