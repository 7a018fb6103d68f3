"""The typer app, its shared options and the console every command prints to (a leaf of the CLI)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="Hyperparameter search for task-specific knowledge distillation (TS-KD) of segmentation models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

out = Console(highlight=False, soft_wrap=True)  # long paths and commands stay copy-pasteable

SpaceArg = Annotated[
    Path, typer.Argument(help="Search-space YAML (config + search space).", show_default=False)
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="Override a config field by dotted path, e.g. --set distill.temperature=2.0 (repeatable).",
    ),
]


def warn(line: str | None) -> None:
    """One warning line on stderr (nothing for None)."""
    if line:
        Console(stderr=True, highlight=False, soft_wrap=True).print(line, style="yellow", markup=False)


def load_cfg(space: Path, overrides: list[str] | None, no_cache: bool = False):
    """The config of ``space`` with ``--set`` overrides; ``--no-cache`` is ``cache.enabled: false``."""
    from tskd_tune.config import load_config, parse_overrides

    values = parse_overrides(overrides) | ({"cache.enabled": False} if no_cache else {})
    return load_config(space, values)
