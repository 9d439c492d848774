"""Errors the installer reports to the operator.

Bad input (config, arguments) is a list of problems, one line each, exit code 2.
A failure while applying is one `InstallError`, exit code 1.
"""

from __future__ import annotations

from common.toml import Problem, Problems

__all__ = ["EXIT_FAIL", "EXIT_OK", "EXIT_USAGE", "ConfigError", "InstallError", "Problem",
           "UsageError"]  # fmt: skip

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


class ConfigError(Problems):
    """The config file cannot be used; `problems` says why, one per line."""

    @property
    def source(self) -> str:
        return self.problems[0].file if self.problems else ""


class InstallError(Exception):
    """A step failed while applying the plan (exit code 1)."""


class UsageError(Exception):
    """The command was called in a way that cannot work (exit code 2)."""
