"""MAC patterns and name templates against brute-force references."""

from __future__ import annotations

import fnmatch
import re

from hypothesis import assume, given, settings
from hypothesis import strategies as st

from controller.policy import macs
from controller.policy.names import Template, can_collide, parse_template

mac_ints = st.integers(0, macs.FULL)
octet_globs = st.sampled_from(["*", "??", "5?", "?4", "00", "52", "fe", "0?", "?1"])


@st.composite
def globs(draw: st.DrawFn) -> str:
    n = draw(st.integers(1, 6))
    parts = [draw(octet_globs) for _ in range(n)]
    if n < 6:
        parts.append("*")
    return ":".join(parts)


@given(globs(), mac_ints)
def test_glob_agrees_with_fnmatch(glob: str, mac: int) -> None:
    pattern = macs.parse_glob(glob)
    text = macs.format_mac(mac)
    # Reference: byte-aligned fnmatch, a trailing '*' covering the remaining octets.
    parts = glob.split(":")
    ref_parts = parts[:-1] + ["*"] * (6 - len(parts) + 1) if len(parts) < 6 else parts
    ref = all(fnmatch.fnmatchcase(o, g) for o, g in zip(text.split(":"), ref_parts, strict=True))
    assert pattern.matches(mac) == ref


@given(mac_ints, st.integers(0, 48))
def test_prefix(mac: int, bits: int) -> None:
    mask = (macs.FULL << (48 - bits)) & macs.FULL
    p = macs.parse_prefix(f"{macs.format_mac(mac & mask)}/{bits}")
    assert p.matches(mac)
    assert p.mask == mask


ternaries = st.builds(lambda v, m: macs.Ternary(v & m, m), mac_ints, mac_ints)


@settings(max_examples=300)
@given(ternaries, ternaries, st.lists(mac_ints, min_size=1, max_size=20))
def test_intersect_and_covers_are_exact(
    a: macs.Ternary, b: macs.Ternary, probes: list[int]
) -> None:
    both = a.intersect(b)
    for m in [*probes, a.value, b.value, a.value | (b.value & ~a.mask)]:
        expected = a.matches(m) and b.matches(m)
        assert (both is not None and both.matches(m)) == expected
        if a.covers(b) and b.matches(m):
            assert a.matches(m)
    if both is None:
        # no MAC matches both: in particular not the value built from both
        assert not (
            a.matches(a.value | (b.value & ~a.mask)) and b.matches(a.value | (b.value & ~a.mask))
        )


def test_random_is_locally_administered_unicast() -> None:
    assert macs.RANDOM.matches(macs.parse_mac("02:00:00:00:00:01"))
    assert macs.RANDOM.matches(macs.parse_mac("52:54:00:00:00:01"))
    assert not macs.RANDOM.matches(macs.parse_mac("00:16:3e:00:00:01"))
    assert not macs.RANDOM.matches(macs.parse_mac("03:00:00:00:00:01"))  # multicast


templates = st.builds(
    lambda p, s, numbered: Template(p, s if numbered else "", numbered),
    st.text("ab1-", min_size=0, max_size=3),
    st.text("ab1-", min_size=0, max_size=3),
    st.booleans(),
)


@settings(max_examples=500, deadline=None)
@given(templates, templates)
def test_collision_matches_enumeration(a: Template, b: Template) -> None:
    assume(a.numbered or a.prefix)
    assume(b.numbered or b.prefix)
    found = can_collide(a, b)

    def lang(t: Template) -> re.Pattern:
        if not t.numbered:
            return re.compile(re.escape(t.prefix))
        return re.compile(re.escape(t.prefix) + "[1-9][0-9]*" + re.escape(t.suffix))

    if found is not None:
        assert lang(a).fullmatch(found) and lang(b).fullmatch(found)
    else:
        names_a = {a.render(n) for n in range(1, 2000)}
        assert not any(lang(b).fullmatch(x) for x in names_a)


def test_template_rules() -> None:
    assert parse_template("web{n}", 10).render(3) == "web3"
    assert parse_template("gateway", 1).render(1) == "gateway"
    for bad, slots in [("web", 2), ("-web{n}", 5), ("web{n}{n}", 5), ("Web{n}", 5), ("w_{n}", 5)]:
        try:
            parse_template(bad, slots)
        except ValueError:
            continue
        raise AssertionError(f"{bad} accepted")
