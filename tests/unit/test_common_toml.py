"""common.toml: one problem per line, `FILE: field.path: problem, expected`, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.toml import REQUIRED, Checker, Problem, Problems, kind


def lines(data: bytes, checker: type[Checker] = Checker) -> list[str]:
    with pytest.raises(Problems) as e:
        checker("f.toml").read_bytes(data)
    return e.value.lines()


def test_problem_prints_file_path_and_message() -> None:
    assert str(Problem("f.toml", "a.b", "is a string, expected true or false")) == (
        "f.toml: a.b: is a string, expected true or false"
    )
    assert str(Problem("f.toml", "", "cannot read it")) == "f.toml: cannot read it"


def test_problems_carries_every_problem_and_prints_one_line_each() -> None:
    e = Problems([Problem("f", "a", "x"), Problem("f", "b", "y")])
    assert e.lines() == ["f: a: x", "f: b: y"] and str(e) == "f: a: x\nf: b: y"


def test_reads_toml() -> None:
    assert Checker("f.toml").read_bytes(b'a = 1\n[t]\nb = "x"\n') == {"a": 1, "t": {"b": "x"}}


def test_syntax_error_is_one_problem_with_line_and_column() -> None:
    assert lines(b'a = 1\nb = "x"\nc = \n') == [
        "f.toml: line 3, column 5: invalid value, expected valid TOML"
    ]


def test_syntax_error_at_the_end_has_no_line() -> None:
    assert lines(b"a = [") == ["f.toml: file: invalid value, expected valid TOML"]


def test_not_utf8_says_where() -> None:
    assert lines(b'a = "\xff"') == ["f.toml: file: not UTF-8 at byte 5"]


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(Problems) as e:
        Checker("x").read_file(tmp_path / "nope.toml")
    assert e.value.lines() == ["x: file: cannot read it (No such file or directory)"]


def test_read_file(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text("a = true\n")
    assert Checker(str(path)).read_file(path) == {"a": True}


class Terse(Checker):
    """Another wording of the problems with the file as a whole."""

    class Error(Problems):
        pass

    error = Error
    whole_file = ""
    not_utf8 = "binary ({reason})"
    bad_syntax = "TOML: {message}"


def test_a_subclass_words_file_problems_its_own_way() -> None:
    assert lines(b"a = \n", Terse) == ["f.toml: line 1, column 5: TOML: Invalid value"]
    assert lines(b"a = [", Terse) == ["f.toml: TOML: Invalid value (at end of document)"]
    assert lines(b'a = "\xff"', Terse) == ["f.toml: binary (invalid start byte)"]
    with pytest.raises(Terse.Error):
        Terse("f").read_bytes(b"[")


def test_a_subclass_words_wrong_types_its_own_way() -> None:
    class Backwards(Checker):
        def mistyped(self, value: object, expected: str) -> str:
            return f"expected {expected}, got {kind(value)}"

    c = Backwards("f.toml")
    assert c.get({"a": [1]}, "a", "t", str) is None
    assert [str(p) for p in c.problems] == ["f.toml: t.a: expected a string, got an array"]


def test_kind_names_toml_types() -> None:
    values: tuple[object, ...] = (True, 1, 1.5, "s", [], {})
    names = [kind(v) for v in values]
    assert names == ["a boolean", "an integer", "a float", "a string", "an array", "a table"]


def test_getters_collect_every_problem_and_fail_raises_them_all() -> None:
    c = Checker("f.toml")
    raw = {"s": 1, "b": "yes", "n": True, "l": ["a", 2], "t": {"x": 1, "y": 2}}
    assert c.string(raw, "s", "top", "dflt") == "dflt"
    assert c.boolean(raw, "b", "top", False) is False
    assert c.integer(raw, "n", "top", 7, 1, 10) == 7  # true is not an integer
    assert c.strings(raw, "l", "top") == []
    assert c.table(raw, "t", "top", ["x"]) == {"x": 1, "y": 2}
    assert c.get(raw, "missing", "top", str) is None
    assert [str(p) for p in c.problems] == [
        "f.toml: top.s: is an integer, expected a string",
        "f.toml: top.b: is a string, expected true or false",
        "f.toml: top.n: True, expected an integer from 1 to 10",
        "f.toml: top.l: is an array, expected a list of strings",
        "f.toml: top.t.y: unknown key, expected one of: x",
        "f.toml: top.missing: missing, expected a string",
    ]
    with pytest.raises(Problems) as e:
        c.fail()
    assert len(e.value.problems) == 6


def test_getters_pass_good_values_and_defaults() -> None:
    c = Checker("f.toml")
    raw = {"s": "x", "b": True, "n": 5, "l": ["a"], "t": {"x": 1}}
    assert c.string(raw, "s", "") == "x" and c.string(raw, "absent", "") is None
    assert c.boolean(raw, "b", "", False) is True and c.boolean(raw, "absent", "", True) is True
    assert c.integer(raw, "n", "", 1, 1, 10) == 5 and c.integer(raw, "absent", "", 3, 1, 10) == 3
    assert c.strings(raw, "l", "") == ["a"] and c.strings(raw, "absent", "") == []
    assert c.table(raw, "t", "", ["x"]) == {"x": 1} and c.table(raw, "absent", "") == {}
    assert c.get(raw, "n", "", int, REQUIRED) == 5
    assert c.problems == []


def test_a_table_that_is_not_one_names_its_path() -> None:
    c = Checker("f.toml")
    assert c.table({"site": 3}, "site", "") == {}
    assert [str(p) for p in c.problems] == ["f.toml: site: is an integer, expected a table [site]"]


def test_array_elements_are_counted_from_one() -> None:
    from common.toml import nth

    assert nth("users", 0) == "users[1]" and nth("a.b", 2) == "a.b[3]"


def test_an_unknown_key_close_to_a_known_one_says_did_you_mean() -> None:
    c = Checker("f.toml")
    c.unknown_keys({"naem": 1, "zzzz": 2, "name": 3}, "t", ["name", "address"])
    assert [str(p) for p in c.problems] == [
        "f.toml: t.naem: unknown key (did you mean 'name'?), expected one of: name, address",
        "f.toml: t.zzzz: unknown key, expected one of: name, address",
    ]
