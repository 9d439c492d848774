"""dom0's tables in nft's language, and set elements as JSON (pure).

The rule expressions of `ruleset` use the vocabulary of nftables' JSON
schema; `expr`/`stmt` below write the subset dom0 uses as nft text, which is
what the atomic whole-table transaction is made of (see the package's
docstring for why text). Interface names, the only strings that come from
the operator, are validated by the policy loader (`[A-Za-z0-9_.:-]{1,15}`)
and quoted here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from controller.core.desired import Element, KillSwitch, Shape
from controller.drivers.nft.ruleset import (
    BASELINE_TABLE,
    FAMILIES,
    KILLSWITCH_TABLE,
    METERS,
    TABLE,
    Chain,
    SetSpec,
    chains,
    killswitch_chains,
    killswitch_marker,
    set_specs,
    shape_marker,
    spec_of,
)
from controller.policy.macs import format_mac

_IFNAME_KEYS = ("iifname", "oifname")


class RenderError(ValueError):
    pass


def _is_ifname(left: Any) -> bool:
    return isinstance(left, dict) and left.get("meta", {}).get("key") in _IFNAME_KEYS


def value(v: Any, quote: bool = False) -> str:
    if isinstance(v, bool):
        raise RenderError(f"boolean {v!r} outside a fib match")
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        if v.startswith("@"):
            return v
        return f'"{v}"' if quote else v
    if isinstance(v, dict):
        if "set" in v and isinstance(v["set"], list):
            return "{ " + ", ".join(value(x, quote) for x in v["set"]) + " }"
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        if "range" in v:
            lo, hi = v["range"]
            return f"{value(lo)}-{value(hi)}"
    return expr(v)


def expr(e: Any) -> str:
    if not isinstance(e, dict):
        return value(e)
    if "meta" in e:
        return f"meta {e['meta']['key']}"
    if "payload" in e:
        p = e["payload"]
        if "base" in p:
            return f"@{p['base']},{p['offset']},{p['len']}"
        return f"{p['protocol']} {p['field']}"
    if "concat" in e:
        return " . ".join(expr(x) for x in e["concat"])
    if "&" in e:
        a, b = e["&"]
        return f"{expr(a)} & {value(b)}"
    if "ct" in e:
        c = e["ct"]
        return f"ct {c['dir']} {c['key']}" if c.get("dir") else f"ct {c['key']}"
    if "fib" in e:
        f = e["fib"]
        return f"fib {' . '.join(f['flags'])} {f['result']}"
    raise RenderError(f"no text for expression {e!r}")


def _match(m: dict) -> str:
    left, right, op = m["left"], m["right"], m["op"]
    text = expr(left)
    if isinstance(right, bool):  # fib: a route exists or not
        if op not in ("==", "!="):
            raise RenderError(f"op {op!r} with a boolean")
        missing = (right is False) == (op == "==")
        return f"{text} {'missing' if missing else 'exists'}"
    quote = _is_ifname(left)
    if op in ("==", "in"):
        # a bitwise expression needs the explicit operator
        return (
            f"{text} == {value(right, quote)}" if "&" in left else f"{text} {value(right, quote)}"
        )
    if op == "!=":
        return f"{text} != {value(right, quote)}"
    raise RenderError(f"no text for operator {op!r}")


def stmt(s: dict) -> str:
    if "match" in s:
        return _match(s["match"])
    for verdict in ("accept", "drop", "return"):
        if verdict in s:
            return verdict
    if "jump" in s:
        return f"jump {s['jump']['target']}"
    if "counter" in s:
        return "counter"
    if "masquerade" in s:
        return "masquerade"
    if "dnat" in s:
        d = s["dnat"]
        return f"dnat {d['family']} to {d['addr']}:{d['port']}"
    if "set" in s and isinstance(s["set"], dict):
        d = s["set"]
        inner = " ".join(_dynset_stmt(x) for x in d.get("stmt", []))
        return f"{d['op']} {d['set']} {{ {expr(d['elem'])} {inner} }}"
    raise RenderError(f"no text for statement {s!r}")


def _dynset_stmt(s: dict) -> str:
    if "limit" in s:
        lim = s["limit"]
        over = "over " if lim.get("inv") else ""
        burst = f" burst {lim['burst']} packets" if lim.get("burst") else ""
        return f"limit rate {over}{lim['rate']}/{lim['per']}{burst}"
    if "ct count" in s:
        c = s["ct count"]
        return f"ct count {'over ' if c.get('inv') else ''}{c['val']}"
    raise RenderError(f"no text for statement {s!r} in a set statement")


def rule(r: list[dict]) -> str:
    return " ".join(stmt(s) for s in r)


def _chain(name: str, chain: Chain) -> list[str]:
    base, rules = chain
    lines = [f"\tchain {name} {{"]
    if base:
        lines.append(
            f"\t\ttype {base['type']} hook {base['hook']} priority {base['prio']}; "
            f"policy {base['policy']};"
        )
    lines += [f"\t\t{rule(r)}" for r in rules]
    lines.append("\t}")
    return lines


def _set_decl(spec: SetSpec) -> str:
    key = f"typeof {spec.typeof}" if spec.typeof else "type " + " . ".join(spec.kinds)
    flags = "; flags interval" if spec.interval else ""
    return f"\tset {spec.name} {{ {key}{flags}; }}"


def _replace(family: str, name: str) -> list[str]:
    # add + delete + define in one transaction: replaced, never absent
    return [f"add table {family} {name}", f"delete table {family} {name}"]


def element_text(spec: SetSpec, e: Element) -> str:
    parts = []
    for kind, v in zip(spec.kinds, e, strict=True):
        if kind == "ifname":
            parts.append(f'"{v}"')
        elif kind == "chaddr":
            parts.append("0x" + v.replace(":", ""))
        elif kind == "nd_target":
            parts.append(f"0x{int(ipaddress.IPv6Address(v)):032x}")
        else:
            parts.append(v)
    return " . ".join(parts)


def tables_text(
    shape: Shape, sets: Mapping[tuple[str, str], Iterable[Element]], chunk: int = 2000
) -> str:
    """The whole of dom0's tables (and the boot baseline's removal), as one
    nft script: one atomic transaction."""
    lines = _replace("inet", BASELINE_TABLE)
    all_chains = chains(shape)
    for family in FAMILIES:
        lines += _replace(family, TABLE)
        lines.append(f"table {family} {TABLE} {{")
        for spec in set_specs(shape).values():
            if spec.family == family:
                lines.append(_set_decl(spec))
        for m in METERS:
            if m.family == family:
                timeout = f" timeout {m.timeout}s;" if m.timeout else ""
                flags = "dynamic,timeout" if m.timeout else "dynamic"
                lines.append(
                    f"\tset {m.name} {{ type {m.kind}; size {m.size}; flags {flags};{timeout} }}"
                )
        lines.append(f"\tchain {shape_marker(shape)} {{\n\t}}")
        for name, chain in all_chains[family].items():
            lines += _chain(name, chain)
        lines.append("}")
    for key, elements in sets.items():
        spec = _spec(key)
        elems = sorted(element_text(spec, e) for e in elements)
        for i in range(0, len(elems), chunk):
            body = ", ".join(elems[i : i + chunk])
            lines.append(f"add element {spec.family} {TABLE} {spec.name} {{ {body} }}")
    return "\n".join(lines) + "\n"


def killswitch_text(ks: KillSwitch) -> str:
    lines = _replace("inet", KILLSWITCH_TABLE)
    lines.append(f"table inet {KILLSWITCH_TABLE} {{")
    lines.append(f"\tchain {killswitch_marker(ks)} {{\n\t}}")
    for name, chain in killswitch_chains(ks).items():
        lines += _chain(name, chain)
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- elements as JSON (the incremental path) -----------------------------------


def _spec(key: tuple[str, str]) -> SetSpec:
    spec = spec_of(key)
    if spec is None:
        raise RenderError(f"no set {key[0]} {TABLE} {key[1]}")
    return spec


def elem_json(key: tuple[str, str], element: Element) -> Any:
    spec = _spec(key)
    parts = [_value_json(k, v) for k, v in zip(spec.kinds, element, strict=True)]
    return parts[0] if len(parts) == 1 else {"concat": parts}


def _value_json(kind: str, v: str) -> Any:
    if kind == "inet_service":
        return int(v)
    if kind == "chaddr":
        return int(v.replace(":", ""), 16)
    if kind == "nd_target":
        return int(ipaddress.IPv6Address(v))
    if kind in ("ipv4_addr", "ipv6_addr") and "/" in v:
        addr, length = v.split("/")
        return {"prefix": {"addr": addr, "len": int(length)}}
    return v


def _value_text(kind: str, v: Any) -> str:
    if isinstance(v, dict):
        if "prefix" in v:
            return f"{v['prefix']['addr']}/{v['prefix']['len']}"
        if "range" in v:
            lo, hi = v["range"]
            return f"{_value_text(kind, lo)}-{_value_text(kind, hi)}"
        if "elem" in v:
            return _value_text(kind, v["elem"]["val"])
    if kind == "chaddr" and isinstance(v, int):
        return format_mac(v)
    if kind == "nd_target" and isinstance(v, int):
        return str(ipaddress.IPv6Address(v))
    return str(v).lower() if isinstance(v, str) and kind != "ifname" else str(v)


def elem_from_json(key: tuple[str, str], v: Any) -> Element:
    spec = _spec(key)
    if isinstance(v, dict) and "elem" in v:
        v = v["elem"]["val"]
    values = v["concat"] if isinstance(v, dict) and "concat" in v else [v]
    return tuple(_value_text(k, x) for k, x in zip(spec.kinds, values, strict=True))
