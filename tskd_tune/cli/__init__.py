"""The `tskd-tune` command line. Bad input exits 2 with one line per problem, never a traceback.

Commands live in :mod:`.trial` (one config or trial) and :mod:`.search` (a search); :mod:`.app` holds the
typer app they register on.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

# typer >= 0.22 vendors click; its exceptions live here, not in the `click` package
from typer._click import exceptions as click_exc

from tskd_tune.cli import cache, search, trial  # noqa: F401  (each registers its commands on the app)
from tskd_tune.cli.app import app
from tskd_tune.cli.search import ui_command
from tskd_tune.errors import TskdError

__all__ = ["app", "main", "run", "ui_command"]


def main(argv: list[str] | None = None) -> int:
    """Console entry point: turns every user error into one line on stderr and exit status 2."""
    from tskd_tune.tracking import mask_secrets

    err = Console(stderr=True, highlight=False)
    try:
        rv = app(args=argv, standalone_mode=False, prog_name="tskd-tune")
    except TskdError as exc:
        for line in exc.lines():
            err.print(f"error: {mask_secrets(line)}", markup=False, soft_wrap=True)
        return exc.exit_code
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        err.print("interrupted")
        return 130
    except click_exc.NoArgsIsHelpError as exc:
        exc.show()  # the help text, as for --help
        return 2
    except click_exc.UsageError as exc:
        cmd = exc.ctx.command_path if exc.ctx else "tskd-tune"
        msg = mask_secrets(exc.format_message())
        err.print(f"error: {cmd}: {msg} (see {cmd} --help)", markup=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    return rv if isinstance(rv, int) else 0


def run() -> None:
    """The `tskd-tune` console script."""
    leave(main())


def leave(code: int) -> None:
    """Exit with ``code``. After a command that started Ray in this process (launch, resume), the interpreter's
    own teardown of the extension modules (Ray's core, torch, ...) takes about 3.5 s on 2 cores once everything
    is written (measured: docs/BENCHMARKS.md, orchestration): Ray is stopped, the exit handlers run (logging,
    MLflow, ...), the streams are flushed, and the process leaves at once."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        sys.exit(code)
    import atexit
    import os

    ray.shutdown()
    atexit._run_exitfuncs()  # what a normal exit runs; os._exit skips only the modules' teardown
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
