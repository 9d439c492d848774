"""The executor: the only code that runs commands and writes files.

It walks the plan step by step, printing `[N/M] step: title`, and records each
finished operation id in a state file (JSON, 0600) right away, so an
interrupted run continues with `--resume` where it stopped and never does an
operation twice. A plan that changed since the state file was written is
refused (its digest is stored in the state file). Before running an operation
its guard is checked, so an effect that happened just before a crash (after
the command, before the checkpoint) is recognised and not repeated.

Commands are resolved on PATH (so a test can put stand-ins first) and run with
their output in the log (0600), with every secret value redacted.

`DOM0_INSTALL_FAULT=<op id>[@after]` makes the run fail just before (or just
after) that operation: the test suite uses it to prove that a run stopped at
any point finishes with `--resume`.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import getpass
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from installer import disks, identity, stage, validate
from installer.config import Config
from installer.errors import InstallError, UsageError
from installer.ops import (
    CheckDisk,
    CheckTree,
    CopyFile,
    EnsureLine,
    Extract,
    Fetch,
    FetchLatestStage3,
    Guard,
    MakeDir,
    Op,
    PartitionExists,
    PathExists,
    Plan,
    Probe,
    RemoveFile,
    RequireFiles,
    RequireTools,
    Run,
    Step,
    Symlink,
    UserExists,
    Validate,
    VerifySignature,
    WipeDisk,
    WriteFile,
    WriteSecret,
    gpg_clearsigned,
    gpg_import,
    gpg_verify,
    tar_extract,
)
from installer.paths import PathError, is_inside, resolve_in_root
from installer.steps.pool import PASSPHRASE

FAULT_ENV = "DOM0_INSTALL_FAULT"
CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
REDACTED = "<redacted>"
_CRYPT = re.compile(r"\$(5|6|y|gy|2[aby]|7)\$[^\s:]{8,}")


# ---------------------------------------------------------------- secrets


class Secrets:
    """Secret values by name, asked for only when an operation needs them."""

    def __init__(
        self,
        values: dict[str, str],
        *,
        passphrase_file: str | None = None,
        prompt: Callable[[str], str] = getpass.getpass,
        interactive: bool | None = None,
    ) -> None:
        self._values = dict(values)
        self._passphrase_file = passphrase_file
        self._prompt = prompt
        self._interactive = sys.stdin.isatty() if interactive is None else interactive

    def get(self, name: str) -> str:
        if name not in self._values:
            if name != PASSPHRASE:
                raise InstallError(f"no value for the secret {name!r}")
            self._values[name] = self._passphrase()
        return self._values[name]

    def _passphrase(self) -> str:
        if self._passphrase_file:
            with open(self._passphrase_file, encoding="utf-8") as f:
                value = f.read().rstrip("\n")
        elif self._interactive:
            value = self._prompt("ZFS passphrase (8 characters or more): ")
            if self._prompt("Again: ") != value:
                raise InstallError("the two passphrases differ")
        else:
            raise InstallError(
                "the ZFS passphrase is needed: run on a terminal or pass --passphrase-file"
            )
        if not 8 <= len(value.encode()) <= 512 or "\n" in value:
            raise InstallError("a ZFS passphrase is one line of 8 to 512 bytes")
        return value

    def add(self, name: str, value: str) -> None:
        """Remember a secret read at run time (a key file), so logs redact it too."""
        self._values.setdefault(name, value)

    def values(self) -> list[str]:
        return [v for v in self._values.values() if v]


class Redactor:
    def __init__(self, secrets: Secrets) -> None:
        self.secrets = secrets

    def __call__(self, text: str) -> str:
        for value in sorted(self.secrets.values(), key=len, reverse=True):
            if len(value) >= 4:
                text = text.replace(value, REDACTED)
        return _CRYPT.sub(REDACTED, text)


# ---------------------------------------------------------------- state


@dataclass
class State:
    plan_digest: str
    config: str
    done: list[str] = field(default_factory=list)
    complete: bool = False
    resolved: dict[str, str] = field(default_factory=dict)
    started: str = ""
    updated: str = ""

    @classmethod
    def load(cls, path: str) -> State:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            return cls(**data)
        except (OSError, ValueError, TypeError) as e:
            raise UsageError(f"cannot read the state file {path}: {e}") from None

    def save(self, path: str) -> None:
        self.updated = _now()
        write_private(path, (json.dumps(vars(self), indent=2) + "\n").encode())


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def write_private(path: str, data: bytes) -> None:
    """Atomically replace `path` with `data`, mode 0600 from the first byte."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, mode=0o700, exist_ok=True)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def confirm(cfg: Config, stream: TextIO = sys.stdin) -> bool:
    """Ask before touching disks (unless --yes). No terminal: no."""
    if not stream.isatty():
        print("dom0 install: apply changes disks; pass --yes to confirm", file=sys.stderr)
        return False
    verb = "ERASE and partition" if cfg.disks.wipe else "partition"
    print(f"This will {verb}:")
    for dev in cfg.disks.devices:
        print(f"  {identity.identify(dev).describe()}")
    return input("Type 'yes' to continue: ").strip() == "yes"


