"""What a long-running command says to its user, one line at a time (see :class:`Reporter`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console


class Reporter:
    """Every line a search prints goes through here.

    A line is plain text: the paths, URIs and commands in it are never read as rich markup (``[`` in a path
    or a ``--set`` override stays as typed). Warnings are yellow. Live displays (the trial table, the
    teacher-feature progress bars) draw on :attr:`console`, the same terminal.
    """

    def __init__(self, console: Console) -> None:
        self.console = console

    def line(self, text: str) -> None:
        """One line of progress or result."""
        self.console.print(text, markup=False)

    def warn(self, text: str) -> None:
        """One line the user should act on (a premise that does not hold, a teacher below scratch)."""
        self.console.print(text, style="yellow", markup=False)
