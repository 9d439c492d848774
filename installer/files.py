"""Contents of the files the installer writes into the new system.

Pure functions of the config, shared by the plan (what to write) and the
validator (what a finished install must contain), so the two cannot drift.
"""

from __future__ import annotations

import ipaddress

from installer import shipped
from installer.config import MIB, Config, format_size

HEADER = "# Written by `dom0 install`; see docs/installer.md.\n"

# ---------------------------------------------------------------- names


def partition_device(disk: str, number: int) -> str:
    """The device node of partition `number` on `disk`, by the kernel's naming rules."""
    if disk.startswith("/dev/disk/by-"):
        return f"{disk}-part{number}"
    name = disk.rsplit("/", 1)[-1]
    if disk.startswith("/dev/") and name[-1:].isdigit():
        return f"{disk}p{number}"  # nvme0n1p1, mmcblk0p1, loop0p1
    if disk.startswith("/dev/"):
        return f"{disk}{number}"  # sda1
    return f"{disk}-part{number}"  # an image file: a name for messages only


ESP_PART = 1
ZFS_PART = 2
SWAP_PART = 3


def esp_mountpoint(index: int) -> str:
    return "/efi" if index == 0 else f"/efi{index}"


def esp_label(index: int) -> str:
    return f"dom0-esp{index}"


def key_path(cfg: Config) -> str:
    return f"/etc/zfs/{cfg.pool.name}.key"


def crypt_swap_name(index: int) -> str:
    return f"crypt-swap{index}"


def zvol_swap(cfg: Config) -> str:
    return f"{cfg.pool.name}/swap"


# ---------------------------------------------------------------- services


# (openrc service, runlevel, systemd unit) for each service the installer enables.
SERVICES: dict[str, tuple[str, str, str]] = {
    "sshd": ("sshd", "default", "sshd.service"),
    "zfs-import": ("zfs-import", "boot", "zfs-import-cache.service"),
    "zfs-import-scan": ("", "", "zfs-import-scan.service"),
    "zfs-import-target": ("", "", "zfs-import.target"),
    "zfs-load-key": ("zfs-load-key", "boot", ""),
    "zfs-mount": ("zfs-mount", "boot", "zfs-mount.service"),
    "zfs-share": ("zfs-share", "default", "zfs-share.service"),
    "zfs-zed": ("zfs-zed", "default", "zfs-zed.service"),
    "zfs-target": ("", "", "zfs.target"),
    "zram": ("zram-init", "boot", ""),
    "dmcrypt": ("dmcrypt", "boot", ""),
    "firewall": ("dom0-firewall", "boot", "dom0-firewall.service"),
    "dom0": ("dom0", "default", "dom0.service"),
    "libvirtd": ("libvirtd", "default", "libvirtd.service"),
    "dhcpcd": ("dhcpcd", "default", "dhcpcd.service"),
    "display-manager": ("display-manager", "default", "gdm.service"),
    "elogind": ("elogind", "boot", ""),
}


def services_for(cfg: Config) -> list[str]:
    """The services enabled in the installed system, in the order they are enabled."""
    out = ["zfs-import"]
    if cfg.init == "systemd":
        out += ["zfs-import-scan", "zfs-import-target"]
    if cfg.encrypted and cfg.init == "openrc":
        out.append("zfs-load-key")
    out += ["zfs-mount", "zfs-share", "zfs-zed"]
    if cfg.init == "systemd":
        out.append("zfs-target")
    return out


def service_name(cfg: Config, key: str) -> str:
    openrc, _level, unit = SERVICES[key]
    return openrc if cfg.init == "openrc" else unit


# ---------------------------------------------------------------- portage


def next_series(series: str) -> str:
    major, minor = series.split(".")
    return f"{major}.{int(minor) + 1}"


def package_mask(cfg: Config) -> str:
    nxt = next_series(cfg.kernel.series)
    return (
        HEADER
        + f"# Keep the kernel on the {cfg.kernel.series} series: sys-fs/zfs-kmod supports a\n"
        "# kernel only once OpenZFS has been released for it, so the kernel may not\n"
        "# run ahead of the module. Raise the series when zfs-kmod supports the next.\n"
        f">=sys-kernel/gentoo-kernel-bin-{nxt}\n"
        f">=sys-kernel/gentoo-kernel-{nxt}\n"
        f">=virtual/dist-kernel-{nxt}\n"
    )


