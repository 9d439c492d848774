"""Sub-command registration for `dom0`. Each handler imports its module lazily
so that `dom0 policy check` does not pay for trio, pyroute2 or nftables."""

from __future__ import annotations

import argparse

DEFAULT_STATE = "/var/lib/dom0"
# The three options most sub-commands share, worded once.
STATE_HELP = "the controller's state directory (default: %(default)s)"
POLICY_HELP = "policy file, TOML (see docs/policy.md)"
JSON_HELP = "print JSON instead of text"
ASK_JSON_HELP = (
    'print one JSON object instead of text, also when no controller answers ({"ok": false, '
    '"error": ...}, exit 1)'
)


def register(sub: argparse._SubParsersAction) -> None:
    _policy(sub)
    _plan(sub)
    _run(sub)
    _killswitch(sub)
    _status(sub)
    _ask(sub)
    _wg(sub)
    _machine(sub)
    _remap(sub)
    _host(sub)
    _flush(sub)
    _lab(sub)
    _bench(sub)
    from controller.pki.cli import register as register_ca
    from controller.pki.cli import register_tokens

    register_ca(sub, default_state=DEFAULT_STATE)
    register_tokens(sub, default_state=DEFAULT_STATE)


def _policy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="policy files: check, explain")
    psub = p.add_subparsers(dest="policy_command", metavar="ACTION", parser_class=type(p))
    psub.required = True
    check = psub.add_parser("check", help="validate policy files; one line per problem")
    check.add_argument("files", nargs="+", metavar="FILE", help="policy files, TOML")
    check.add_argument("--json", action="store_true", help=JSON_HELP)

    def handler(args: argparse.Namespace) -> int:
        from controller.policy.check import check_command

        return check_command(args.files, as_json=args.json)

    check.set_defaults(handler=handler)

    explain = psub.add_parser(
        "explain",
        help="may FROM open a connection to TO on SERVICE? which policy line decides",
        epilog="exit codes: 0 ok; 1 dropped (or the state directory cannot be read); "
        "2 bad input (argument, policy, a name the policy does not know)",
    )
    explain.add_argument("file", metavar="FILE", help=POLICY_HELP)
    explain.add_argument("source", metavar="FROM", help="a machine (pc1.lan) or a domain (lan)")
    explain.add_argument(
        "destination",
        metavar="TO",
        help="a machine (www1.dmz), a domain, internet, or an address (dom0's, or outside)",
    )
    explain.add_argument("service", metavar="SERVICE", help="tcp/PORT, udp/PORT or icmp")
    explain.add_argument(
        "--state",
        default=DEFAULT_STATE,
        metavar="DIR",
        help=f"machines as this state directory holds them; without a store there, "
        f"stand-ins at addresses of their pools (default: {DEFAULT_STATE})",
    )
    explain.add_argument("--json", action="store_true", help=JSON_HELP)

    def explain_handler(args: argparse.Namespace) -> int:
        from controller.explainview import explain_command

        return explain_command(
            args.file,
            args.source,
            args.destination,
            args.service,
            state=args.state,
            as_json=args.json,
        )

    explain.set_defaults(handler=explain_handler)


def _plan(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="show what the controller would change now; changes nothing")
    p.add_argument("--policy", required=True, metavar="FILE", help=POLICY_HELP)
    p.add_argument("--state", default=DEFAULT_STATE, metavar="DIR", help=STATE_HELP)
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    def handler(args: argparse.Namespace) -> int:
        from controller.planview import plan_command

        return plan_command(args.policy, args.state, as_json=args.json)

    p.set_defaults(handler=handler)


def _run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the controller in the foreground")
    p.add_argument("--policy", required=True, metavar="FILE", help=POLICY_HELP)
    p.add_argument("--state", default=DEFAULT_STATE, metavar="DIR", help=STATE_HELP)
    p.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe messages logged, to stderr (default: %(default)s)",
    )
    p.add_argument(
        "--resync",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="periodic full comparison against the kernel (default 60)",
    )

    def handler(args: argparse.Namespace) -> int:
        from controller.engine import run_command

        return run_command(args.policy, args.state, args.log_level, args.resync)

    p.set_defaults(handler=handler)


