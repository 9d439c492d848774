"""The service files dom0 ships in the repository's `init/`, read for the installer.

`installer/shipped` is a link to `../init`, so a wheel carries the files as
package data and a checkout reads them in place: what the installer writes
is, byte for byte, what the repository ships (and what docs/operations.md
describes).
"""

from __future__ import annotations

from importlib import resources

SYSTEMD_UNIT = "systemd/dom0.service"
SYSTEMD_ENV = "systemd/dom0.env"
OPENRC_SCRIPT = "openrc/dom0"
OPENRC_CONFD = "openrc/dom0.confd"
LOGROTATE = "logrotate/dom0"


def read(name: str) -> str:
    """The text of a shipped file, e.g. `read(SYSTEMD_UNIT)`."""
    return (resources.files("installer") / "shipped" / name).read_text(encoding="utf-8")
