"""`dom0 lab up | down | demo | container`: argument parsing and output; the work is elsewhere.

Exit codes: 0 done, 1 failed at run time, 2 bad input (one line), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from controller.lab.rundir import DEFAULT_NAME, check_name
from controller.lab.topology import PORT_PREFIX

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="lab_command", metavar="ACTION", parser_class=type(parser))
    sub.required = True

    up = sub.add_parser(
        "up", help="build a lab, start the controller and the VMs; leave it running"
    )
    up.add_argument("--name", default=DEFAULT_NAME, help=f"lab name (default {DEFAULT_NAME})")
    up.add_argument("--vms", default="4", metavar="N", help="number of VMs, 1..200 (default 4)")
    up.add_argument(
        "--policy",
        metavar="FILE",
        help="run the controller on FILE itself: edits reload it "
        "(default: a copy of policies/lab.toml in the run directory)",
    )
    up.add_argument(
        "--mac",
        action="append",
        default=[],
        metavar="vmI=MAC",
        help="give VM I this MAC (repeatable); the others get MACs the policy's rules take in turn",
    )
    up.add_argument(
        "--ports",
        default=PORT_PREFIX,
        metavar="PREFIX",
        help=f"bridge port names PREFIX1..PREFIXN (default {PORT_PREFIX}, as libvirt's taps)",
    )
    up.add_argument("--json", action="store_true", help="print the lab as JSON")
    up.add_argument("--replace", action="store_true", help="tear down a lab of that name first")
    up.add_argument(
        "--no-controller",
        action="store_true",
        help="topology, echo services and DHCP clients only; start `dom0 run` yourself",
    )
    up.add_argument(
        "--timeout", type=float, default=30.0, metavar="S", help="wait for leases (default 30)"
    )
    up.add_argument(
        "--keep-on-error", action="store_true", help="leave a failed lab for inspection"
    )
    up.add_argument(
        "--no-agents",
        action="store_true",
        help="no CA and no agents: the VMs keep their DHCP clients (and hub VMs join with "
        "`dom0 wg export`)",
    )
    up.set_defaults(handler=_up)

    down = sub.add_parser("down", help="stop everything a lab started and delete it")
    down.add_argument("--name", default=DEFAULT_NAME, help=f"lab name (default {DEFAULT_NAME})")
    down.add_argument("--json", action="store_true", help="print what was removed as JSON")
    down.set_defaults(handler=_down)

    demo = sub.add_parser(
        "demo", help="build a lab, print what each VM got and can reach, tear it down"
    )
    demo.add_argument(
        "--name", help="lab name (default: a fresh one, demoPIDXXXX); it must not exist"
    )
    demo.add_argument("--vms", default="4", metavar="N", help="number of VMs, 1..200 (default 4)")
    demo.add_argument("--policy", metavar="FILE", help="policy file (default policies/lab.toml)")
    demo.add_argument("--json", action="store_true", help="print the results as JSON")
    demo.add_argument(
        "--no-agents", action="store_true", help="VMs with DHCP clients instead of the agent"
    )
    demo.set_defaults(handler=_demo)

    _register_container(sub, type(parser))


def _register_container(sub: argparse._SubParsersAction, parser_class: type) -> None:
    from controller.lab.container import TIMEOUT

    container = sub.add_parser(
        "container", help="containers in a lab VM: namespaces plugged into its agent's bridge"
    )
    csub = container.add_subparsers(dest="container_command", metavar="ACTION",
                                    parser_class=parser_class)  # fmt: skip
    csub.required = True
    add = csub.add_parser(
        "add", help="make container NAME in VM N and wait for the address its agent gives it"
    )
    add.add_argument("--vm", required=True, metavar="N", help="the VM: N of vmN")
    add.add_argument("container", metavar="NAME", help="the container's name (one DNS label)")
    add.add_argument("--name", default=DEFAULT_NAME, help=f"lab name (default {DEFAULT_NAME})")
    add.add_argument("--timeout", type=float, default=TIMEOUT, metavar="S",
                     help=f"wait for the agent's bridge, then the address (default {TIMEOUT:g})")  # fmt: skip
    add.add_argument("--json", action="store_true", help="print the container as JSON")
    add.set_defaults(handler=_container_add)
    ls = csub.add_parser("list", help="the lab's containers and their addresses")
    ls.add_argument("--name", default=DEFAULT_NAME, help=f"lab name (default {DEFAULT_NAME})")
    ls.add_argument("--json", action="store_true", help="as JSON")
    ls.set_defaults(handler=_container_list)
    rm = csub.add_parser("del", help="delete container NAME of VM N (its namespace)")
    rm.add_argument("--vm", required=True, metavar="N", help="the VM: N of vmN")
    rm.add_argument("container", metavar="NAME", help="the container's name")
    rm.add_argument("--name", default=DEFAULT_NAME, help=f"lab name (default {DEFAULT_NAME})")
    rm.set_defaults(handler=_container_del)


def _err(prog: str, message: str) -> None:
    print(f"{prog}: {message}", file=sys.stderr)


def _progress(prog: str) -> Callable[[str], None]:
    return lambda message: _err(prog, message)


def _check_vms(prog: str, text: str) -> int | None:
    from controller.lab.build import check_vms

    try:
        vms = int(text)
    except ValueError:
        _err(prog, f"--vms: must be a whole number from 1 to 200, got {text!r}")
        return None
    problem = check_vms(vms)
    if problem:
        _err(prog, f"--vms: {problem}")
        return None
    return vms


def _check_policy(prog: str, policy: str | None) -> bool:
    """The policy file exists, validates, and fits the lab's fixed interfaces;
    else one line per problem (the policy's own lines, as `dom0 policy check`)."""
    from controller.lab.build import DEFAULT_POLICY, check_policy
    from controller.policy.load import load_or_report

    path = Path(policy) if policy else DEFAULT_POLICY
    if not path.is_file():
        what = "no such file" if not path.exists() else "not a file"
        _err(prog, f"--policy: {path}: {what}")
        return False
    try:
        path.read_bytes()
    except OSError as exc:
        _err(prog, f"--policy: {path}: {exc.strerror or exc}")
        return False
    loaded = load_or_report(path, prog)
    if loaded is None:
        return False
    problems = check_policy(loaded)
    for line in problems:
        _err(prog, f"--policy: {line}")
    return not problems


def parse_macs(texts: list[str], vms: int) -> tuple[dict[int, str], str | None]:
    """--mac vmI=MAC options -> {I: normalized MAC}, or the first problem."""
    from controller.lab.topology import BRIDGE_MAC
    from controller.policy.macs import FULL, MacError, is_multicast, normalize_mac, parse_mac

    out: dict[int, str] = {}
    for text in texts:
        vm, sep, mac = text.partition("=")
        if not sep or not vm.startswith("vm") or not vm[2:].isdigit():
            return {}, f"{text!r} is not vmI=MAC, expected e.g. vm3=52:54:00:12:34:56"
        index = int(vm[2:])
        if not 1 <= index <= vms:
            return {}, f"{text!r}: the lab has vm1..vm{vms}, expected one of them"
        if index in out:
            return {}, f"{text!r}: vm{index} is given twice, expected one MAC per VM"
        try:
            value = parse_mac(mac)
        except MacError as exc:
            return {}, f"{vm}: {exc}"
        if is_multicast(value) or value in (0, FULL):
            return {}, f"{vm}: {mac} is not a unicast MAC, expected e.g. 52:54:00:12:34:56"
        normal = normalize_mac(mac)
        if normal == BRIDGE_MAC:
            return {}, f"{vm}: {normal} is virbr0's own MAC, expected another"
        if normal in out.values():
            return {}, f"{vm}: {normal} is given to another VM too, expected distinct MACs"
        out[index] = normal
    return out, None


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM behaves like Ctrl-C, so `finally` blocks tear the lab down."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _up(args: argparse.Namespace) -> int:
    from controller.lab import build, controllerproc, dhcpclient, topology
    from controller.lab.rundir import LabError

    prog = "dom0 lab up"
    if problem := check_name(args.name):
        _err(prog, f"--name: {problem}")
        return EXIT_USAGE
    vms = _check_vms(prog, args.vms)
    if vms is None or not _check_policy(prog, args.policy):
        return EXIT_USAGE
    macs, problem = parse_macs(args.mac, vms)
    if problem:
        _err(prog, f"--mac: {problem}")
        return EXIT_USAGE
    if problem := topology.check_port_prefix(args.ports):
        _err(prog, f"--ports: {problem}")
        return EXIT_USAGE
    try:
        with _sigterm_interrupts():
            lab = build.create(
                args.name,
                vms,
                policy=Path(args.policy).absolute() if args.policy else build.DEFAULT_POLICY,
                live_policy=args.policy is not None,
                fit=True,
                macs=macs,
                port_prefix=args.ports,
                controller=not args.no_controller,
                lease_timeout=args.timeout,
                replace=args.replace,
                teardown_on_error=not args.keep_on_error,
                agents=not args.no_agents and not args.no_controller,
                progress=_progress(prog),
                warn=lambda line: _err(prog, f"warning: {line}"),
            )
    except build.LabExists as exc:
        _err(prog, f"{exc}, or use --replace")
        return EXIT_USAGE
    except LabError as exc:
        _err(prog, str(exc))
        return EXIT_FAIL
    except KeyboardInterrupt:
        _err(prog, "interrupted; the partial lab was torn down")
        return EXIT_INTERRUPTED
    leases = {i: dhcpclient.read_lease(lab, i) for i in sorted(lab.vms())}
    proc = controllerproc.pid(lab)
    info = summary(lab, leases, proc.pid if proc else None)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print(render_summary(info))
    return EXIT_OK


def summary(lab: Any, leases: dict[int, Any], controller_pid: int | None) -> dict[str, Any]:
    record = lab.read()
    vms = lab.vms()
    name_opt = "" if lab.name == DEFAULT_NAME else f" --name {lab.name}"
    policy = record.get("policy") or {}
    return {
        "name": lab.name,
        "rundir": str(lab.root),
        "namespaces": {"wan": lab.wan_ns, "vpn": lab.vpn_ns, "dom0": lab.dom0_ns},
        "policy": {
            "path": str(lab.policy_path),
            "source": policy.get("source"),
            "live": bool(policy.get("live")),
        },
        "controller": {
            "pid": controller_pid,
            "state": str(lab.state_dir),
            "log": str(lab.controller_log),
        },
        "vms": [
            {
                "vm": f"vm{i}",
                "namespace": vms[i]["namespace"],
                "mac": vms[i]["mac"],
                "port": vms[i]["port"],
                "rule": vms[i].get("rule"),
                "domain": vms[i].get("domain"),
                "lease": leases[i].to_json() if leases.get(i) else None,
            }
            for i in sorted(vms)
        ],
        "commands": {
            "shell": f"ip netns exec {lab.vm_ns(1)} sh",
            "status": f"dom0 status --state {lab.state_dir}",
            "controller": (
                f"ip netns exec {lab.dom0_ns} {_dom0_command()} run --policy {lab.policy_path} "
                f"--state {lab.state_dir} >>{lab.controller_log} 2>&1 &"
            ),
            "down": f"dom0 lab down{name_opt}",
        },
    }


def _dom0_command() -> str:
    """The `dom0` entry point next to this interpreter (a venv's bin is often not on PATH)."""
    beside = Path(sys.executable).parent / "dom0"
    return str(beside) if beside.exists() else "dom0"


def render_summary(info: dict[str, Any]) -> str:
    ctl = info["controller"]
    lines = [
        f"lab {info['name']} is up: {len(info['vms'])} VMs, "
        + (f"controller pid {ctl['pid']}" if ctl["pid"] else "no controller running"),
        "  namespaces: " + " ".join(info["namespaces"].values()),
        "  policy:     " + _policy_line(info["policy"]),
    ]
    width = max(len(v["namespace"]) for v in info["vms"])
    port_width = max(len(v["port"]) for v in info["vms"])
    rule_width = max(len(_rule(v)) for v in info["vms"])
    for v in info["vms"]:
        lease = v["lease"]
        if lease:
            name = lease["hostname"] or "(no name)"
            if lease["hostname"] and lease["domain"]:
                name = f"{lease['hostname']}.{lease['domain']}"
            got = f"{lease['ip'] + '/' + str(lease['prefix']):<18}  {name}"
        else:
            got = "no lease yet"
        lines.append(
            f"  {v['namespace'].ljust(width)}  {v['mac']}  {v['port'].ljust(port_width)}  "
            f"{_rule(v).ljust(rule_width)}  {got}"
        )
    cmds = info["commands"]
    if not ctl["pid"]:
        lines.append(f"  controller:  {cmds['controller']}")
    lines += [
        f"  run inside:  {cmds['shell']}   (any namespace above)",
        f"  status:      {cmds['status']}",
        f"  logs:        {info['rundir']}/logs/",
        f"  tear down:   {cmds['down']}",
    ]
    return "\n".join(lines)


def _rule(vm: dict[str, Any]) -> str:
    if vm.get("rule"):
        return f"rule {vm['rule']} ({vm['domain']})"
    return "no rule (quarantined)"


def _policy_line(policy: dict[str, Any]) -> str:
    if policy["live"]:
        return f"{policy['path']} (live: the controller reloads it when it changes)"
    if policy["source"]:
        return (
            f"{policy['path']} (live; a copy of {policy['source']}, whose own edits "
            "do not reach the lab)"
        )
    return f"{policy['path']} (no controller policy yet)"


def _down(args: argparse.Namespace) -> int:
    from controller.lab import teardown
    from controller.lab.rundir import LabError

    prog = "dom0 lab down"
    if problem := check_name(args.name):
        _err(prog, f"--name: {problem}")
        return EXIT_USAGE
    try:
        with _sigterm_interrupts():
            report = teardown.down(args.name)
    except (LabError, OSError) as exc:
        _err(prog, str(exc))
        return EXIT_FAIL
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    if report.found_anything:
        _err(
            prog,
            f"lab {args.name} removed: {len(report.stopped)} processes stopped, "
            f"{len(report.namespaces)} namespaces deleted",
        )
    else:
        _err(prog, f"no lab {args.name}: nothing to do")
    return EXIT_OK


def _demo(args: argparse.Namespace) -> int:
    from controller.lab import demo
    from controller.lab.rundir import LabError

    prog = "dom0 lab demo"
    if args.name is not None and (problem := check_name(args.name)):
        _err(prog, f"--name: {problem}")
        return EXIT_USAGE
    vms = _check_vms(prog, args.vms)
    if vms is None or not _check_policy(prog, args.policy):
        return EXIT_USAGE
    try:
        with _sigterm_interrupts():
            name, rows = demo.run(
                vms,
                policy=args.policy,
                name=args.name,
                progress=_progress(prog),
                warn=lambda line: _err(prog, f"warning: {line}"),
                agents=not args.no_agents,
            )
    except demo.build.LabExists as exc:
        _err(prog, f"{exc}; the demo builds and removes a lab of its own")
        return EXIT_USAGE
    except LabError as exc:
        _err(prog, str(exc))
        return EXIT_FAIL
    except KeyboardInterrupt:
        _err(prog, "interrupted; the lab was torn down")
        return EXIT_INTERRUPTED
    if args.json:
        print(json.dumps(demo.to_json(rows, name, demo.topology.VPN_WAN), indent=2))
    else:
        print(demo.render(rows))
    return EXIT_OK if all(r.ok for r in rows) else EXIT_FAIL


def _container_lab(prog: str, args: argparse.Namespace) -> tuple[Any, int | None] | None:
    """The lab and VM index of a container command, or None (said, one line)."""
    from controller.lab.rundir import Lab

    if problem := check_name(args.name):
        _err(prog, f"--name: {problem}")
        return None
    vm: int | None = None
    if getattr(args, "vm", None) is not None:
        text = args.vm.removeprefix("vm")
        if not text.isdigit() or int(text) < 1:
            _err(prog, f"--vm: {args.vm!r}, expected a VM's number, e.g. 1 for vm1")
            return None
        vm = int(text)
    return Lab.named(args.name), vm


def _container_add(args: argparse.Namespace) -> int:
    from controller.lab import container
    from controller.lab.rundir import LabError

    prog = "dom0 lab container add"
    found = _container_lab(prog, args)
    if found is None:
        return EXIT_USAGE
    lab, vm = found
    assert vm is not None
    try:
        with _sigterm_interrupts():
            made = container.add(lab, vm, args.container, timeout=args.timeout)
    except container.Refused as exc:
        _err(prog, str(exc))
        return EXIT_USAGE
    except LabError as exc:
        _err(prog, str(exc))
        return EXIT_FAIL
    except KeyboardInterrupt:
        _err(prog, "interrupted; the container was removed")
        return EXIT_INTERRUPTED
    if args.json:
        print(json.dumps(made, indent=2))
    else:
        print(f"{made['fqdn']}  {made['address']}  (namespace {made['namespace']}: "
              f"ip netns exec {made['namespace']} sh)")  # fmt: skip
    return EXIT_OK


def _container_list(args: argparse.Namespace) -> int:
    from controller.lab import container
    from controller.lab.rundir import LabError

    prog = "dom0 lab container list"
    found = _container_lab(prog, args)
    if found is None:
        return EXIT_USAGE
    try:
        rows = container.listed(found[0])
    except LabError as exc:
        _err(prog, str(exc))
        return EXIT_FAIL
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        _err(prog, f"lab {args.name} has no containers")
    for r in rows:
        print(f"{r['vm']}  {r['name']}  {r['address'] or '(no address)'}  {r['namespace']}")
    return EXIT_OK


def _container_del(args: argparse.Namespace) -> int:
    from controller.lab import container
    from controller.lab.rundir import LabError

    prog = "dom0 lab container del"
    found = _container_lab(prog, args)
    if found is None:
        return EXIT_USAGE
    lab, vm = found
    assert vm is not None
    try:
        with _sigterm_interrupts():
            container.remove(lab, vm, args.container)
    except container.Refused as exc:
        _err(prog, str(exc))
        return EXIT_USAGE
    except (LabError, OSError) as exc:
        _err(prog, str(exc))
        return EXIT_FAIL
    return EXIT_OK