def _killswitch(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "killswitch", help="load the WAN kill switch of a policy now (at boot, before the network)"
    )
    p.add_argument("--policy", required=True, metavar="FILE", help=POLICY_HELP)
    p.add_argument(
        "--check", action="store_true", help="only say whether it is in place (exit 1 if not)"
    )

    def handler(args: argparse.Namespace) -> int:
        from controller.killswitch import killswitch_command

        return killswitch_command(args.policy, check=args.check)

    p.set_defaults(handler=handler)


def _status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="machines the running controller knows")
    p.add_argument("--state", default=DEFAULT_STATE, metavar="DIR", help=STATE_HELP)
    p.add_argument("--json", action="store_true", help=ASK_JSON_HELP)

    def handler(args: argparse.Namespace) -> int:
        from controller.control import status_command

        return status_command(args.state, as_json=args.json)

    p.set_defaults(handler=handler)


def _ask(sub: argparse._SubParsersAction) -> None:
    helps = {
        "reload": "re-read the policy file now (as SIGHUP does); an invalid one is refused",
        "resync": "compare everything with what the kernel and daemons hold now, and repair",
    }
    for cmd, text in helps.items():
        p = sub.add_parser(cmd, help=text)
        p.add_argument("--state", default=DEFAULT_STATE, metavar="DIR", help=STATE_HELP)
        p.add_argument("--json", action="store_true", help=ASK_JSON_HELP)

        def handler(args: argparse.Namespace, cmd: str = cmd) -> int:
            from controller.control import ask_command

            return ask_command(args.state, cmd, as_json=args.json)

        p.set_defaults(handler=handler)


