"""Every path inside the target is built here.

The old shell installer once extracted a whole tree into a stray `profile/`
folder because a path was assembled from an empty variable. Two rules stop
that class of bug:

* `target_path(root, rel)` is the only way plan code names a file in the
  target. It is pure and lexical: `rel` must be relative and must not contain
  `..`, `.` or empty components, so the result is always strictly below
  `root`.
* `resolve_in_root(root, rel)` is what the executor and the validator use to
  touch the disk. It follows symlinks the way a process chrooted into `root`
  would (an absolute link target restarts at `root`, `..` stops at `root`), so
  an absolute symlink in a stage3 can never send a write to the live system.
"""

from __future__ import annotations

import os
import posixpath


class PathError(ValueError):
    """A path that would leave the target, or is not a usable path at all."""


def check_root(root: str) -> str:
    """The target root: absolute, normalized, and never `/` itself."""
    if not root or "\0" in root:
        raise PathError("the target root is empty")
    if not root.startswith("/"):
        raise PathError(f"the target root {root!r} is not absolute")
    if posixpath.normpath(root) != root or root.startswith("//"):
        raise PathError(f"the target root {root!r} is not normalized")
    if root == "/":
        raise PathError("the target root is '/', which is the running system")
    return root


def rel_parts(rel: str) -> list[str]:
    """Split a target-relative path, refusing anything that could escape."""
    if not isinstance(rel, str) or not rel:
        raise PathError("empty path inside the target")
    if "\0" in rel:
        raise PathError(f"path {rel!r} contains a NUL byte")
    if rel.startswith("/"):
        raise PathError(f"path {rel!r} is absolute; paths inside the target are relative")
    parts = rel.split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise PathError(f"path {rel!r} has a {part or 'empty'!r} component")
    return parts


def target_path(root: str, rel: str) -> str:
    """`root/rel`, guaranteed to be strictly inside `root` (lexically)."""
    check_root(root)
    return posixpath.join(root, *rel_parts(rel))


def in_target(root: str, absolute: str) -> str:
    """A path of the installed system (`/etc/fstab`) as a host path below `root`."""
    if not absolute.startswith("/"):
        raise PathError(f"{absolute!r} is not an absolute path of the installed system")
    return target_path(root, absolute.lstrip("/"))


_MAX_LINKS = 40


def resolve_in_root(root: str, rel: str, *, follow_last: bool = True) -> str:
    """Resolve `rel` below `root` with chroot semantics; the result stays inside.

    Missing components are fine (the result names where a new file would go).
    """
    check_root(root)
    pending = rel_parts(rel) if rel else []
    done: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = posixpath.join(root, *done, part)
        is_last = not pending
        if (follow_last or not is_last) and os.path.islink(candidate):
            links += 1
            if links > _MAX_LINKS:
                raise PathError(f"too many symlinks resolving {rel!r} in {root}")
            link = os.readlink(candidate)
            if link.startswith("/"):
                done = []
            pending = [p for p in link.split("/") if p] + pending
            continue
        done.append(part)
    return posixpath.join(root, *done) if done else root


def is_inside(root: str, path: str) -> bool:
    """Whether `path` (normalized) is `root` or below it."""
    path = posixpath.normpath(path)
    return path == root or path.startswith(root.rstrip("/") + "/")
