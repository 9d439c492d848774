"""The typed plan: steps made of operations, each with a stable id.

Operations are plain frozen data. The plan builder (`installer.plan`) makes
them; the executor (`installer.execute`) is the only code that carries them
out. An operation never holds a secret value, only the *name* of a secret
that the executor fills in at apply time, so a plan can be printed, hashed
and stored without leaking anything.

Idempotence: every operation is either naturally safe to repeat
(`safe_to_repeat`: writing a file with known content, `emerge --noreplace`,
`rc-update add`) or carries a guard (`skip_if`) that tells whether its effect
is already there (`zpool list zroot` succeeds: the pool exists). The state file
records finished operation ids, the guard covers a crash between an effect and
its checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

# ---------------------------------------------------------------- guards


@dataclass(frozen=True)
class Probe:
    """A read-only command: success (and the expected output) means "present"."""

    argv: tuple[str, ...]
    expect: str | None = None  # stripped stdout must equal this
    contains: str | None = None  # stdout must contain this
    invert: bool = False  # "present" means the probe fails (e.g. already unmounted)

    kind: ClassVar[str] = "probe"

    def describe(self) -> str:
        if self.invert:
            return f"`{shlex.join(self.argv)}` fails"
        text = f"`{shlex.join(self.argv)}` succeeds"
        if self.expect is not None:
            text += f" and prints {self.expect!r}"
        if self.contains is not None:
            text += f" and mentions {self.contains!r}"
        return text


@dataclass(frozen=True)
class PathExists:
    path: str

    kind: ClassVar[str] = "path-exists"

    def describe(self) -> str:
        return f"{self.path} exists"


@dataclass(frozen=True)
class UserExists:
    root: str
    name: str

    kind: ClassVar[str] = "user-exists"

    def describe(self) -> str:
        return f"user {self.name} exists in {self.root}/etc/passwd"


@dataclass(frozen=True)
class PartitionExists:
    disk: str
    number: int

    kind: ClassVar[str] = "partition-exists"

    def describe(self) -> str:
        return f"partition {self.number} exists on {self.disk}"


Guard = Probe | PathExists | UserExists | PartitionExists


# ---------------------------------------------------------------- operations


@dataclass(frozen=True)
class Op:
    """Base of all operations. `id` is unique in a plan and stable across runs."""

    id: str

    kind: ClassVar[str] = "op"
    safe_to_repeat: ClassVar[bool] = True

    @property
    def guard(self) -> Guard | None:
        return None

    def describe(self) -> str:  # pragma: no cover - every subclass overrides
        raise NotImplementedError

    def commands(self) -> list[tuple[str, ...]]:
        """The external commands this operation runs, in order (for plans and tests)."""
        return []

    def probes(self) -> list[tuple[str, ...]]:
        """Read-only commands the executor may run to check the guard or precondition."""
        out = []
        if isinstance(self.guard, Probe):
            out.append(self.guard.argv)
        req = getattr(self, "requires", None)
        if isinstance(req, Probe):
            out.append(req.argv)
        return out


@dataclass(frozen=True)
class Run(Op):
    """Run a command (resolved on PATH). `chroot TARGET ...` runs inside the target."""

    argv: tuple[str, ...] = ()
    skip_if: Guard | None = None
    idempotent: bool = False  # repeating the command is harmless
    stdin_secret: str | None = None  # name of a secret fed on stdin
    requires: Probe | None = None  # must hold before running, else the step fails

    kind: ClassVar[str] = "run"

    @property
    def guard(self) -> Guard | None:
        return self.skip_if

    @property
    def safe_to_repeat(self) -> bool:  # type: ignore[override]
        return self.idempotent

    def describe(self) -> str:
        text = f"$ {shlex.join(self.argv)}"
        if self.stdin_secret:
            text += f"  < <secret {self.stdin_secret}>"
        return text

    def commands(self) -> list[tuple[str, ...]]:
        return [self.argv]


@dataclass(frozen=True)
class WriteFile(Op):
    """Write `content` to `path` (inside `root` when given) with `mode` and owner."""

    path: str = ""
    content: str = ""
    mode: int = 0o644
    owner: str | None = None  # "user" or "user:group", looked up in the target
    root: str | None = None

    kind: ClassVar[str] = "write"

    def describe(self) -> str:
        owner = f", owner {self.owner}" if self.owner else ""
        return f"write {self.path} ({self.mode:04o}{owner}, {len(self.content.splitlines())} lines)"


@dataclass(frozen=True)
class WriteSecret(Op):
    """Write the value of a named secret to a file, mode 0600 or stricter."""

    path: str = ""
    secret: str = ""
    mode: int = 0o600
    root: str | None = None

    kind: ClassVar[str] = "write-secret"

    def describe(self) -> str:
        return f"write {self.path} ({self.mode:04o}) from <secret {self.secret}>"


@dataclass(frozen=True)
class RemoveFile(Op):
    """Overwrite a file of the live system with zeros, then remove it (a
    passphrase that has served its purpose); already gone is fine."""

    path: str = ""

    kind: ClassVar[str] = "remove"

    def describe(self) -> str:
        return f"remove {self.path} (overwritten first)"


@dataclass(frozen=True)
class CopyFile(Op):
    """Copy a file of the live system into place (optionally checking its sha256)."""

    src: str = ""
    dest: str = ""
    mode: int = 0o644
    secret: bool = False  # contents are never logged
    root: str | None = None

    kind: ClassVar[str] = "copy"

    def describe(self) -> str:
        what = " (secret)" if self.secret else ""
        return f"copy {self.src} -> {self.dest} ({self.mode:04o}){what}"


@dataclass(frozen=True)
class MakeDir(Op):
    path: str = ""
    mode: int = 0o755
    owner: str | None = None
    root: str | None = None

    kind: ClassVar[str] = "mkdir"

    def describe(self) -> str:
        owner = f", owner {self.owner}" if self.owner else ""
        return f"mkdir {self.path} ({self.mode:04o}{owner})"


@dataclass(frozen=True)
class Symlink(Op):
    """Make `path` a symlink to `target`, replacing an old link, never following it."""

    path: str = ""
    target: str = ""
    root: str | None = None

    kind: ClassVar[str] = "symlink"

    def describe(self) -> str:
        return f"symlink {self.path} -> {self.target}"


@dataclass(frozen=True)
class EnsureLine(Op):
    """Make sure `line` is in the file, adding it at the top when missing."""

    path: str = ""
    line: str = ""
    root: str | None = None

    kind: ClassVar[str] = "ensure-line"

    def describe(self) -> str:
        return f"ensure {self.path} starts with {self.line!r} (added at the top if missing)"


@dataclass(frozen=True)
class RequireTools(Op):
    tools: tuple[str, ...] = ()

    kind: ClassVar[str] = "require-tools"

    def describe(self) -> str:
        return f"check these commands are on PATH: {' '.join(self.tools)}"


@dataclass(frozen=True)
class RequireFiles(Op):
    paths: tuple[str, ...] = ()

    kind: ClassVar[str] = "require-files"

    def describe(self) -> str:
        return f"check these input files exist: {' '.join(self.paths)}"


@dataclass(frozen=True)
class CheckDisk(Op):
    """Refuse a disk that is mounted, holds a ZFS label or has data (unless wipe)."""

    device: str = ""
    wipe: bool = False

    kind: ClassVar[str] = "check-disk"

    def describe(self) -> str:
        if self.wipe:
            return f"check {self.device} is not mounted or in use (wipe = true: data is erased)"
        return f"check {self.device} is not mounted, holds no ZFS label and no data"


@dataclass(frozen=True)
class WipeDisk(Op):
    """Zero the ZFS labels of the disk and of every partition it has, and their
    first and last MiB, so no old pool can be imported by mistake."""

    device: str = ""

    kind: ClassVar[str] = "wipe-disk"

    def describe(self) -> str:
        return (
            f"wipe {self.device}: zero the 4 ZFS labels and the first/last MiB of the disk "
            "and of each partition in its old partition table"
        )


@dataclass(frozen=True)
class Fetch(Op):
    url: str = ""
    dest: str = ""
    sha256: str | None = None

    kind: ClassVar[str] = "fetch"

    @property
    def guard(self) -> Guard | None:
        return None if self.sha256 else PathExists(self.dest)

    def describe(self) -> str:
        pin = f" (sha256 {self.sha256})" if self.sha256 else ""
        return f"fetch {self.url} -> {self.dest}{pin}"


# --no-autostart: checking signatures needs no gpg-agent, and none is left
# running in the temporary GNUPGHOME.
def gpg_import(home: str, keyring: str) -> tuple[str, ...]:
    return ("gpg", "--homedir", home, "--batch", "--no-autostart", "--quiet", "--import", keyring)


def gpg_verify(home: str, signature: str, file: str) -> tuple[str, ...]:
    return (
        "gpg",
        "--homedir",
        home,
        "--batch",
        "--no-autostart",
        "--status-fd",
        "1",
        "--verify",
        signature,
        file,
    )


def gpg_clearsigned(home: str, file: str, out: str) -> tuple[str, ...]:
    return (
        "gpg",
        "--homedir",
        home,
        "--batch",
        "--no-autostart",
        "--yes",
        "--status-fd",
        "1",
        "--output",
        out,
        "--decrypt",
        file,
    )


@dataclass(frozen=True)
class FetchLatestStage3(Op):
    """Resolve Gentoo's signed `latest-stage3-<variant>.txt`, fetch the stage3 and its .asc."""

    listing_url: str = ""
    base_url: str = ""
    variant: str = ""
    dest: str = ""
    keyring: str = ""
    fingerprints: tuple[str, ...] = ()
    gnupghome: str = ""

    kind: ClassVar[str] = "fetch-latest-stage3"

    @property
    def guard(self) -> Guard | None:
        return PathExists(self.dest + ".asc")

    def describe(self) -> str:
        return (
            f"fetch {self.listing_url}, check its signature, then fetch the stage3 it names "
            f"-> {self.dest} (+ .asc)"
        )

    def commands(self) -> list[tuple[str, ...]]:
        listing = self.dest + ".latest.txt"
        return [
            gpg_import(self.gnupghome, self.keyring),
            gpg_clearsigned(self.gnupghome, listing, listing + ".verified"),
        ]


