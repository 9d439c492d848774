"""Plans as text (for people) and JSON (for tools). Neither ever holds a secret:
operations only name secrets, the executor fills them in."""

from __future__ import annotations

import json
import shlex

from installer.ops import Op, Plan, Run, WriteFile


def plan_json(plan: Plan) -> str:
    data = plan.to_dict()
    data["digest"] = plan.digest()
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def _guard_lines(op: Op) -> list[str]:
    out = []
    if op.guard is not None:
        out.append(f"      skip if {op.guard.describe()}")
    req = getattr(op, "requires", None)
    if req is not None:
        out.append(f"      requires {req.describe()}")
    return out


def plan_text(plan: Plan, source: str = "") -> str:
    steps = plan.steps
    n_ops = sum(len(s.ops) for s in steps)
    width = len(str(len(steps)))
    lines = [
        f"dom0 install plan: {len(steps)} steps, {n_ops} operations"
        + (f" (config {source})" if source else "")
    ]
    lines += [f"  note: {n}" for n in plan.notes]
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
