"""Errors the installer reports to the operator.

Bad input (config, arguments) is a list of problems, one line each, exit code 2.
A failure while applying is one `InstallError`, exit code 1.
"""

from __future__ import annotations

from dataclasses import dataclass

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the input: where, and what is expected instead."""

    field: str
    message: str

    def line(self, source: str) -> str:
        if self.field:
            return f"{source}: {self.field}: {self.message}"
        return f"{source}: {self.message}"


class ConfigError(Exception):
    """The config file cannot be used; `problems` says why, one per line."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        super().__init__(f"{source}: {len(problems)} problem(s)")
        self.source = source
        self.problems = problems

    def lines(self) -> list[str]:
        return [p.line(self.source) for p in self.problems]


class InstallError(Exception):
    """A step failed while applying the plan (exit code 1)."""


class UsageError(Exception):
    """The command was called in a way that cannot work (exit code 2)."""
