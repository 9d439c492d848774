"""`dom0 ca ...`'s arguments (light: the handlers, and cryptography, are
imported only when a `ca` command runs)."""

from __future__ import annotations

import argparse
from types import ModuleType

KINDS = ("root", "intermediate", "server", "agent")  # (as controller.pki.store.KINDS)


def _commands() -> ModuleType:
    from controller.pki import commands

    return commands


def register(sub: argparse._SubParsersAction, *, default_state: str) -> None:
    """`dom0 ca ...`, for controller/commands.py to call."""
    state_help = "the controller's state directory (default: %(default)s)"
    json_help = "print JSON instead of text"
    p = sub.add_parser(
        "ca", help="dom0's certificate authority: init, status, list, revoke, rotate"
    )
    csub = p.add_subparsers(dest="ca_command", metavar="ACTION", parser_class=type(p))
    csub.required = True

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--state", default=default_state, metavar="DIR", help=state_help)
        q.add_argument("--json", action="store_true", help=json_help)

    def passphrase(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--passphrase-file",
            metavar="PATH",
            help="the root key's passphrase: the one line of PATH (- for stdin)",
        )
        q.add_argument(
            "--ask", action="store_true", help="ask for the root key's passphrase on the terminal"
        )

    init = csub.add_parser("init", help="make the CA: a root and an issuing intermediate")
    init.add_argument(
        "--tld", default="internal", help="the site suffix, as in the policy (default: %(default)s)"
    )
    passphrase(init)
    common(init)
    init.set_defaults(
        handler=lambda a: _commands().init_command(
            a.state,
            tld=a.tld,
            passphrase_file=a.passphrase_file,
            ask_passphrase=a.ask,
            as_json=a.json,
        )
    )

    status = csub.add_parser(
        "status", help="the CA's certificates, those in force, expiry warnings"
    )
    common(status)
    status.set_defaults(handler=lambda a: _commands().status_command(a.state, as_json=a.json))

    lst = csub.add_parser("list", help="every certificate issued, expired and revoked too")
    lst.add_argument("--kind", choices=KINDS, help="only certificates of this kind")
    common(lst)
    lst.set_defaults(
        handler=lambda a: _commands().list_command(a.state, kind=a.kind, as_json=a.json)
    )

    revoke = csub.add_parser("revoke", help="revoke a certificate by serial: refused at once")
    revoke.add_argument("serial", metavar="SERIAL", help="its serial, as dom0 ca list shows it")
    revoke.add_argument(
        "--reason", default="unspecified", help="recorded with it (default: %(default)s)"
    )
    common(revoke)
    revoke.set_defaults(
        handler=lambda a: _commands().revoke_command(
            a.state, a.serial, reason=a.reason, as_json=a.json
        )
    )

    rotate = csub.add_parser(
        "rotate", help="a new issuing intermediate when the current one nears expiry"
    )
    rotate.add_argument("--force", action="store_true", help="rotate even if not yet due")
    passphrase(rotate)
    common(rotate)
    rotate.set_defaults(
        handler=lambda a: _commands().rotate_command(
            a.state,
            passphrase_file=a.passphrase_file,
            ask_passphrase=a.ask,
            force=a.force,
            as_json=a.json,
        )
    )


def register_tokens(sub: argparse._SubParsersAction, *, default_state: str) -> None:
    """`dom0 token create|list`."""
    p = sub.add_parser("token", help="enrollment tokens for agents: create, list")
    tsub = p.add_subparsers(dest="token_command", metavar="ACTION", parser_class=type(p))
    tsub.required = True

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument(
            "--state",
            default=default_state,
            metavar="DIR",
            help="the controller's state directory (default: %(default)s)",
        )
        q.add_argument("--json", action="store_true", help="print JSON instead of text")

    create = tsub.add_parser(
        "create", help="a single-use, expiring token for one rule's machines or one machine"
    )
    create.add_argument("--rule", metavar="RULE", help="for a machine of this rule")
    create.add_argument("--machine", metavar="FQDN", help="for this machine (web1.x.internal)")
    create.add_argument(
        "--ttl", default="10m", help="how long it may be used (default: %(default)s)"
    )
    create.add_argument(
        "--policy", metavar="FILE", help="check that the rule or machine is the policy's"
    )
    create.add_argument("--out", metavar="FILE", help="write it to FILE (0600) instead of stdout")
    common(create)

    def tokens() -> ModuleType:
        from controller.pki import token_commands

        return token_commands

    create.set_defaults(
        handler=lambda a: tokens().create_command(
            a.state,
            rule=a.rule,
            machine=a.machine,
            ttl=a.ttl,
            policy_file=a.policy,
            out=a.out,
            as_json=a.json,
        )
    )
    lst = tsub.add_parser("list", help="the tokens made, by the first 8 characters of their hash")
    common(lst)
    lst.set_defaults(handler=lambda a: tokens().list_command(a.state, as_json=a.json))
