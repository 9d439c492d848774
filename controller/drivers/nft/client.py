"""libnftables: apply dom0's tables and read back what the kernel holds.

One context, bound to the network namespace it is created in, used from one
thread at a time. Whole tables go in as nft text in one transaction (add,
delete, define: replaced atomically, never absent); element changes go in
as JSON, also one transaction each (a bad element rolls back the batch).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from controller.core.desired import Element, KillSwitch, Shape
from controller.core.plan import Plan
from controller.dataplane import observed_killswitch
from controller.drivers.nft.render import (
    elem_from_json,
    elem_json,
    killswitch_text,
    tables_text,
)
from controller.drivers.nft.ruleset import (
    BASELINE_TABLE,
    FAMILIES,
    KILLSWITCH_TABLE,
    TABLE,
    chains,
    killswitch_chains,
    killswitch_marker,
    set_specs,
    shape_marker,
)


class NftError(Exception):
    pass


# An empty chain whose name records the fingerprint of a table's chains and
# rules as the kernel listed them right after dom0 wrote them: a rule
# deleted or changed, or a chain's policy changed, no longer matches it.
STAMP = "rules_"
_MARKERS = ("shape_", "ks_", STAMP)


def _zeroed(v: object) -> object:
    """The listing without what traffic changes (counters) or the kernel
    numbers (handles)."""
    if isinstance(v, dict):
        return {k: (None if k == "counter" else _zeroed(x)) for k, x in v.items() if k != "handle"}
    if isinstance(v, list):
        return [_zeroed(x) for x in v]
    return v


def fingerprint(objs: list[dict]) -> str:
    """Of a table's listing (libnftables JSON): its chains, their hooks,
    priorities and policies, their rules, and its sets' declarations (not
    their elements, which the set diff takes care of)."""
    parts: list[object] = []
    for obj in objs:
        if "chain" in obj:
            c = obj["chain"]
            if not c["name"].startswith(_MARKERS):
                parts.append(["chain", _zeroed({k: v for k, v in c.items() if k != "table"})])
        elif "rule" in obj:
            r = obj["rule"]
            if not r["chain"].startswith(_MARKERS):
                parts.append(["rule", r["chain"], _zeroed(r["expr"])])
        elif "set" in obj:
            d = {k: v for k, v in obj["set"].items() if k not in ("elem", "table")}
            parts.append(["set", _zeroed(d)])
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return digest[:16]


def stamped(objs: list[dict]) -> bool:
    """Whether the table still is what dom0 wrote (its stamp matches)."""
    names = [o["chain"]["name"] for o in objs if "chain" in o]
    stamps = [n for n in names if n.startswith(STAMP)]
    return len(stamps) == 1 and stamps[0] == STAMP + fingerprint(objs)


def _chain_names(objs: list[dict]) -> set[str]:
    return {
        o["chain"]["name"]
        for o in objs
        if "chain" in o and not o["chain"]["name"].startswith(STAMP)
    }


@dataclass(frozen=True, slots=True)
class KernelState:
    shape_matches: bool  # both tables present, chains as `shape` says, no boot baseline
    sets: dict[tuple[str, str], frozenset[Element]]


def element_commands(plan: Plan) -> list[dict]:
    cmds = []
    for verb, changes in (("delete", plan.delete), ("add", plan.add)):
        for key, elements in changes.items():
            if elements:
                ref = {
                    "family": key[0],
                    "table": TABLE,
                    "name": key[1],
                    "elem": [elem_json(key, e) for e in elements],
                }
                cmds.append({verb: {"element": ref}})
    return cmds


class Nft:
    def __init__(self) -> None:
        import nftables  # Debian's python3-nftables; imported late: only the controller needs it

        self.ctx = nftables.Nftables()
        self.ctx.set_json_output(True)
        self.ctx.set_handle_output(False)

    def _run(self, cmds: list[dict]) -> None:
        if not cmds:
            return
        rc, _out, err = self.ctx.json_cmd({"nftables": cmds})
        if rc != 0:
            raise NftError((err or "nftables refused the transaction").strip().splitlines()[0])

    def _script(self, text: str) -> None:
        rc, _out, err = self.ctx.cmd(text)
        if rc != 0:
            lines = (err or "nftables refused the transaction").strip().splitlines()
            raise NftError(lines[0] if lines else "nftables refused the transaction")

    def rebuild(self, shape: Shape, sets: Mapping[tuple[str, str], Iterable[Element]]) -> None:
        self._script(tables_text(shape, sets))
        self._stamp([(f, TABLE) for f in FAMILIES])

    def _stamp(self, tables: list[tuple[str, str]]) -> None:
        """Record, in each table, the fingerprint of what the kernel now lists."""
        lines = []
        for family, table in tables:
            objs = self._list(family, table, terse=True)
            if objs is None:
                raise NftError(f"table {family} {table} is gone right after it was written")
            lines.append(f"add chain {family} {table} {STAMP}{fingerprint(objs)}")
        self._script("\n".join(lines) + "\n")

    def apply(self, plan: Plan) -> None:
        """Element changes only, in one transaction (all or nothing)."""
        self._run(element_commands(plan))

    def _list(self, family: str, table: str, *, terse: bool = False) -> list[dict] | None:
        """A table's listing; `terse`: without set elements (10,000 of them
        cost a second to list and parse)."""
        if terse:
            self.ctx.set_terse_output(True)
        try:
            rc, out, _err = self.ctx.cmd(f"list table {family} {table}")
        finally:
            if terse:
                self.ctx.set_terse_output(False)
        if rc != 0:
            return None
        return list(json.loads(out)["nftables"])

    def read(self, shape: Shape) -> KernelState:
        """What the kernel holds now in dom0's tables."""
        sets: dict[tuple[str, str], frozenset[Element]] = {}
        ok = True
        marker = shape_marker(shape)
        expected = chains(shape)
        specs = set_specs(shape)
        for family in FAMILIES:
            objs = self._list(family, TABLE)
            if objs is None:
                ok = False
                continue
            for obj in objs:
                if "set" in obj:
                    s = obj["set"]
                    key = (family, s["name"])
                    if key in specs:  # (meters are the kernel's to fill)
                        sets[key] = frozenset(elem_from_json(key, e) for e in s.get("elem", []))
            if _chain_names(objs) != {*expected[family], marker} or not stamped(objs):
                ok = False
        if set(sets) != set(specs):
            ok = False
        if self._list("inet", BASELINE_TABLE) is not None:
            ok = False  # the boot baseline is (back): the next write takes it over
        return KernelState(ok, sets)

    def observe_killswitch(self, ks: KillSwitch | None) -> KillSwitch | None:
        """`ks` if the kernel holds exactly it; a stand-in for another kill
        switch table if there is one; None if there is none."""
        objs = self._list("inet", KILLSWITCH_TABLE)
        if objs is None:
            return None
        return observed_killswitch(ks is not None and self._killswitch_is(objs, ks), True, ks)

    def killswitch_matches(self, ks: KillSwitch) -> bool:
        """Whether the kernel holds exactly this kill switch."""
        objs = self._list("inet", KILLSWITCH_TABLE)
        return objs is not None and self._killswitch_is(objs, ks)

    @staticmethod
    def _killswitch_is(objs: list[dict], ks: KillSwitch) -> bool:
        want = {*killswitch_chains(ks), killswitch_marker(ks)}
        return _chain_names(objs) == want and stamped(objs)

    def write_killswitch(self, ks: KillSwitch) -> None:
        """Replace the kill switch table atomically (never a moment without it)."""
        self._script(killswitch_text(ks))
        self._stamp([("inet", KILLSWITCH_TABLE)])

    def delete_killswitch(self) -> None:
        self._script(f"add table inet {KILLSWITCH_TABLE}\ndelete table inet {KILLSWITCH_TABLE}\n")

    def delete_tables(self) -> None:
        """Remove dom0's tables (tests and `lab down` only: the controller
        leaves them in place when it stops, that is the point)."""
        self._script(
            "".join(f"add table {f} {TABLE}\ndelete table {f} {TABLE}\n" for f in FAMILIES)
        )

    def ruleset(self) -> list[dict]:
        """The whole ruleset of this namespace, every table (libnftables JSON
        objects): what `dom0 host check` judges; NftError if unreadable."""
        rc, out, err = self.ctx.cmd("list ruleset")
        if rc != 0:
            raise NftError((err or "nftables cannot list the ruleset").strip().splitlines()[0])
        return [o for o in json.loads(out or '{"nftables": []}')["nftables"] if "metainfo" not in o]

    def delete_table(self, family: str, name: str) -> None:
        """Remove one table if it exists (`dom0 flush`: dom0's tables only)."""
        self._script(f"add table {family} {name}\ndelete table {family} {name}\n")
