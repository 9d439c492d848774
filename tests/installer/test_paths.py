"""Every target path is built by one function that cannot leave the target."""

from __future__ import annotations

import os
import posixpath
import tempfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from installer.paths import PathError, in_target, is_inside, resolve_in_root, target_path

ROOT = "/mnt/gentoo"


def test_target_path_joins_relative_paths() -> None:
    assert target_path(ROOT, "etc/fstab") == "/mnt/gentoo/etc/fstab"
    assert in_target(ROOT, "/var/db/repos/gentoo") == "/mnt/gentoo/var/db/repos/gentoo"


@pytest.mark.parametrize(
    "rel", ["", "/etc/fstab", "../etc", "etc/../../x", "etc/./fstab", "etc//fstab", "a/\0b", "."]
)
def test_target_path_refuses_escapes(rel: str) -> None:
    with pytest.raises(PathError):
        target_path(ROOT, rel)


@pytest.mark.parametrize("root", ["", "/", "mnt/gentoo", "/mnt/../gentoo", "/mnt/gentoo/", "//x"])
def test_bad_roots_are_refused(root: str) -> None:
    with pytest.raises(PathError):
        target_path(root, "etc")


# Path-like text: components from a small alphabet that includes the dangerous ones.
_part = st.sampled_from(["", ".", "..", "etc", "a", "b", "profile", "..a", "a..", "\0"])
_rel = st.lists(_part, min_size=0, max_size=6).map("/".join) | st.text(max_size=30)


@given(rel=_rel, lead=st.booleans())
@settings(max_examples=400)
def test_target_path_never_leaves_the_target(rel: str, lead: bool) -> None:
    rel = ("/" + rel) if lead else rel
    try:
        out = target_path(ROOT, rel)
    except PathError:
        return
    assert out.startswith(ROOT + "/")
    assert posixpath.normpath(out) == out
    assert ".." not in out.split("/")


_link = st.lists(st.sampled_from(["..", "a", "b", "etc", "/", "", "."]), min_size=1, max_size=5)


@given(
    # Links are made only in real directories of the temporary root, so making
    # them can never write through a link to outside it.
    links=st.lists(st.tuples(st.sampled_from(["b", "c", "a/x", "etc/y"]), _link), max_size=4),
    rel=st.lists(st.sampled_from(["a", "b", "c", "etc", "x", "y", ".."]), min_size=1, max_size=5),
)
@settings(max_examples=150, deadline=None)
def test_resolve_in_root_stays_inside_whatever_the_symlinks(links, rel) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "root")
        os.makedirs(os.path.join(root, "a"))
        os.makedirs(os.path.join(root, "etc"))
        for where, parts in links:
            path = os.path.join(root, where)
            if not os.path.lexists(path):
                os.symlink("/".join(parts) or ".", path)
        try:
            out = resolve_in_root(root, "/".join(rel))
        except PathError:
            return  # a symlink loop: refused, never followed outside
        assert is_inside(root, out)


def test_absolute_symlinks_resolve_inside_the_root(tmp_path) -> None:
    root = str(tmp_path / "root")
    os.makedirs(root + "/etc")
    os.symlink("/etc", root + "/link-to-etc")  # absolute: would be the live /etc
    os.symlink("../../../../..", root + "/up")
    assert resolve_in_root(root, "link-to-etc/passwd") == root + "/etc/passwd"
    assert resolve_in_root(root, "up/etc/shadow") == root + "/etc/shadow"
    os.symlink("loop", root + "/loop")
    with pytest.raises(PathError):
        resolve_in_root(root, "loop/x")
