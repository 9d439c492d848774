"""`dom0 killswitch --policy FILE`: load the kill switch alone, now.

For boot: the installer's firewall service runs it right after its baseline,
before any interface is up, so that nothing leaves the WAN outside the tunnel
even before the controller starts (which writes the same table first thing).
"""

from __future__ import annotations

import sys

from controller.core.desired import policy_state
from controller.policy.load import load_or_report


def killswitch_command(policy_file: str, *, check: bool = False) -> int:
    policy = load_or_report(policy_file, "dom0 killswitch")
    if policy is None:
        return 2
    ks = policy_state(policy, ()).killswitch
    if ks is None:
        print(f"dom0 killswitch: {policy_file} has no [uplink]: no kill switch to load")
        return 0
    from controller.drivers.nft import KILLSWITCH_TABLE, Nft, NftError

    nft = Nft()
    if nft.killswitch_matches(ks):
        print(f"dom0 killswitch: table inet {KILLSWITCH_TABLE} already in place")
        return 0
    if check:
        print(f"dom0 killswitch: table inet {KILLSWITCH_TABLE} is missing or differs")
        return 1
    try:
        nft.write_killswitch(ks)
    except NftError as e:
        print(f"dom0 killswitch: nftables refused it: {e}", file=sys.stderr)
        return 1
    print(
        f"dom0 killswitch: loaded table inet {KILLSWITCH_TABLE}: only UDP to "
        f"{ks.endpoint_host}:{ks.endpoint_port} leaves {ks.wan}"
    )
    return 0
