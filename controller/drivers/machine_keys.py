"""Hub machines' tunnel keys: a private key per machine identity, 0600 under
`STATE/keys/machines/`, made when the machine is admitted, for `dom0 wg
export` to hand out (agents will bring their own keys instead).

The core gets the public halves as a plain mapping (`public`), never a
callback that might create a file in the middle of a decision; the shell
creates the keys a decision asked for (`create`) and decides again.
"""

from __future__ import annotations

import base64
import logging
from pathlib import Path

from common.wireguard import keys

log = logging.getLogger(__name__)


def key_path(state_dir: Path, key_id: str) -> Path:
    """A machine's tunnel key, named by its identity (`Allocation.key_id`: the
    MAC it was first admitted with, which its slot keeps)."""
    return state_dir / "keys" / "machines" / f"{key_id.replace(':', '-')}.key"


class MachineKeys:
    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "keys" / "machines"
        self.state_dir = state_dir
        self._public: dict[str, str] | None = None

    def public(self) -> dict[str, str]:
        """key id -> base64 public key, for every key on disk (read once)."""
        if self._public is None:
            found: dict[str, str] = {}
            if self.dir.is_dir():
                for path in sorted(self.dir.glob("*.key")):
                    key_id = path.stem.replace("-", ":")
                    try:
                        found[key_id] = _b64(keys.public_of(keys.load(path)))
                    except keys.KeyFileError as e:  # unsafe or damaged: never used
                        log.error("machine key %s: %s", path, e)
            self._public = found
        return self._public

    def create(self, key_id: str) -> str:
        public = _b64(keys.public_of(keys.load_or_create(key_path(self.state_dir, key_id))))
        self.public()[key_id] = public
        return public


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
