"""nftables: dom0's own tables.

- `ruleset`: what the tables hold, as plain data (pure): the sets with their
  types, and the chains, whose rules are expressions in the vocabulary of
  nftables' JSON schema (`{"match": ...}`, `{"payload": ...}`, ...).
- `render`: that data as nft's language, for the one atomic transaction that
  writes a table whole, and set elements as JSON, for the small
  transactions of the incremental path (pure).
- `client`: libnftables, bound to the network namespace it was created in.

Whole tables are written as text because libnftables 1.0.6 (Debian 12) cannot
express two things dom0 needs in JSON: `dynamic` sets (per-port and
per-machine meters) and `typeof` sets (a raw DHCP field as a set key).
"""

from controller.drivers.nft.client import KernelState, Nft, NftError
from controller.drivers.nft.ruleset import BASELINE_TABLE, KILLSWITCH_TABLE, TABLE

__all__ = ["BASELINE_TABLE", "KILLSWITCH_TABLE", "TABLE", "KernelState", "Nft", "NftError"]