def package_use(cfg: Config) -> str:
    lines = [
        "# Rebuild the ZFS module with every kernel update (dist-kernel), and build",
        "# the initramfs with dracut when a kernel is installed.",
        "sys-fs/zfs dist-kernel",
        "sys-fs/zfs-kmod dist-kernel",
        "sys-kernel/installkernel dracut",
        "# The dom0 controller drives nftables through its JSON API from Python.",
        "net-firewall/nftables json python",
    ]
    if cfg.desktop.enabled:
        lines += [
            "# The login keyring is unlocked by PAM with the login password (no second",
            "# prompt after logging in to GDM).",
            "sys-auth/pambase gnome-keyring",
            "gnome-base/gnome-keyring pam",
        ]
    return HEADER + "\n".join(lines) + "\n"


def package_license() -> str:
    return HEADER + "sys-kernel/linux-firmware linux-fw-redistributable\n"


def packages_kernel(cfg: Config) -> tuple[str, ...]:
    return (
        "sys-kernel/linux-firmware",
        "sys-kernel/installkernel",
        f"sys-kernel/{cfg.kernel.package}",
    )


def packages_zfs() -> tuple[str, ...]:
    return ("sys-fs/zfs", "sys-fs/zfs-kmod")


def packages_host(cfg: Config) -> tuple[str, ...]:
    pkgs = [
        "net-firewall/nftables",
        "app-emulation/libvirt",
        "app-emulation/qemu",
        "app-admin/sudo",
        "sys-fs/dosfstools",
        "sys-boot/efibootmgr",
        "dev-lang/python",
    ]
    if cfg.network.dhcp:
        pkgs.append("net-misc/dhcpcd")
    if cfg.init == "openrc":
        pkgs.append("app-admin/logrotate")  # rotates /var/log/dom0.log (systemd: journal)
    if cfg.swap.mode == "zram":
        pkgs.append("sys-block/zram-init" if cfg.init == "openrc" else "sys-apps/zram-generator")
    if cfg.swap.mode == "partition" and cfg.encrypted:
        pkgs.append("sys-fs/cryptsetup")
    pkgs += list(cfg.gentoo.packages)
    return tuple(pkgs)


def packages_desktop() -> tuple[str, ...]:
    return (
        "gnome-base/gnome-light",
        "gnome-base/gdm",
        "gnome-base/gnome-keyring",
        "app-emulation/virt-manager",
    )


DISPLAY_MANAGERS = ("gnome-base/gdm", "x11-misc/sddm", "x11-misc/lightdm", "lxde-base/lxdm")


# ---------------------------------------------------------------- system


def hostname_files(cfg: Config) -> dict[str, str]:
    if cfg.init == "openrc":
        return {"/etc/conf.d/hostname": f'{HEADER}hostname="{cfg.system.hostname}"\n'}
    return {"/etc/hostname": f"{cfg.system.hostname}\n"}


def locale_files(cfg: Config) -> dict[str, str]:
    loc = cfg.system.locale
    charset = "UTF-8"
    files = {"/etc/locale.gen": f"{HEADER}{loc} {charset}\nC.UTF-8 UTF-8\n"}
    if cfg.init == "openrc":
        files["/etc/env.d/02locale"] = f'{HEADER}LANG="{loc}"\nLC_COLLATE="C.UTF-8"\n'
        files["/etc/conf.d/keymaps"] = f'{HEADER}keymap="{cfg.system.keymap}"\n'
    else:
        files["/etc/locale.conf"] = f"{HEADER}LANG={loc}\nLC_COLLATE=C.UTF-8\n"
        files["/etc/vconsole.conf"] = f"{HEADER}KEYMAP={cfg.system.keymap}\n"
    return files


def swap_devices(cfg: Config) -> list[str]:
    """The device each swap line of fstab names, for the configured mode."""
    if cfg.swap.mode == "partition":
        if cfg.encrypted:
            return [f"/dev/mapper/{crypt_swap_name(i)}" for i in range(len(cfg.disks.devices))]
        return [partition_device(d, SWAP_PART) for d in cfg.disks.devices]
    if cfg.swap.mode == "zvol":
        return [f"/dev/zvol/{zvol_swap(cfg)}"]
    return []


