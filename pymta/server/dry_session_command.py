"""``pymta test-session``: an SMTP dialogue through the configured plugin chains, delivering nothing.

::

    printf 'EHLO client.example\\nMAIL FROM:<a@example.com>\\nRCPT TO:<alice@example.org>\\nQUIT\\n' \\
        | pymta test-session --config /etc/pymta/pymta.toml --from-ip 192.0.2.7
    pymta test-session --config pymta.toml          # on a terminal: type the commands

Like ``exim -bh``: the dialogue (standard input, or typed on a terminal) runs
through the server's own session (state machine, connect/helo/mail/rcpt/data
plugin chains, the core's relay and routing rules) as a client at
``--from-ip`` would see it; every reply (``S:``), client line (``C:``),
plugin answer with its reason and time, and log line (``***``) is printed.
Nothing is delivered and nothing is written to the spool: after the end of
data the data-stage plugins run on the message and what would be queued is
printed, with the header fields that would be prepended.  ``--tls`` makes
the session as if encrypted, ``--auth USER`` as if USER had logged in
(neither is negotiated).  Lines may end in LF: each is sent with CRLF.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys

from pymta.admin import EXIT_ERROR, EXIT_OK, CommandError
from pymta.config.errors import ConfigError

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "test-session", help="run an SMTP dialogue through the configured plugins, store nothing",
        description="Read an SMTP dialogue from standard input (or from the terminal) and run it "
                    "through the configured session: every reply, every plugin decision with "
                    "its reason and time, and the log are printed.  Nothing is delivered and "
                    "nothing is written to the spool (like exim -bh).")
    parser.add_argument("--config", metavar="FILE", required=True, help="the TOML configuration file")
    parser.add_argument("--from-ip", metavar="IP", default="127.0.0.1",
                        help="the client's address (default 127.0.0.1)")
    parser.add_argument("--listener", metavar="NAME",
                        help="the listener the client connects to (default: the first)")
    parser.add_argument("--tls", action="store_true",
                        help="the session is as if encrypted (TLS is not negotiated)")
    parser.add_argument("--auth", metavar="USER",
                        help="the session is as if USER had authenticated (SMTP AUTH)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        client_ip = str(ipaddress.ip_address(args.from_ip))
    except ValueError:
        raise CommandError(f"--from-ip: {args.from_ip!r} is not an IP address") from None
    if args.auth is not None and not args.auth:
        raise CommandError("--auth: the user name is empty")

    from twisted.internet import reactor

    from pymta.config.check_command import configuration_error_line
    from pymta.config.loader import load_config
    from pymta.server.dry_session import DrySession, InputLines, pick_listener

    try:
        config = load_config(args.config, reactor=reactor)
    except ConfigError as e:
        print(configuration_error_line(e), file=sys.stderr)
        return EXIT_ERROR
    try:
        listener = pick_listener(config, args.listener)
    except ValueError as e:
        raise CommandError(f"--listener: {e}") from None

    def out(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    interactive = sys.stdin.isatty()
    session = DrySession(config, reactor, out, client_ip=client_ip, listener=listener,
                         tls=args.tls, auth_user=args.auth, echo=not interactive)
    lines = InputLines(sys.stdin.buffer, reactor, interactive)
    failures = []

    def start() -> None:
        d = session.run(lines)
        d.addErrback(failures.append)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    if failures:
        failures[0].printTraceback(file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK
