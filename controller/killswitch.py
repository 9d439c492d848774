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
        # exit 0: a policy without an uplink has no kill switch, by design
        what = "check" if check else "load"
        print(f"dom0 killswitch: no [uplink] in {policy_file}: no kill switch to {what}")
        return 0
    from controller.cli import net_admin_problem

    if problem := net_admin_problem("dom0 killswitch"):
        print(problem, file=sys.stderr)
        return 1
    from controller.drivers.nft import KILLSWITCH_TABLE, Nft, NftError

    try:
        nft = Nft()
        matches = nft.killswitch_matches(ks)
    except NftError as e:
        print(f"dom0 killswitch: cannot read nftables: {e}", file=sys.stderr)
        return 1
    if matches:
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
