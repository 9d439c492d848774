"""The bootstrap installer: turns a bare machine into a dom0 (Gentoo on root-on-ZFS)."""