@dataclass(frozen=True)
class VerifySignature(Op):
    """`gpg --verify` in a fresh GNUPGHOME holding only the configured keyring;
    the good signature must come from one of `fingerprints`."""

    file: str = ""
    signature: str = ""
    keyring: str = ""
    fingerprints: tuple[str, ...] = ()
    gnupghome: str = ""

    kind: ClassVar[str] = "verify"

    def describe(self) -> str:
        return f"verify {self.file} with {self.signature}, signer {' or '.join(self.fingerprints)}"

    def commands(self) -> list[tuple[str, ...]]:
        return [
            gpg_import(self.gnupghome, self.keyring),
            gpg_verify(self.gnupghome, self.signature, self.file),
        ]


def tar_extract(archive: str, dest: str, strip: bool) -> tuple[str, ...]:
    argv = [
        "tar",
        "--extract",
        "--file",
        archive,
        "--directory",
        dest,
        "--preserve-permissions",
        "--xattrs",
        "--xattrs-include=*.*",
        "--numeric-owner",
    ]
    if strip:
        argv.append("--strip-components=1")
    return tuple(argv)


@dataclass(frozen=True)
class Extract(Op):
    """GNU tar into `dest` (inside `root`), never elsewhere. With `strip_top`, the
    archive must have a single top folder, which is stripped."""

    archive: str = ""
    dest: str = ""
    root: str = ""
    strip_top: bool = False
    requires: Probe | None = None

    kind: ClassVar[str] = "extract"

    def describe(self) -> str:
        strip = ", its single top folder stripped" if self.strip_top else ""
        return f"extract {self.archive} into {self.dest}{strip}"

    def commands(self) -> list[tuple[str, ...]]:
        out: list[tuple[str, ...]] = []
        if self.strip_top:
            out.append(("tar", "--list", "--file", self.archive))
        out.append(tar_extract(self.archive, self.dest, self.strip_top))
        return out