def fstab(cfg: Config) -> str:
    lines = [
        HEADER.rstrip("\n"),
        "# ZFS datasets are mounted by ZFS itself (zfs-mount), not from this file.",
        "# <fs>  <mountpoint>  <type>  <opts>  <dump>  <pass>",
    ]
    if cfg.bootloader.kind != "none":
        lines.append("# The ESPs hold ZFSBootMenu only; mount one to update it.")
    for i, _disk in enumerate(cfg.disks.devices):
        lines.append(
            f"PARTLABEL={esp_label(i)}  {esp_mountpoint(i)}  vfat  noauto,nofail,umask=0077  0 2"
        )
    mode = cfg.swap.mode
    if mode == "zram":
        lines.append("# swap: zram (compressed RAM), set up by its own service, not here.")
    elif mode == "none":
        lines.append("# swap: none.")
    elif mode == "partition":
        what = "encrypted with a fresh random key at every boot" if cfg.encrypted else "plain"
        lines.append(f"# swap: a partition on each disk, {what}.")
        for dev in swap_devices(cfg):
            lines.append(f"{dev}  none  swap  sw,discard  0 0")
    elif mode == "zvol":
        lines.append("# swap: a zvol (accept_zvol_swap_risk: may deadlock, OpenZFS issue 7734).")
        for dev in swap_devices(cfg):
            lines.append(f"{dev}  none  swap  discard  0 0")
    return "\n".join(lines) + "\n"


def zram_file(cfg: Config) -> tuple[str, str]:
    mib = cfg.swap.size // MIB
    if cfg.init == "openrc":
        return (
            "/etc/conf.d/zram-init",
            f"{HEADER}load_on_start=yes\nunload_on_stop=yes\nnum_devices=1\n"
            f"type0=swap\nflag0=\nsize0={mib}\nmaxs0=1\nalgo0=zstd\nlabl0=zram_swap\n",
        )
    return (
        "/etc/systemd/zram-generator.conf",
        f"{HEADER}[zram0]\nzram-size = {mib}\ncompression-algorithm = zstd\nswap-priority = 100\n",
    )


def dmcrypt_file(cfg: Config) -> tuple[str, str]:
    """Encrypted swap partitions with a random key from /dev/urandom at every boot."""
    devs = [partition_device(d, SWAP_PART) for d in cfg.disks.devices]
    if cfg.init == "openrc":
        body = [HEADER.rstrip("\n"), "# Swap first, so no key can end up in plain swap."]
        for i, dev in enumerate(devs):
            body += [
                f"swap={crypt_swap_name(i)}",
                f"source='{dev}'",
                "options='--cipher aes-xts-plain64 --key-size 512 --key-file /dev/urandom'",
            ]
        return "/etc/conf.d/dmcrypt", "\n".join(body) + "\n"
    body = [HEADER.rstrip("\n")]
    for i, dev in enumerate(devs):
        body.append(
            f"{crypt_swap_name(i)}  {dev}  /dev/urandom  "
            "swap,cipher=aes-xts-plain64,size=512,sector-size=4096"
        )
    return "/etc/crypttab", "\n".join(body) + "\n"


def nohibernate_file(cfg: Config) -> tuple[str, str]:
    where = (
        "/etc/systemd/sleep.conf.d/90-dom0-nohibernate.conf"
        if cfg.init == "systemd"
        else "/etc/elogind/sleep.conf.d/90-dom0-nohibernate.conf"
    )
    return (
        where,
        f"{HEADER}# Hibernation is off: a host running VMs on ZFS must not resume an image\n"
        "# of a pool that changed meanwhile, and swap may be zram, random-keyed or a zvol.\n"
        "[Sleep]\nAllowHibernation=no\nAllowHybridSleep=no\nAllowSuspendThenHibernate=no\n",
    )


def kernel_commandline(cfg: Config) -> str:
    return f"{cfg.bootloader.commandline} nohibernate".strip()


# ---------------------------------------------------------------- ZFS


