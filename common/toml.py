"""Reading an operator's TOML file into plain data, and reporting what is wrong with it.

Every problem is one line, `FILE: field.path: what is wrong, what is expected`,
and a reader goes on after the first one so that the operator sees all of them
at once (`Checker.fail` raises them together). The policy and the installer
each subclass `Checker` with their own sections; what both need lives here:
reading the file (UTF-8, TOML syntax with line and column), the typed getters,
unknown keys, and how a value's type is named.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

REQUIRED: Any = object()  # a getter's default: the key must be there

# What a getter expects of each TOML type, in the words of a problem.
EXPECTED = {
    str: "a string",
    bool: "true or false",
    int: "an integer",
    float: "a number",
    list: "an array",
    dict: "a table",
}

_AT = re.compile(r"^(?P<text>.*?)\s*\(at line (?P<line>\d+), column (?P<column>\d+)\)$", re.S)


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a file: where (a field path, or none for the whole file), and what."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        if self.path:
            return f"{self.file}: {self.path}: {self.message}"
        return f"{self.file}: {self.message}"


class Problems(Exception):
    """A file that cannot be used, with every problem found in it."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.lines()))

    def lines(self) -> list[str]:
        return [str(p) for p in self.problems]


def kind(value: object) -> str:
    """A TOML value's type as a problem names it: "a string", "an array", ..."""
    if isinstance(value, bool):
        return "a boolean"
    for t, name in ((int, "an integer"), (float, "a float"), (str, "a string"),
                    (list, "an array"), (dict, "a table")):  # fmt: skip
        if isinstance(value, t):
            return name
    return f"a {type(value).__name__}"


def has_type(value: object, t: type) -> bool:
    """isinstance, except that true and false are never integers."""
    return isinstance(value, t) and not (t is int and isinstance(value, bool))


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def nth(path: str, i: int) -> str:
    """The path of the element at 0-based index `i` of an array, counted
    from 1 as an operator counts (`users[1]` is the first user)."""
    return f"{path}[{i + 1}]"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A hint naming the closest of `choices` to a typo, or the empty string."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Checker:
    """Collects the problems of one file while its data is read.

    The class attributes word the problems with the file as a whole; a
    subclass may word them its own way (the installer does, its tests pin it).
    """

    error: type[Problems] = Problems  # what `fail` raises
    whole_file = "file"  # the path of a problem with the file as a whole
    unreadable = "cannot read it ({reason})"
    not_utf8 = "not UTF-8 at byte {start}"
    # {message}: tomllib's words less the line and column, which go into the path;
    # {lower}: the same lower-cased, without "(at end of document)" either
    bad_syntax = "{lower}, expected valid TOML"

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[Problem] = []

    # -- reading -------------------------------------------------------------
    def read_file(self, path: str | Path) -> dict[str, Any]:
        """The file's data; `error` at once if it cannot be read or is not TOML."""
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            self.fail_with(self.whole_file, self.unreadable.format(reason=e.strerror))
        return self.read_bytes(data)

    def read_bytes(self, data: bytes) -> dict[str, Any]:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.fail_with(self.whole_file, self.not_utf8.format(start=e.start, reason=e.reason))
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            said = str(e)
            m = _AT.match(said)
            where = f"line {m['line']}, column {m['column']}" if m else self.whole_file
            message = m["text"] if m else said
            lower = re.sub(r"\s*\(at .*\)$", "", message).lower()
            self.fail_with(where, self.bad_syntax.format(message=message, lower=lower))

    # -- problems ------------------------------------------------------------
    def bad(self, path: str, message: str) -> None:
        self.problems.append(Problem(self.file, path, message))

    def mistyped(self, value: object, expected: str) -> str:
        """The message for a value of the wrong type."""
        return f"is {kind(value)}, expected {expected}"

    def fail(self) -> NoReturn:
        raise self.error(self.problems)

    def fail_with(self, path: str, message: str) -> NoReturn:
        self.bad(path, message)
        self.fail()

    # -- typed getters ---------------------------------------------------------
    def get(
        self,
        raw: Mapping[str, Any],
        key: str,
        path: str,
        t: type,
        default: Any = REQUIRED,
        expected: str | None = None,
    ) -> Any:
        """raw[key] if it is a `t`; `default` if it is absent or of another type
        (None if there is no default); every problem reported at `path.key`."""
        expected = expected or EXPECTED[t]
        if key not in raw:
            if default is REQUIRED:
                self.bad(join(path, key), f"missing, expected {expected}")
                return None
            return default
        value = raw[key]
        if has_type(value, t):
            return value
        self.bad(join(path, key), self.mistyped(value, expected))
        return None if default is REQUIRED else default

    def string(
        self, raw: Mapping[str, Any], key: str, path: str, default: str | None = None
    ) -> Any:
        return self.get(raw, key, path, str, default)

    def boolean(self, raw: Mapping[str, Any], key: str, path: str, default: bool) -> bool:
        return self.get(raw, key, path, bool, default)

    def strings(self, raw: Mapping[str, Any], key: str, path: str) -> list[str]:
        value = self.get(raw, key, path, list, [], "a list of strings")
        if all(isinstance(x, str) for x in value):
            return value
        self.bad(join(path, key), self.mistyped(value, "a list of strings"))
        return []

    def integer(
        self, raw: Mapping[str, Any], key: str, path: str, default: int, lo: int, hi: int
    ) -> int:
        value = raw.get(key, default)
        if has_type(value, int) and lo <= value <= hi:
            return value
        self.bad(join(path, key), f"{value!r}, expected an integer from {lo} to {hi}")
        return default

    def table(
        self, raw: Mapping[str, Any], key: str, path: str, allowed: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """raw[key] as a table ({} if absent or not one); its unknown keys
        reported when `allowed` says which it may have."""
        where = join(path, key)
        value = self.get(raw, key, path, dict, {}, f"a table [{where}]")
        if allowed is not None:
            self.unknown_keys(value, where, allowed)
        return value

    def unknown_keys(self, raw: Mapping[str, Any], path: str, allowed: Iterable[str]) -> None:
        allowed = list(allowed)
        for key in raw:
            if key not in allowed:
                self.bad(
                    join(path, key),
                    f"unknown key{did_you_mean(key, allowed)}, "
                    f"expected one of: {', '.join(allowed) or 'none'}",
                )
