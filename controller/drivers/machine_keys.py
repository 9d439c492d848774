"""Hub machines' tunnel keys: a private key per machine identity, 0600 under
`STATE/keys/machines/`, made when the machine is admitted, for `dom0 wg
export` to hand out; or, once the machine's agent has enrolled, only the
public key the agent sent (`ID.pub`): its private half never leaves the VM,
and the one dom0 had made is deleted then.

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
                for path in sorted(self.dir.glob("*.pub")):  # an agent's own key wins
                    try:
                        found[path.stem.replace("-", ":")] = keys.to_base64(
                            keys.from_base64(path.read_text().strip())
                        )
                    except (OSError, ValueError) as e:
                        log.error("machine key %s: %s", path, e)
            self._public = found
        return self._public

    def create(self, key_id: str) -> str:
        public = _b64(keys.public_of(keys.load_or_create(key_path(self.state_dir, key_id))))
        self.public()[key_id] = public
        return public

    def adopt(self, key_id: str, public: str) -> bool:
        """The machine's agent brought its own key: it is the machine's from
        now on, and dom0's private key for it is deleted. True if it changed."""
        public = keys.to_base64(keys.from_base64(public))
        if self.public().get(key_id) == public and not key_path(self.state_dir, key_id).exists():
            return False
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        pub = key_path(self.state_dir, key_id).with_suffix(".pub")
        tmp = pub.with_name(f".{pub.name}.tmp")
        tmp.write_text(public + "\n")
        tmp.replace(pub)
        key_path(self.state_dir, key_id).unlink(missing_ok=True)
        self.public()[key_id] = public
        log.info("machine key %s: the agent's own from now on", key_id)
        return True

    def is_agents(self, key_id: str) -> bool:
        return key_path(self.state_dir, key_id).with_suffix(".pub").exists()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()