def dracut_conf(cfg: Config) -> str:
    items = ["/etc/hostid", "/etc/modprobe.d/zfs.conf"]
    if cfg.encrypted:
        items.append(key_path(cfg))
    return (
        HEADER + "# Root on ZFS: the initramfs imports the pool. It carries /etc/hostid so the\n"
        "# pool is imported as this host's (no forced import), the ARC limit, and\n"
        "# with native encryption the key file, so ZFSBootMenu asks only once.\n"
        'hostonly="yes"\n'
        'nofsck="yes"\n'
        'add_dracutmodules+=" zfs "\n'
        'omit_dracutmodules+=" btrfs "\n'
        f'install_items+=" {" ".join(items)} "\n'
    )


def modprobe_zfs(cfg: Config) -> str:
    return (
        HEADER
        + "# Cap the ARC: this host's memory belongs to its VMs first.\n"
        + f"options zfs zfs_arc_max={cfg.zfs.arc_max}\n"
    )


# ---------------------------------------------------------------- firewall


def ssh_sets(cfg: Config) -> tuple[list[str], list[str]]:
    v4: list[str] = []
    v6: list[str] = []
    for s in cfg.firewall.ssh_sources:
        (v4 if ipaddress.ip_network(s).version == 4 else v6).append(s)
    return v4, v6


def _set(name: str, kind: str, elements: list[str]) -> list[str]:
    out = [f"    set {name} {{", f"        type {kind}", "        flags interval"]
    if elements:
        out.append(f"        elements = {{ {', '.join(elements)} }}")
    out.append("    }")
    return out


BASELINE_TABLE = "dom0_baseline"


