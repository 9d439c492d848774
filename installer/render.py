"""Plans as text (for people) and JSON (for tools). Neither ever holds a secret:
operations only name secrets, the executor fills them in.

Both also show what each disk is (model, size, serial), read from this
machine when printed: it is not part of the plan or its digest, so a plan
made elsewhere, or a disk that moved, does not change what is applied."""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable

from installer import identity
from installer.ops import CheckDisk, Op, Plan, Run, WriteFile

Identify = Callable[[str], identity.Disk]


def plan_disks(plan: Plan, identify: Identify = identity.identify) -> list[identity.Disk]:
    return [identify(op.device) for _, op in plan.ops() if isinstance(op, CheckDisk)]


def plan_json(plan: Plan, *, identify: Identify = identity.identify) -> str:
    data = plan.to_dict()
    data["digest"] = plan.digest()
    data["disks"] = [d.to_dict() for d in plan_disks(plan, identify)]
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _guard_lines(op: Op) -> list[str]:
    out = []
    if op.guard is not None:
        out.append(f"      skip if {op.guard.describe()}")
    req = getattr(op, "requires", None)
    if req is not None:
        out.append(f"      requires {req.describe()}")
    return out


def plan_text(plan: Plan, source: str = "", *, identify: Identify = identity.identify) -> str:
    steps = plan.steps
    n_ops = sum(len(s.ops) for s in steps)
    width = len(str(len(steps)))
    lines = [
        f"dom0 install plan: {len(steps)} steps, {n_ops} operations"
        + (f" (config {source})" if source else "")
    ]
    lines += [f"  note: {n}" for n in plan.notes]
    lines += [f"  disk: {d.describe()}" for d in plan_disks(plan, identify)]
    lines.append(f"  digest: {plan.digest()}")
    for i, step in enumerate(steps, 1):
        session = "  [every run]" if step.session else ""
        lines.append(f"[{i:>{width}}/{len(steps)}] {step.id}: {step.title}{session}")
        for op in step.ops:
            lines.append(f"    {op.describe()}")
            if not isinstance(op, Run):
                lines += [f"      $ {' '.join(_quote(a) for a in c)}" for c in op.commands()]
            lines += _guard_lines(op)
            if isinstance(op, WriteFile):
                lines += [f"      | {line}" for line in op.content.splitlines()]
    return "\n".join(lines) + "\n"


def _quote(arg: str) -> str:
    return shlex.quote(arg)
