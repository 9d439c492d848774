"""Stage3 and repository: signatures checked with gpg, GNU tar into the target only,
the tree checked afterwards; the old "profile/" bug cannot come back."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from installer import stage, validate
from installer.errors import InstallError
from installer.ops import CheckTree, Extract, FetchLatestStage3, Symlink, VerifySignature

from . import synth
from .conftest import executor, mini_config

GOOD = """[GNUPG:] NEWSIG
[GNUPG:] KEY_CONSIDERED 13EBBDBEDE7A12775DFDB1BABB572E0E2D182910 0
[GNUPG:] SIG_ID abc 2025-01-01 1735689600
[GNUPG:] GOODSIG BB572E0E2D182910 Gentoo Linux Release Engineering (Automated Weekly Release Key)
[GNUPG:] VALIDSIG 534E4209AB49EEE1C19D96162C44695DB9F6043D 2025-01-01 1735689600 0 4 0 1 10 00 13EBBDBEDE7A12775DFDB1BABB572E0E2D182910
[GNUPG:] TRUST_UNDEFINED 0 pgp
"""
RELENG = "13EBBDBEDE7A12775DFDB1BABB572E0E2D182910"


def test_gpg_status_good_by_primary_key() -> None:
    sig = stage.check_gpg_status(GOOD, (RELENG,))
    assert sig.primary == RELENG and sig.fingerprint.startswith("534E")


@pytest.mark.parametrize(
    ("status", "why"),
    [
        (GOOD, "not an allowed key"),
        (GOOD.replace("GOODSIG", "EXPKEYSIG"), "expired"),
        ("[GNUPG:] BADSIG BB572E0E2D182910 x\n", "does not match"),
        (
            "[GNUPG:] ERRSIG BB572E0E2D182910 1 10 00 1735689600 9 -\n[GNUPG:] NO_PUBKEY X\n",
            "not in the keyring",
        ),
        ("", "no good signature"),
    ],
)
def test_gpg_status_refusals(status: str, why: str) -> None:
    allowed = ("0" * 40,) if why == "not an allowed key" else (RELENG,)
    with pytest.raises(stage.SignatureError, match=why):
        stage.check_gpg_status(status, allowed)


def test_top_folder() -> None:
    assert (
        stage.top_folder(["gentoo-20250101/", "gentoo-20250101/profiles/repo_name"])
        == "gentoo-20250101"
    )
    assert stage.top_folder(["./portage/", "./portage/metadata/"]) == "portage"
    for bad in (["a/x", "b/y"], ["README", "gentoo/x"], ["./", "./bin", "./etc/"], []):
        with pytest.raises(ValueError):
            stage.top_folder(bad)


def test_parse_latest() -> None:
    body = (
        "# Latest as of Sun, 05 Jan 2025 17:03:25 +0000\n# ts=1736096605\n"
        "20250105T170325Z/stage3-amd64-openrc-20250105T170325Z.tar.xz 279186352\n"
    )
    assert (
        stage.parse_latest(body, "amd64-openrc")
        == "20250105T170325Z/stage3-amd64-openrc-20250105T170325Z.tar.xz"
    )
    with pytest.raises(ValueError):
        stage.parse_latest(body, "amd64-systemd")
    with pytest.raises(ValueError):
        stage.parse_latest(
            "../../x/stage3-amd64-openrc-20250105T170325Z.tar.xz 1\n", "amd64-openrc"
        )


# ---------------------------------------------------------------- with the real gpg


def verify_op(tmp: Path, file: Path, sig: Path, keyring: Path, fpr: str) -> VerifySignature:
    return VerifySignature(
        "t/verify", str(file), str(sig), str(keyring), (fpr,), str(tmp / "work" / "gnupg")
    )


def test_real_signature_is_accepted_and_tampering_refused(tmp_path, signing, artifacts) -> None:
    ex = executor(mini_config(tmp_path), tmp_path)
    stage3, sig = artifacts.stage3(ex.cfg.gentoo.variant)
    ex._do_VerifySignature(verify_op(tmp_path, stage3, sig, signing.keyring, signing.fingerprint))
    assert not (tmp_path / "work" / "gnupg").exists(), "the temporary GNUPGHOME is removed"
    bad = tmp_path / "tampered.tar.xz"
    bad.write_bytes(stage3.read_bytes() + b"\0")
    with pytest.raises(InstallError, match="does not match the file"):
        ex._do_VerifySignature(verify_op(tmp_path, bad, sig, signing.keyring, signing.fingerprint))
    with pytest.raises(InstallError, match="not an allowed key"):
        ex._do_VerifySignature(verify_op(tmp_path, stage3, sig, signing.keyring, "A" * 40))


def test_signature_by_an_unknown_key_is_refused(tmp_path, signing, artifacts) -> None:
    other = tmp_path / "other"
    fpr, other_keyring = synth.make_key(other)
    try:
        ex = executor(mini_config(tmp_path), tmp_path)
        stage3, _ = artifacts.stage3(ex.cfg.gentoo.variant)
        forged = tmp_path / "forged.asc"
        synth.sign(other, stage3, forged)
        with pytest.raises(InstallError, match=r"not in the keyring|cannot be checked"):
            ex._do_VerifySignature(
                verify_op(tmp_path, stage3, forged, signing.keyring, signing.fingerprint)
            )
        # ... even when the forger's key is allowed, it must be in the configured keyring.
        with pytest.raises(InstallError):
            ex._do_VerifySignature(verify_op(tmp_path, stage3, forged, signing.keyring, fpr))
        assert other_keyring.exists()
    finally:
        synth.kill_agent(other)


def test_latest_stage3_is_resolved_from_a_signed_listing(tmp_path, signing, artifacts) -> None:
    cfg = mini_config(tmp_path)
    ex = executor(cfg, tmp_path)
    stage3, sig = artifacts.stage3(cfg.gentoo.variant)
    mirror = tmp_path / "mirror" / "releases" / "amd64" / "autobuilds"
    (mirror / "20250101T000000Z").mkdir(parents=True)
    shutil.copy(stage3, mirror / "20250101T000000Z" / stage3.name)
    shutil.copy(sig, mirror / "20250101T000000Z" / sig.name)
    listing = tmp_path / "listing.txt"
    listing.write_text(f"# Latest as of now\n20250101T000000Z/{stage3.name} 123\n")
    synth.sign(signing.home, listing, mirror / "latest-stage3-amd64-openrc.txt", clear=True)
    dest = tmp_path / "work" / "stage3.tar.xz"
    ex.state = type("S", (), {"resolved": {}})()
    op = FetchLatestStage3(
        "t/latest",
        (mirror / "latest-stage3-amd64-openrc.txt").as_uri(),
        mirror.as_uri(),
        "amd64-openrc",
        str(dest),
        str(signing.keyring),
        (signing.fingerprint,),
        str(tmp_path / "work" / "gnupg"),
    )
    ex._do_FetchLatestStage3(op)
    assert dest.read_bytes() == stage3.read_bytes()
    assert Path(str(dest) + ".asc").read_bytes() == sig.read_bytes()
    # A listing signed by nobody we trust is refused before anything is fetched.
    (mirror / "latest-stage3-amd64-openrc.txt").write_text(listing.read_text())
    dest.unlink()
    with pytest.raises(InstallError, match="signature check failed"):
        ex._do_FetchLatestStage3(op)
    assert not dest.exists()


# ---------------------------------------------------------------- extraction


def _extract(ex, archive: Path, dest: Path, root: Path, strip: bool) -> None:
    ex._do_Extract(Extract("t/x", str(archive), str(dest), str(root), strip, None))


def test_extraction_into_the_target_keeps_owners_and_xattrs(tmp_path, artifacts) -> None:
    cfg = mini_config(tmp_path)
    ex = executor(cfg, tmp_path)
    root = Path(cfg.install.target)
    root.mkdir()
    stage3, _ = artifacts.stage3(cfg.gentoo.variant)
    snap, _ = artifacts.snapshot()
    _extract(ex, stage3, root, root, False)
    repo = root / "var/db/repos/gentoo"
    repo.mkdir(parents=True, exist_ok=True)
    _extract(ex, snap, repo, root, True)
    assert os.getxattr(root / "usr/share/zoneinfo/UTC", "user.dom0test") == b"kept"
    assert (repo / "profiles/repo_name").read_text() == "gentoo\n"
    assert not any((repo / d / "profiles").exists() for d in os.listdir(repo) if d != "profiles")
    t = validate.Tree(str(root))
    bad = validate.failures(validate.stage3_checks(cfg, t) + validate.repo_checks(cfg, t))
    assert not bad, bad
    # the stage3's absolute symlink /etc/mtab -> /proc/self/mounts stays a link
    assert os.readlink(root / "etc/mtab") == "/proc/self/mounts"


def test_regression_profile_folder_bug(tmp_path, artifacts) -> None:
    """The old installer dumped a whole tree into a folder called profile/."""
    cfg = mini_config(tmp_path)
    ex = executor(cfg, tmp_path)
    root = Path(cfg.install.target)
    root.mkdir()
    stage3, _ = artifacts.stage3(cfg.gentoo.variant)
    snap, _ = artifacts.snapshot()
    _extract(ex, stage3, root, root, False)
    repo = root / "var/db/repos/gentoo"
    repo.mkdir(parents=True, exist_ok=True)

    # 1. A snapshot extracted without stripping its top folder is caught.
    subprocess.run(["tar", "-xf", str(snap), "-C", str(repo)], check=True)
    with pytest.raises(InstallError, match="without stripping its top folder"):
        ex._do_CheckTree(CheckTree("t/c", str(root), "repo"))
    shutil.rmtree(repo)
    repo.mkdir()

    # 2. A tree dumped into a stray folder at the top is caught.
    (root / "profile" / "usr").mkdir(parents=True)
    with pytest.raises(InstallError, match=r"unexpected at the top of .*: profile"):
        ex._do_CheckTree(CheckTree("t/c", str(root), "stage3"))
    shutil.rmtree(root / "profile")

    # 3. The destination cannot be redirected by a symlink in the target.
    outside = tmp_path / "outside"
    outside.mkdir()
    repo.rmdir()
    os.symlink(str(outside), repo)
    with pytest.raises(InstallError, match="refusing to extract"):
        _extract(ex, snap, repo, root, True)
    assert not os.listdir(outside)
    repo.unlink()
    repo.mkdir()

    # 4. An archive without one top folder is not stripped blindly.
    flat = tmp_path / "flat.tar.xz"
    subprocess.run(
        ["tar", "-cJf", str(flat), "-C", str(root), "etc/passwd", "usr/share"], check=True
    )
    with pytest.raises(InstallError, match="expected one top folder"):
        _extract(ex, flat, repo, root, True)

    # 5. Selecting the profile replaces the old link; `ln -sf` would have made the
    #    new link *inside* the old profile directory (here: a stray profile link).
    _extract(ex, snap, repo, root, True)
    link = root / "etc/portage/make.profile"
    old_profile = repo / "profiles/default/linux/amd64/23.0"
    assert os.path.isdir(link)
    new = "../../var/db/repos/gentoo/profiles/default/linux/amd64/23.0/systemd"
    before = sorted(os.listdir(old_profile))
    ex._do_Symlink(Symlink("t/l", str(link), new, str(root)))
    assert os.readlink(link) == new
    assert sorted(os.listdir(old_profile)) == before, "nothing was created in the old profile"
    coreutils = subprocess.run(["ln", "-sf", new, str(link)], check=True)
    assert coreutils.returncode == 0
    assert (repo / "profiles/default/linux/amd64/23.0/systemd/systemd").is_symlink(), (
        "ln -sf onto a link to a directory writes into that directory: the bug class"
    )