# ---------------------------------------------------------------- executor


class Executor:
    def __init__(
        self,
        cfg: Config,
        plan: Plan,
        *,
        state_path: str,
        log_path: str,
        secrets: Secrets,
        config_path: str,
        out: TextIO | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.plan = plan
        self.root = cfg.install.target
        self.state_path = state_path
        self.log_path = log_path
        self.secrets = secrets
        self.redact = Redactor(secrets)
        self.config_path = config_path
        self.out = out or sys.stdout
        self.env = dict(os.environ if env is None else env)
        self.state: State | None = None
        self._log: TextIO | None = None

    # -- entry point

    def run(self, *, resume: bool) -> int:
        digest = self.plan.digest()
        if os.path.exists(self.state_path):
            if not resume:
                raise UsageError(
                    f"a previous run left {self.state_path}; continue it with --resume, or "
                    "remove that file to start over"
                )
            state = State.load(self.state_path)
            if state.plan_digest != digest:
                raise UsageError(
                    f"the plan changed since {self.state_path} was written (plan digest "
                    f"{state.plan_digest[:12]}, now {digest[:12]}): resume with the config "
                    "and installer of that run, or remove the state file to start over"
                )
            if state.complete:
                print(
                    "dom0 install: this install is already complete; nothing to do", file=self.out
                )
                return 0
        else:
            if resume:
                raise UsageError(
                    f"--resume: there is no state file {self.state_path}; nothing to resume"
                )
            state = State(digest, self.config_path, started=_now())
        self.state = state
        state.save(self.state_path)
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "a", encoding="utf-8") as log:
            self._log = log
            self.log(
                f"=== apply {'(resume) ' if resume else ''}config {self.config_path} plan {digest}"
            )
            try:
                return self._steps(state)
            finally:
                self._log = None

    def _steps(self, state: State) -> int:
        steps = self.plan.steps
        total = len(steps)
        width = len(str(total))
        done = set(state.done)
        for i, step in enumerate(steps, 1):
            head = f"[{i:>{width}}/{total}] {step.id}"
            if not step.session and all(op.id in done for op in step.ops):
                self.say(f"{head}: done earlier")
                continue
            self.say(f"{head}: {step.title}")
            self.log(f"--- step {i}/{total} {step.id}")
            op: Op | None = None
            try:
                for op in step.ops:
                    if op.id in done and not step.session:
                        continue
                    self._one(step, op)
                    if op.id not in done:
                        done.add(op.id)
                        state.done.append(op.id)
                        state.save(self.state_path)
            except Exception as e:  # every failure ends the run the same way: resumable
                where = op.id if op is not None else step.id
                msg = self.redact(str(e) or type(e).__name__)
                if not isinstance(
                    e, InstallError | OSError | PathError | subprocess.SubprocessError
                ):
                    # Not an expected failure: keep the traceback for whoever debugs it.
                    self.log(traceback.format_exc())
                self.log(f"FAILED {where}: {msg}")
                print(
                    f"dom0 install: step {i}/{total} {step.id} failed at {where}: {msg}",
                    file=sys.stderr,
                )
                print(
                    f"dom0 install: the log is {self.log_path}; fix the cause, then run "
                    f"`dom0 install apply --config {self.config_path} --resume`",
                    file=sys.stderr,
                )
                return 1
        state.complete = True
        state.save(self.state_path)
        self.say(f"dom0 install: complete ({total} steps); log in {self.log_path}")
        self.log("=== complete")
        return 0

    def _one(self, step: Step, op: Op) -> None:
        self._fault(op.id, "before")
        guard = op.guard
        if guard is not None and self.present(guard):
            self.say(f"    = {op.describe()}  (already there)")
            self.log(f"skip {op.id}: {guard.describe()}")
        else:
            self.say(f"    {op.describe()}")
            self.log(f"op {op.id}: {op.describe()}")
            handler = getattr(self, f"_do_{type(op).__name__}")
            handler(op)
        self._fault(op.id, "after")

    def _fault(self, op_id: str, when: str) -> None:
        spec = self.env.get(FAULT_ENV, "")
        target, _, at = spec.partition("@")
        if target == op_id and (at or "before") == when:
            raise InstallError(f"injected fault {when} {op_id} ({FAULT_ENV})")

    # -- output

    def say(self, text: str) -> None:
        print(self.redact(text), file=self.out, flush=True)

    def log(self, text: str) -> None:
        if self._log is not None:
            stamp = datetime.datetime.now(datetime.UTC).strftime("%H:%M:%S")
            for line in self.redact(text).splitlines() or [""]:
                self._log.write(f"{stamp} {line}\n")
            self._log.flush()

    # -- commands

    def _resolve(self, argv: tuple[str, ...]) -> list[str]:
        exe = shutil.which(argv[0], path=self.env.get("PATH", os.defpath))
        if exe is None:
            raise InstallError(f"{argv[0]}: command not found on PATH")
        return [exe, *argv[1:]]

    def _env_for(self, argv: tuple[str, ...]) -> dict[str, str]:
        if argv[0] == "chroot":
            # A clean environment inside the new system: nothing of the live
            # system's (PATH, PYTHONPATH, locale) leaks into emerge.
            return {
                "PATH": CHROOT_PATH,
                "HOME": "/root",
                "TERM": self.env.get("TERM", "dumb"),
                "LANG": "C.UTF-8",
            }
        env = dict(self.env)
        env["LC_ALL"] = "C"
        return env

    def command(self, argv: tuple[str, ...], *, stdin: str | None = None) -> str:
        """Run an action; its output goes to the log. Non-zero exit: InstallError."""
        full = self._resolve(argv)
        self.log(f"$ {' '.join(argv)}")
        tail: collections.deque[str] = collections.deque(maxlen=15)
        out: list[str] = []
        with subprocess.Popen(
            full,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self._env_for(argv),
            cwd=self.cfg.install.work_dir if os.path.isdir(self.cfg.install.work_dir) else "/",
            text=True,
            errors="replace",
        ) as proc:
            if stdin is not None and proc.stdin is not None:
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.write(stdin)
                proc.stdin.close()
            assert proc.stdout is not None
            for line in proc.stdout:
                line = self.redact(line.rstrip("\n"))
                tail.append(line)
                out.append(line)
                self.log(f"  | {line}")
            rc = proc.wait()
        if rc != 0:
            detail = " / ".join(tail) if tail else "no output"
            raise InstallError(f"`{' '.join(argv)}` exited with {rc}: {detail}")
        return "\n".join(out)

    def probe(self, argv: tuple[str, ...]) -> tuple[int, str]:
        """Run a read-only check; returns (exit code, stdout). Never fails."""
        try:
            full = self._resolve(argv)
        except InstallError:
            return 127, ""
        proc = subprocess.run(
            full,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            env=self._env_for(argv),
            check=False,
        )
        self.log(f"? {' '.join(argv)} -> {proc.returncode}")
        return proc.returncode, proc.stdout

    # -- guards

    def host(self, path: str) -> str:
        """A path the executor touches: paths in the target resolve like in a chroot."""
        if is_inside(self.root, path) and path != self.root:
            return resolve_in_root(self.root, path[len(self.root) + 1 :])
        return path

    def present(self, guard: Guard) -> bool:
        if isinstance(guard, Probe):
            rc, stdout = self.probe(guard.argv)
            good = rc == 0
            if good and guard.expect is not None:
                good = stdout.strip() == guard.expect
            if good and guard.contains is not None:
                good = guard.contains in stdout
            return good != guard.invert
        if isinstance(guard, PathExists):
            return os.path.lexists(self.host(guard.path))
        if isinstance(guard, UserExists):
            return guard.name in validate.Tree(guard.root).passwd()
        if isinstance(guard, PartitionExists):
            fd = os.open(guard.disk, os.O_RDONLY | os.O_CLOEXEC)
            try:
                size = os.lseek(fd, 0, os.SEEK_END)
                parts = disks.parse_gpt(lambda o, n: os.pread(fd, n, o), size) or []
            finally:
                os.close(fd)
            return any(p.number == guard.number for p in parts)
        raise AssertionError(f"unknown guard {guard!r}")

    def _require(self, req: Probe | None) -> None:
        if req is not None and not self.present(req):
            raise InstallError(f"precondition failed: {req.describe()} is not true")

    # -- file helpers

    def _owner(self, owner: str | None) -> tuple[int, int] | None:
        if owner is None:
            return None
        user, _, group = owner.partition(":")
        tree = validate.Tree(self.root)
        entry = tree.passwd().get(user)
        if entry is None:
            raise InstallError(f"user {user!r} is not in {self.root}/etc/passwd")
        gid = int(entry[3])
        if group:
            for line in (tree.read("etc/group") or "").splitlines():
                parts = line.split(":")
                if parts[0] == group:
                    gid = int(parts[2])
        return int(entry[2]), gid

    def _write(self, path: str, data: bytes, mode: int, owner: str | None = None) -> bool:
        """Write atomically; False if the file already had this content and mode."""
        real = self.host(path)
        ids = self._owner(owner)
        try:
            st = os.lstat(real)
            if not os.path.islink(real):
                with open(real, "rb") as f:
                    same = f.read() == data
                if (
                    same
                    and (st.st_mode & 0o7777) == mode
                    and (ids is None or (st.st_uid, st.st_gid) == ids)
                ):
                    return False
        except FileNotFoundError:
            pass
        parent = os.path.dirname(real)
        os.makedirs(parent, mode=0o755, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".dom0-")
        try:
            os.fchmod(fd, mode)
            if ids is not None:
                os.fchown(fd, *ids)
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.replace(tmp, real)
        return True

    # -- operations

    def _do_Run(self, op: Run) -> None:
        self._require(op.requires)
        stdin = None
        if op.stdin_secret:
            value = self.secrets.get(op.stdin_secret)
            if op.stdin_secret.startswith("password:"):
                stdin = f"{op.stdin_secret.split(':', 1)[1]}:{value}\n"
            else:
                stdin = value + "\n"
        self.command(op.argv, stdin=stdin)

    def _do_WriteFile(self, op: WriteFile) -> None:
        self._write(op.path, op.content.encode(), op.mode, op.owner)

    def _do_WriteSecret(self, op: WriteSecret) -> None:
        self._write(op.path, (self.secrets.get(op.secret) + "\n").encode(), op.mode)

    def _do_CopyFile(self, op: CopyFile) -> None:
        with open(op.src, "rb") as f:
            data = f.read()
        if op.secret:
            self.secrets.add(f"file:{op.src}", data.decode("utf-8", "replace").strip())
        self._write(op.dest, data, op.mode)

    def _do_RemoveFile(self, op: RemoveFile) -> None:
        real = self.host(op.path)
        try:
            fd = os.open(real, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        try:
            # Zeros over the bytes first: on a disk that rewrites in place the
            # passphrase does not outlive the file (flash may keep a copy).
            os.write(fd, b"\0" * os.fstat(fd).st_size)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.unlink(real)

    def _do_MakeDir(self, op: MakeDir) -> None:
        real = self.host(op.path)
        os.makedirs(real, mode=0o755, exist_ok=True)
        os.chmod(real, op.mode)
        ids = self._owner(op.owner)
        if ids is not None:
            os.chown(real, *ids)

    def _do_Symlink(self, op: Symlink) -> None:
        rel = op.path[len(self.root) + 1 :] if op.root else None
        if rel is not None:
            parent_rel, _, name = rel.rpartition("/")
            parent = resolve_in_root(self.root, parent_rel) if parent_rel else self.root
        else:
            parent, name = os.path.split(op.path)
        final = os.path.join(parent, name)
        if os.path.islink(final) and os.readlink(final) == op.target:
            return
        if os.path.isdir(final) and not os.path.islink(final):
            raise InstallError(f"refusing to replace the directory {final} with a symlink")
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".dom0-link-{os.getpid()}")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(op.target, tmp)
        os.replace(tmp, final)  # replaces the old link itself, never what it points to

    def _do_EnsureLine(self, op: EnsureLine) -> None:
        real = self.host(op.path)
        try:
            with open(real, encoding="utf-8") as f:
                text = f.read()
            mode = os.stat(real).st_mode & 0o7777
        except FileNotFoundError:
            text, mode = "", 0o644
        first = next(
            (
                ln.strip()
                for ln in text.splitlines()
                if ln.strip() and not ln.lstrip().startswith("#")
            ),
            None,
        )
        if first == op.line:
            return
        self._write(op.path, (op.line + "\n" + text).encode(), mode)

    def _do_RequireTools(self, op: RequireTools) -> None:
        path = self.env.get("PATH", os.defpath)
        missing = [t for t in op.tools if shutil.which(t, path=path) is None]
        if missing:
            raise InstallError(f"missing commands on the live system: {' '.join(missing)}")

    def _do_RequireFiles(self, op: RequireFiles) -> None:
        missing = [p for p in op.paths if not os.path.isfile(p)]
        if missing:
            raise InstallError(f"missing input files: {' '.join(missing)}")

    def _do_CheckDisk(self, op: CheckDisk) -> None:
        try:
            found = disks.inspect(op.device)
        except OSError as e:
            raise InstallError(f"cannot open {op.device}: {e.strerror or e}") from None
        self.log(f"{op.device}: {found.summary()}")
        if found.in_use:
            raise InstallError(f"refusing {op.device}: {found.summary()}; it is in use")
        if not found.clean and not op.wipe:
            raise InstallError(
                f"refusing {op.device}: it holds {found.summary()}; set disks.wipe = true to "
                "erase it (partition table, file systems and ZFS pool labels)"
            )
        if not found.clean:
            self.say(f"      {op.device} holds {found.summary()}: it will be wiped")

    def _do_WipeDisk(self, op: WipeDisk) -> None:
        for line in disks.wipe(op.device):
            self.log(f"{op.device}: {line}")

    def _fetch(self, url: str, dest: str, sha256: str | None = None) -> None:
        part = dest + ".part"
        h = hashlib.sha256()
        self.log(f"fetch {url} -> {dest}")
        try:
            with urllib.request.urlopen(url, timeout=60) as resp, open(part, "wb") as f:
                while chunk := resp.read(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
        except (OSError, ValueError) as e:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part)
            raise InstallError(f"cannot fetch {url}: {e}") from None
        if sha256 and h.hexdigest() != sha256:
            os.unlink(part)
            raise InstallError(f"{url}: sha256 {h.hexdigest()} is not the pinned {sha256}")
        os.replace(part, dest)

    def _do_Fetch(self, op: Fetch) -> None:
        if op.sha256 and os.path.exists(op.dest):
            with open(op.dest, "rb") as f:
                if hashlib.file_digest(f, "sha256").hexdigest() == op.sha256:
                    return
        self._fetch(op.url, op.dest, op.sha256)

    def _gpg_home(self, home: str) -> None:
        shutil.rmtree(home, ignore_errors=True)
        os.makedirs(home, mode=0o700)

    def _gpg_check(self, argv: tuple[str, ...], fprs: tuple[str, ...], what: str) -> None:
        rc, status = self.probe(argv)
        self.log(status)
        try:
            good = stage.check_gpg_status(status, fprs)
        except stage.SignatureError as e:
            raise InstallError(f"signature check failed for {what}: {e}") from None
        if rc != 0:
            raise InstallError(f"signature check failed for {what}: gpg exited with {rc}")
        self.log(f"good signature on {what} by {good.primary}")

    def _do_VerifySignature(self, op: VerifySignature) -> None:
        self._gpg_home(op.gnupghome)
        try:
            self.command(gpg_import(op.gnupghome, op.keyring))
            self._gpg_check(
                gpg_verify(op.gnupghome, op.signature, op.file), op.fingerprints, op.file
            )
        finally:
            shutil.rmtree(op.gnupghome, ignore_errors=True)

    def _do_FetchLatestStage3(self, op: FetchLatestStage3) -> None:
        listing = op.dest + ".latest.txt"
        self._fetch(op.listing_url, listing)
        self._gpg_home(op.gnupghome)
        try:
            self.command(gpg_import(op.gnupghome, op.keyring))
            self._gpg_check(
                gpg_clearsigned(op.gnupghome, listing, listing + ".verified"),
                op.fingerprints,
                op.listing_url,
            )
        finally:
            shutil.rmtree(op.gnupghome, ignore_errors=True)
        with open(listing + ".verified", encoding="utf-8") as f:
            try:
                path = stage.parse_latest(f.read(), op.variant)
            except ValueError as e:
                raise InstallError(f"{op.listing_url}: {e}") from None
        url = f"{op.base_url}/{path}"
        self._fetch(url, op.dest)
        self._fetch(url + ".asc", op.dest + ".asc")
        assert self.state is not None
        self.state.resolved[op.id] = url
        self.say(f"      latest stage3: {url}")

    def _do_Extract(self, op: Extract) -> None:
        self._require(op.requires)
        rel = op.dest[len(op.root) + 1 :] if op.dest != op.root else ""
        real = resolve_in_root(op.root, rel) if rel else op.root
        if real != op.dest or not os.path.isdir(real):
            raise InstallError(
                f"refusing to extract into {op.dest}: not a directory inside "
                f"{op.root} (resolves to {real})"
            )
        if op.strip_top:
            members = self._first_members(op.archive)
            try:
                top = stage.top_folder(members)
            except ValueError as e:
                raise InstallError(f"{op.archive}: {e}") from None
            self.log(f"{op.archive}: top folder {top}/ is stripped")
        self.command(tar_extract(op.archive, real, op.strip_top))

    def _first_members(self, archive: str, limit: int = 2000) -> list[str]:
        argv = ("tar", "--list", "--file", archive)
        self.log(f"$ {' '.join(argv)} (first {limit} members)")
        members = []
        with subprocess.Popen(
            self._resolve(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=self._env_for(argv),
        ) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                members.append(line.rstrip("\n"))
                if len(members) >= limit:
                    proc.kill()
                    break
        return members

    def _do_CheckTree(self, op: CheckTree) -> None:
        tree = validate.Tree(op.root)
        fn = validate.stage3_checks if op.what == "stage3" else validate.repo_checks
        bad = validate.failures(fn(self.cfg, tree))
        for r in bad:
            self.log(f"FAIL {r.id}: {r.detail}")
        if bad:
            raise InstallError("; ".join(f"{r.id}: {r.detail}" for r in bad))

    def _do_Validate(self, op: Validate) -> None:
        results = validate.validate(self.cfg, op.root)
        for r in results:
            self.log(f"{r.status.upper()} {r.id}: {r.detail}")
        bad = validate.failures(results)
        self.say(f"      {len(results)} checks, {len(bad)} failed")
        if bad:
            raise InstallError(
                "validation failed: " + "; ".join(f"{r.id}: {r.detail}" for r in bad)
            )