@dataclass(frozen=True)
class CheckTree(Op):
    """Check the extracted tree (stage3: top-level folders, etc/portage, init;
    repo: var/db/repos/gentoo/profiles and the chosen profile)."""

    root: str = ""
    what: str = "stage3"  # "stage3" | "repo"

    kind: ClassVar[str] = "check-tree"

    def describe(self) -> str:
        if self.what == "stage3":
            return (
                f"check the stage3 tree in {self.root}: only the expected top-level folders, "
                "etc/portage, /usr layout and init system as the profile says"
            )
        return (
            f"check the repository in {self.root}/var/db/repos/gentoo: profiles/, repo_name, "
            "the chosen profile, no leftover top folder"
        )


@dataclass(frozen=True)
class Validate(Op):
    root: str = ""

    kind: ClassVar[str] = "validate"

    def describe(self) -> str:
        return f"validate the installed system in {self.root} against the config"


# ---------------------------------------------------------------- steps and plans


@dataclass(frozen=True)
class Step:
    """A group of operations shown as one line of progress.

    A `session` step re-establishes state that does not survive a reboot of
    the live system (an imported pool, mounts): on `--resume` its operations
    are checked again (by their guards) even when they were done before.
    """

    id: str
    title: str
    ops: tuple[Op, ...]
    session: bool = False


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    notes: tuple[str, ...] = field(default=())

    def ops(self) -> Iterator[tuple[Step, Op]]:
        for step in self.steps:
            for op in step.ops:
                yield step, op

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": 1,
            "notes": list(self.notes),
            "steps": [
                {
                    "id": s.id,
                    "title": s.title,
                    "session": s.session,
                    "ops": [op_to_dict(op) for op in s.ops],
                }
                for s in self.steps
            ],
        }

    def digest(self) -> str:
        """sha256 of the canonical JSON form: a changed plan has another digest."""
        text = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Probe | PathExists | UserExists | PartitionExists):
        d = {"kind": value.kind}
        d.update({f.name: _plain(getattr(value, f.name)) for f in fields(value)})
        return d
    return value


def op_to_dict(op: Op) -> dict[str, Any]:
    d: dict[str, Any] = {"id": op.id, "kind": op.kind}
    for f in fields(op):
        if f.name == "id":
            continue
        value = getattr(op, f.name)
        if f.name == "mode":
            value = f"{value:04o}"
        d[f.name] = _plain(value)
    d["describe"] = op.describe()
    cmds = op.commands()
    if cmds and not isinstance(op, Run):
        d["commands"] = [list(c) for c in cmds]
    return d
