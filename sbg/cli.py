"""The `sbg` command: --version, check-config, keys fetch, ca init, kill, unkill, status."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TextIO

from sbg import __version__
from sbg.tap import DEFAULT_CONFIG


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"sbg: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="sbg", description="Simple Border Gateway for Matrix federation.")
    p.add_argument("--version", action="version", version=f"sbg {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    cc = sub.add_parser("check-config", help="validate a configuration file")
    cc.add_argument("file")
    cc.add_argument(
        "--skip-files",
        action="store_true",
        help="do not open the certificate, key, CA and password files",
    )

    keys = sub.add_parser("keys", help="external servers' signing keys")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", parser_class=_Parser)
    keys_sub.required = True
    kf = keys_sub.add_parser("fetch", help="fetch and check a server's keys; print verify_keys")
    kf.add_argument("server_name")
    kf.add_argument("--host", help="HOST[:PORT] to connect to (default: SERVER_NAME, port 8448)")
    kf.add_argument("--ca", help="trust only this CA file (default: the system roots)")

    ca = sub.add_parser("ca", help="the outbound interception CA")
    ca_sub = ca.add_subparsers(dest="ca_command", metavar="ACTION", parser_class=_Parser)
    ca_sub.required = True
    ci = ca_sub.add_parser("init", help="create DIR/ca.crt and DIR/ca.key")
    ci.add_argument("dir")

    for name, text in (("kill", "engage a kill switch"), ("unkill", "lift a kill switch")):
        k = sub.add_parser(name, help=text)
        k.add_argument("-c", "--config", default=DEFAULT_CONFIG)
        k.add_argument("--admin", help="http://HOST:PORT of the admin listener")
        k.add_argument("--token-file", help="file holding the admin bearer token")
        k.add_argument("--server", help="an external server name (default: the global switch)")
        k.add_argument("--direction", choices=("inbound", "outbound", "both"), default="both")
        if name == "kill":
            k.add_argument("--reason", help="why (recorded with the switch)")

    st = sub.add_parser("status", help="what the running gateway is doing")
    st.add_argument("-c", "--config", default=DEFAULT_CONFIG)
    st.add_argument("--admin", help="http://HOST:PORT of the admin listener")
    st.add_argument("--token-file", help="file holding the admin bearer token")
    st.add_argument("--json", action="store_true", help="one JSON object instead of text")
    return p


def main(
    argv: Sequence[str] | None = None, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        if args.command == "check-config":
            from sbg.commands.check_config import run as check_config

            return int(check_config(args.file, args.skip_files, out, err))
        if args.command == "keys":
            from sbg.commands.keys_fetch import run as keys_fetch

            return int(keys_fetch(args.server_name, args.host, args.ca, out, err))
        if args.command == "ca":
            from sbg.commands.ca_init import run as ca_init

            return int(ca_init(args.dir, out, err))
        if args.command == "status":
            from sbg.commands.status import run as status

            return status(
                config_path=args.config,
                admin=args.admin,
                token_file=args.token_file,
                as_json=args.json,
                out=out,
                err=err,
            )
        from sbg.commands.kill import run as kill

        return kill(
            engage=args.command == "kill",
            config_path=args.config,
            admin=args.admin,
            token_file=args.token_file,
            server=args.server,
            direction=args.direction,
            out=out,
            err=err,
            reason=getattr(args, "reason", None),
        )
    except KeyboardInterrupt:
        print("sbg: interrupted", file=err)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
