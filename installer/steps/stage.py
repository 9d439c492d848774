"""Stage3 and ebuild repository: fetched, verified with Gentoo's keys, extracted
with GNU tar into the mounted target only, and checked."""

from __future__ import annotations

import posixpath

from installer.config import Config, Source
from installer.ops import (
    CheckTree,
    Extract,
    Fetch,
    FetchLatestStage3,
    RequireFiles,
    Step,
    VerifySignature,
)
from installer.paths import in_target
from installer.steps.base import StepBuilder, zfs_mounted

REPO = "/var/db/repos/gentoo"


def _gnupghome(cfg: Config) -> str:
    # A dedicated, fixed GNUPGHOME (recreated empty for every check) that holds
    # only the configured keyring: the operator's own keys play no part.
    return f"{cfg.install.work_dir}/gnupg"


def _local(cfg: Config, src: Source, default_name: str, sig_ext: str) -> tuple[str, str]:
    """The archive and signature paths on the live system for a source."""
    if src.file:
        return src.file, src.signature or src.file + sig_ext
    name = posixpath.basename(src.url) if src.url else default_name
    archive = f"{cfg.install.work_dir}/{name}"
    return archive, archive + sig_ext


def _fetch_step(
    cfg: Config,
    key: str,
    src: Source,
    archive: str,
    sig: str,
    sig_ext: str,
    default_url: str | None,
) -> Step:
    if src.file:
        # Offline install: the archive is on the medium; nothing to fetch.
        b = StepBuilder(cfg, f"{key}.fetch", f"use the local {key} and its signature")
        b.add(RequireFiles(b.oid("local"), (archive, sig)))
        return b.build()
    b = StepBuilder(cfg, f"{key}.fetch", f"fetch the {key} and its signature")
    if src.url or default_url:
        url = src.url or default_url or ""
        b.add(Fetch(b.oid("archive"), url, archive))
        sig_url = url + sig_ext
        b.add(Fetch(b.oid("signature"), sig_url, sig))
    else:
        variant = cfg.gentoo.variant.stage3
        base = f"{cfg.gentoo.mirror}/releases/{cfg.gentoo.variant.stage3.split('-')[0]}/autobuilds"
        b.add(
            FetchLatestStage3(
                b.oid("latest"),
                f"{base}/latest-stage3-{variant}.txt",
                base,
                variant,
                archive,
                cfg.gentoo.keyring,
                cfg.gentoo.stage3.fingerprints,
                _gnupghome(cfg),
            )
        )
    return b.build()


def steps(cfg: Config) -> list[Step]:
    out = []
    root = cfg.install.target
    g = cfg.gentoo

    stage_archive, stage_sig = _local(cfg, g.stage3, f"stage3-{g.variant.stage3}.tar.xz", ".asc")
    out.append(_fetch_step(cfg, "stage3", g.stage3, stage_archive, stage_sig, ".asc", None))

    b = StepBuilder(cfg, "stage3.verify", "verify the stage3 signature (Gentoo release key)")
    b.add(
        VerifySignature(
            b.oid("gpg"),
            stage_archive,
            stage_sig,
            g.keyring,
            g.stage3.fingerprints,
            _gnupghome(cfg),
        )
    )
    out.append(b.build())

    b = StepBuilder(cfg, "stage3.extract", f"extract the stage3 into {root} and check the tree")
    b.add(Extract(b.oid("tar"), stage_archive, root, root, False, zfs_mounted(cfg.boot_dataset)))
    b.add(CheckTree(b.oid("check"), root, "stage3"))
    out.append(b.build())

    snap_archive, snap_sig = _local(cfg, g.snapshot, "gentoo-latest.tar.xz", ".gpgsig")
    default_snapshot = f"{g.mirror}/snapshots/gentoo-latest.tar.xz"
    out.append(
        _fetch_step(
            cfg, "snapshot", g.snapshot, snap_archive, snap_sig, ".gpgsig", default_snapshot
        )
    )

    b = StepBuilder(cfg, "snapshot.verify", "verify the repository snapshot signature")
    b.add(
        VerifySignature(
            b.oid("gpg"),
            snap_archive,
            snap_sig,
            g.keyring,
            g.snapshot.fingerprints,
            _gnupghome(cfg),
        )
    )
    out.append(b.build())

    b = StepBuilder(cfg, "snapshot.extract", f"extract the ebuild repository into {REPO}")
    b.mkdir("repo-dir", REPO)
    b.add(
        Extract(
            b.oid("tar"),
            snap_archive,
            in_target(root, REPO),
            root,
            True,
            zfs_mounted(cfg.boot_dataset),
        )
    )
    b.add(CheckTree(b.oid("check"), root, "repo"))
    out.append(b.build())
    return out
