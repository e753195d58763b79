"""``pymta``: the administration command (``pymta COMMAND ...``).

Each subcommand lives in its own module, listed in :data:`SUBCOMMANDS`; the
module defines ``register(subparsers)``, which adds its parser with
``subparsers.add_parser(...)`` and sets ``run=`` (a function taking the parsed
arguments and returning an exit code) with ``set_defaults``.  To add a
command, write such a module and add its name here.

Exit codes: 0 success, 1 a problem the user can fix (reported in one line on
standard error as ``pymta COMMAND: problem``, raised as :class:`CommandError`),
2 bad usage (argparse's own message).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser", "CommandError", "SUBCOMMANDS", "EXIT_OK", "EXIT_ERROR", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2

#: modules that each define ``register(subparsers)``
SUBCOMMANDS = [
    "pymta.auth.passwd_command",
    "pymta.config.check_command",
    "pymta.config.plugins_command",
    "pymta.config.example_command",
    "pymta.server.dry_session_command",
    "pymta.control.queue_command",
    "pymta.dkim.keygen_command",
]


class CommandError(Exception):
    """A problem the user can fix: printed as one line, exit code 1."""


def build_parser() -> argparse.ArgumentParser:
    from pymta import __version__
    parser = argparse.ArgumentParser(prog="pymta", description="Administer a pymta mail server.")
    parser.add_argument("--version", action="version", version=f"pymta {__version__}",
                        help="print pymta's version and exit")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND",
                                       required=True)
    for module_name in SUBCOMMANDS:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pymta`` with ``argv`` (default: the command line); return the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    try:
        return args.run(args)
    except CommandError as e:
        print(f"pymta {args.command}: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"\npymta {args.command}: interrupted, nothing changed", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
