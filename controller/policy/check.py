"""`dom0 policy check FILE...`: a one-line summary per valid file, one line
per problem for an invalid one; exit 0 if all are valid, 2 otherwise."""

from __future__ import annotations

import json
import sys

from controller.policy.load import PolicyError, load_policy
from controller.policy.model import Policy


def summary(policy: Policy) -> str:
    quarantine = str(policy.quarantine.pool) if policy.quarantine.pool else "no lease"
    extra = ""
    if policy.uplink is not None:
        extra += f", uplink {policy.uplink.interface} to {policy.uplink.endpoint}"
    if policy.hub is not None:
        hubbed = [d.name for d in policy.domains.values() if d.hub]
        extra += f", hub {policy.hub.interface} for {', '.join(hubbed) or 'no domain'}"
    return (
        f"{policy.source}: ok: bridge {policy.bridge}, "
        f"{len(policy.domains)} domain(s) ({', '.join(policy.domains)}), "
        f"{len(policy.rules)} rule(s), tld {policy.tld}, quarantine {quarantine}{extra}"
    )


def check_command(files: list[str], *, as_json: bool = False) -> int:
    results = []
    failed = False
    for name in files:
        try:
            policy = load_policy(name)
        except PolicyError as e:
            failed = True
            results.append({"file": name, "ok": False, "problems": [str(p) for p in e.problems]})
            if not as_json:
                for p in e.problems:
                    print(p, file=sys.stderr)
            continue
        results.append({"file": name, "ok": True, "summary": summary(policy)})
        if not as_json:
            print(summary(policy))
    if as_json:
        print(json.dumps({"files": results}, indent=2))
    return 2 if failed else 0
