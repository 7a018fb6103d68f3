"""User-facing errors: each one prints as a single line and exits with status 2, never a traceback."""

from __future__ import annotations


class TskdError(Exception):
    """A problem the user can fix (bad file, bad field, missing data); printed as one line."""

    exit_code = 2

    def lines(self) -> list[str]:
        return [str(self)]


class ConfigError(TskdError):
    """One or more problems in a config file, each naming its YAML path and the offending value."""

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__("; ".join(self.lines()))

    def lines(self) -> list[str]:
        prefix = f"{self.source}: " if self.source else ""
        return [f"{prefix}{p}" for p in self.problems]


class DataError(TskdError):
    """A dataset that cannot be read as its layout promises; the message names the file."""


class StorageError(TskdError):
    """A folder that cannot be written (full disk, read-only, no permission); names the path."""


class TrialFailed(TskdError):
    """A trial that cannot go on (non-finite loss, hang, ...); recorded as failed, never as a score."""

    exit_code = 3
