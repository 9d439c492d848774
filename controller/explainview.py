"""`dom0 policy explain FILE FROM TO SERVICE`: whether a new connection
passes, and the policy line that decides (controller/core/explain.py).

Exit 0: it passes; 1: it is dropped; 2: bad input. Machines are the ones
the state directory's store holds (their addresses, rules and names); for
machines it does not hold, or without a store (a policy not deployed yet),
stand-ins at addresses of their pools, which the answer says.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from controller.core.allocation import Allocation
from controller.core.explain import ExplainError, explain
from controller.policy.load import load_or_report
from controller.store import Store, StoreError

PROG = "dom0 policy explain"


class _Refused(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _allocations(state: str) -> list[Allocation]:
    directory = Path(state)
    try:
        present = (directory / "state.sqlite").exists()
    except OSError as e:
        raise _Refused(f"{state}: {e.strerror or e} (the state is root's: run as root)", 1) from e
    if not present:
        return []
    try:
        store = Store(directory, readonly=True)
        try:
            return store.allocations()
        finally:
            store.close()
    except StoreError as e:
        raise _Refused(str(e), 1) from e


def explain_command(
    policy_file: str,
    source: str,
    destination: str,
    service: str,
    *,
    state: str,
    as_json: bool = False,
) -> int:
    policy = load_or_report(policy_file, PROG)
    if policy is None:
        return 2
    try:
        answer = explain(policy, source, destination, service, _allocations(state))
    except _Refused as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return e.code
    except ExplainError as e:
        if as_json:
            print(json.dumps({"error": str(e)}))
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(answer.to_json(), indent=2))
    else:
        print(answer.line())
        if answer.rule:
            print(f"  nft: {answer.rule}")
    return 0 if answer.passes else 1