def firewall_baseline(cfg: Config) -> str:
    v4, v6 = ssh_sets(cfg)
    port = cfg.sshd.port
    lines = [
        "#!/usr/sbin/nft -f",
        HEADER.rstrip("\n"),
        "# dom0 baseline firewall, loaded at boot before any network is up.",
        "# Fail-closed: input and forward drop whatever is not allowed below.",
        "# The dom0 controller takes over: once its own tables are loaded it deletes",
        f"# `table inet {BASELINE_TABLE}` in the same transaction.",
        f"table inet {BASELINE_TABLE}",
        f"delete table inet {BASELINE_TABLE}",
        f"table inet {BASELINE_TABLE} {{",
        *_set("ssh_v4", "ipv4_addr", v4),
        *_set("ssh_v6", "ipv6_addr", v6),
        "    chain input {",
        "        type filter hook input priority filter; policy drop;",
        '        iif "lo" accept',
        "        ct state established,related accept",
        "        ct state invalid drop",
        "        icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, "
        "parameter-problem, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, "
        "mld-listener-query } accept",
        "        icmp type { destination-unreachable, time-exceeded, parameter-problem } accept",
    ]
    if cfg.firewall.allow_ping:
        lines += [
            "        icmp type echo-request limit rate 10/second accept",
            "        icmpv6 type echo-request limit rate 10/second accept",
        ]
    if cfg.firewall.allow_dhcp:
        lines += [
            "        udp sport 67 udp dport 68 accept",
            "        ip6 saddr fe80::/10 udp sport 547 udp dport 546 accept",
        ]
    if cfg.sshd.enabled:
        lines += [
            f"        ip saddr @ssh_v4 tcp dport {port} accept",
            f"        ip6 saddr @ssh_v6 tcp dport {port} accept",
        ]
    lines += [
        "    }",
        "    chain forward {",
        "        type filter hook forward priority filter; policy drop;",
        "    }",
        "    chain output {",
        "        type filter hook output priority filter; policy accept;",
        "    }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def firewall_emergency() -> str:
    """Loaded when the baseline cannot be: nothing in, nothing forwarded."""
    return (
        "#!/usr/sbin/nft -f\n"
        + HEADER
        + "# Emergency ruleset: used only if the baseline failed to load.\n"
        f"table inet {BASELINE_TABLE}\n"
        f"delete table inet {BASELINE_TABLE}\n"
        f"table inet {BASELINE_TABLE} {{\n"
        "    chain input {\n"
        "        type filter hook input priority filter; policy drop;\n"
        '        iif "lo" accept\n'
        "    }\n"
        "    chain forward {\n"
        "        type filter hook forward priority filter; policy drop;\n"
        "    }\n"
        "    # the kill switch could not be loaded: nothing may leave at all\n"
        "    chain output {\n"
        "        type filter hook output priority filter; policy drop;\n"
        '        oif "lo" accept\n'
        "    }\n"
        "}\n"
    )


BASELINE_PATH = "/etc/dom0/firewall-baseline.nft"
EMERGENCY_PATH = "/etc/dom0/firewall-emergency.nft"


def firewall_service(cfg: Config) -> tuple[str, str, int]:
    if cfg.init == "openrc":
        return (
            "/etc/init.d/dom0-firewall",
            "#!/sbin/openrc-run\n"
            + HEADER
            + 'description="dom0 baseline firewall (fail-closed until the controller runs)"\n\n'
            "depend() {\n"
            "\tprovide firewall\n"
            "\tneed localmount\n"
            "\tbefore net\n"
            "}\n\n"
            "start() {\n"
            '\tebegin "Loading the dom0 baseline firewall and the WAN kill switch"\n'
            f"\tif ! {killswitch_boot(cfg)}; then\n"
            '\t\tewarn "baseline or kill switch failed to load, loading the emergency ruleset"\n'
            f"\t\t/usr/sbin/nft -f {EMERGENCY_PATH}\n"
            "\tfi\n"
            "\teend $?\n"
            "}\n\n"
            "# Stopping leaves the rules in place: the host never runs without a firewall.\n"
            "stop() {\n"
            "\treturn 0\n"
            "}\n",
            0o755,
        )
    return (
        "/etc/systemd/system/dom0-firewall.service",
        HEADER + "[Unit]\n"
        "Description=dom0 baseline firewall (fail-closed until the controller runs)\n"
        "DefaultDependencies=no\n"
        "Before=network-pre.target\n"
        "Wants=network-pre.target\n"
        "After=local-fs.target\n\n"
        "[Service]\n"
        "Type=oneshot\n"
        "RemainAfterExit=yes\n"
        f"ExecStart=/bin/sh -c '{killswitch_boot(cfg)} || "
        f"/usr/sbin/nft -f {EMERGENCY_PATH}'\n\n"
        "[Install]\n"
        "WantedBy=sysinit.target\n",
        0o644,
    )


def killswitch_boot(cfg: Config) -> str:
    """The baseline, then the dom0 policy's WAN kill switch (if it has an
    uplink): before any interface is up, nothing may leave the WAN outside
    the tunnel. The controller writes the same table first thing when it
    starts, and takes the baseline over."""
    return (
        f"/usr/sbin/nft -f {BASELINE_PATH} && "
        f"{DOM0_VENV}/bin/dom0 killswitch --policy {POLICY_PATH}"
    )


def needs_firewall(cfg: Config, service: str) -> tuple[str, str]:
    """Make a network-facing service refuse to start without the firewall."""
    if cfg.init == "openrc":
        return f"/etc/conf.d/{service}", 'rc_need="dom0-firewall"'
    unit = SERVICES[service][2]
    return (
        f"/etc/systemd/system/{unit}.d/dom0-firewall.conf",
        "[Unit]\nRequires=dom0-firewall.service\nAfter=dom0-firewall.service",
    )


# ---------------------------------------------------------------- sshd

SSHD_DROPIN = "/etc/ssh/sshd_config.d/50-dom0.conf"
SSHD_INCLUDE = "Include /etc/ssh/sshd_config.d/*.conf"


def sshd_dropin(cfg: Config) -> str:
    allowed = " ".join(u.name for u in cfg.users if u.ssh_keys)
    return (
        HEADER + "# Key-only SSH. sshd keeps the first value it reads, and sshd_config\n"
        "# includes this directory at its top, so these settings win.\n"
        f"Port {cfg.sshd.port}\n"
        "PermitRootLogin no\n"
        "PubkeyAuthentication yes\n"
        "AuthenticationMethods publickey\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "PermitEmptyPasswords no\n"
        f"AllowUsers {allowed}\n"
    )


def authorized_keys(keys: tuple[str, ...]) -> str:
    return "".join(k + "\n" for k in keys)


# ---------------------------------------------------------------- desktop

GDM_CUSTOM = "/etc/gdm/custom.conf"
VIDEO_HOOK = "/etc/libvirt/hooks/qemu.d/50-dom0-video"


def gdm_custom() -> str:
    return (
        HEADER + "# No automatic login: with autologin GDM never sees the password, so\n"
        "# pam_gnome_keyring cannot unlock the login keyring and GNOME asks for the\n"
        '# password again after the session starts (the "double login").\n'
        "[daemon]\n"
        "AutomaticLoginEnable=false\n"
        "TimedLoginEnable=false\n"
        "WaylandEnable=true\n\n"
        "[security]\n\n[xdmcp]\n\n[chooser]\n\n[debug]\n"
    )


def video_hook(cfg: Config) -> str:
    refuse = cfg.desktop.qxl_guests == "refuse"
    verdict = "exit 1" if refuse else "exit 0"
    return (
        "#!/bin/sh\n"
        + HEADER
        + "# libvirt qemu hook: VMs use the virtio video model, not qxl. A qxl guest\n"
        "# with a Wayland GDM greeter falls back to the greeter after login (the\n"
        '# "double login"); virtio-gpu works with Wayland and needs no guest driver.\n'
        '[ "$2" = prepare ] && [ "$3" = begin ] || exit 0\n'
        'if grep -Eq "<model[^>]*type=[\'\\"]qxl[\'\\"]"; then\n'
        '    echo "dom0: VM $1 uses the qxl video model; switch it to virtio:'
        ' virt-xml $1 --edit --video model.type=virtio" >&2\n'
        f"    {verdict}\n"
        "fi\n"
        "exit 0\n"
    )


def display_manager_conf() -> str:
    return HEADER + 'DISPLAYMANAGER="gdm"\n'


# ---------------------------------------------------------------- dom0 itself

POLICY_PATH = "/etc/dom0/policy.toml"
# The shipped service files run this venv's dom0 (an init system cannot take
# the program itself from a variable), so the installer accepts no other.
DOM0_VENV = "/opt/dom0"
DOM0_LOG = "/var/log/dom0.log"


def dom0_command(cfg: Config) -> str:
    return f"{DOM0_VENV}/bin/dom0 run --policy {POLICY_PATH} --state {cfg.dom0.state_dir}"


def dom0_settings(cfg: Config) -> tuple[str, str, int]:
    """The small file the shipped service reads its paths from. With the
    default config it is exactly the example shipped next to the service."""
    if cfg.init == "openrc":
        return (
            "/etc/conf.d/dom0",
            "# /etc/conf.d/dom0: read by /etc/init.d/dom0. Written by `dom0 install`.\n"
            f'dom0_policy="{POLICY_PATH}"\n'
            f'dom0_state="{cfg.dom0.state_dir}"\n'
            f'dom0_log="{DOM0_LOG}"\n',
            0o644,
        )
    return (
        "/etc/dom0/dom0.env",
        "# /etc/dom0/dom0.env: read by dom0.service. Written by `dom0 install`.\n"
        f"DOM0_POLICY={POLICY_PATH}\n"
        f"DOM0_STATE={cfg.dom0.state_dir}\n",
        0o644,
    )


def dom0_service(cfg: Config) -> tuple[str, str, int]:
    """The shipped unit or init script (init/), unchanged."""
    if cfg.init == "openrc":
        return "/etc/init.d/dom0", shipped.read(shipped.OPENRC_SCRIPT), 0o755
    return "/etc/systemd/system/dom0.service", shipped.read(shipped.SYSTEMD_UNIT), 0o644


def dom0_files(cfg: Config) -> list[tuple[str, str, int]]:
    """Every file of dom0's service, in the order they are written: its
    settings, the service itself and, under OpenRC (which writes the log to
    a file, not a journal), the log rotation."""
    out = [dom0_settings(cfg), dom0_service(cfg)]
    if cfg.init == "openrc":
        out.append(("/etc/logrotate.d/dom0", shipped.read(shipped.LOGROTATE), 0o644))
    return out


def sudoers_wheel() -> str:
    return HEADER + "%wheel ALL=(ALL:ALL) ALL\n"


def size_arg(n: int) -> str:
    return format_size(n)