def _wg(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("wg", help="WireGuard: the hub's machines")
    wsub = p.add_subparsers(dest="wg_command", metavar="ACTION", parser_class=type(p))
    wsub.required = True
    e = wsub.add_parser(
        "export", help="print a wg-quick configuration for a hub machine (contains its private key)"
    )
    e.add_argument("name", metavar="NAME", help="machine name (web1 or web1.x.internal) or MAC")
    e.add_argument("--state", default=DEFAULT_STATE, metavar="DIR", help=STATE_HELP)
    e.add_argument("--json", action="store_true", help=ASK_JSON_HELP)

    def handler(args: argparse.Namespace) -> int:
        from controller.wgexport import export_command

        return export_command(args.state, args.name, as_json=args.json)

    e.set_defaults(handler=handler)


def _machine(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("machine", help="act on one machine the running controller knows")
    msub = p.add_subparsers(dest="machine_command", metavar="ACTION", parser_class=type(p))
    msub.required = True
    r = msub.add_parser(
        "renew",
        help="make a machine re-acquire its address now (flaps its port's carrier)",
    )
    r.add_argument("name", metavar="NAME", help="machine name (web1 or web1.x.internal) or MAC")
    r.add_argument("--state", default=DEFAULT_STATE, metavar="DIR", help=STATE_HELP)
    r.add_argument("--json", action="store_true", help=ASK_JSON_HELP)

    def handler(args: argparse.Namespace) -> int:
        from controller.control import renew_command

        return renew_command(args.state, args.name, as_json=args.json)

    r.set_defaults(handler=handler)


def _remap(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("remap", help="give machines new addresses (make-before-break)")
    rsub = p.add_subparsers(dest="remap_command", metavar="ACTION", parser_class=type(p))
    rsub.required = True
    n = rsub.add_parser(
        "now",
        help="remap now: every machine of the domains with remap_every, or one machine",
    )
    n.add_argument("--machine", metavar="NAME", help="only this machine (name or MAC)")
    n.add_argument("--state", default=DEFAULT_STATE, metavar="DIR", help=STATE_HELP)
    n.add_argument("--json", action="store_true", help=ASK_JSON_HELP)

    def handler(args: argparse.Namespace) -> int:
        from controller.control import remap_command

        return remap_command(args.state, args.machine, as_json=args.json)

    n.set_defaults(handler=handler)


def _host(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("host", help="the host dom0 takes over: checks")
    hsub = p.add_subparsers(dest="host_command", metavar="ACTION", parser_class=type(p))
    hsub.required = True
    c = hsub.add_parser(
        "check",
        help="report anything else serving DHCP, DNS or NAT on the managed bridge (exit 1 if so)",
    )
    c.add_argument("--policy", required=True, metavar="FILE", help=POLICY_HELP)
    c.add_argument("--json", action="store_true", help=JSON_HELP)

    def handler(args: argparse.Namespace) -> int:
        from controller.hostcheck import check_command

        return check_command(args.policy, as_json=args.json)

    c.set_defaults(handler=handler)


def _flush(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "flush",
        help="remove everything dom0 put in place (tables, addresses, routes, daemons); "
        "refused while the controller runs",
    )
    p.add_argument("--policy", required=True, metavar="FILE", help=POLICY_HELP)
    p.add_argument("--state", default=DEFAULT_STATE, metavar="DIR", help=STATE_HELP)
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--json", action="store_true", help=JSON_HELP)

    def handler(args: argparse.Namespace) -> int:
        from controller.flush import flush_command

        return flush_command(args.policy, args.state, yes=args.yes, as_json=args.json)

    p.set_defaults(handler=handler)


def _lab(sub: argparse._SubParsersAction) -> None:
    from controller.lab.commands import register as register_lab

    p = sub.add_parser("lab", help="a whole dom0 host in network namespaces")
    register_lab(p)


def _bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure the controller's costs")
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT", parser_class=type(p))
    bsub.required = True
    r = bsub.add_parser("reconcile", help="admit one machine / full rebuild, vs. machines present")
    r.add_argument("--json", action="store_true", help="print JSON instead of a table")
    r.add_argument("--sizes", default="10,1000,10000", help="comma-separated machine counts")
    r.add_argument(
        "--runs", type=int, default=200, help="admissions measured per size and policy (p99: 100+)"
    )
    r.add_argument("--rebuilds", type=int, default=10, help="full rebuilds measured per size")
    r.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")

    def handler(args: argparse.Namespace) -> int:
        from controller.bench.reconcile import bench_command

        return bench_command(args)

    r.set_defaults(handler=handler)

    w = bsub.add_parser("wireguard", help="hub peer add cost, first packet, tunnel throughput")
    w.add_argument("--json", action="store_true", help="print JSON instead of a table")
    w.add_argument("--sizes", default="10,1000", help="hub peers present (comma-separated)")
    w.add_argument("--runs", type=int, default=100, help="peer additions measured per size")
    w.add_argument("--seconds", type=int, default=3, help="iperf3 duration per path")
    w.add_argument("--no-throughput", action="store_true", help="skip the two-lab iperf3 part")
    w.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")

    def wg_handler(args: argparse.Namespace) -> int:
        from controller.bench.wireguard import bench_command as wg_bench

        return wg_bench(args)

    w.set_defaults(handler=wg_handler)

    pu = bsub.add_parser(
        "push", help="a change to every machine -> last agent ACK; enrollment; memory"
    )
    pu.add_argument("--json", action="store_true", help="print JSON instead of a table")
    pu.add_argument(
        "--agents", default="10,50,200", help="agent counts, comma-separated (each 1..200)"
    )
    pu.add_argument(
        "--changes", type=int, default=100, help="changes measured per agent count (p99: 100+)"
    )
    pu.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")

    def push_handler(args: argparse.Namespace) -> int:
        from controller.bench.push import bench_command as push_bench

        return push_bench(args)

    pu.set_defaults(handler=push_handler)
