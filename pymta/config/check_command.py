"""``pymta check-config``: check a configuration file as start-up does, show what it means.

::

    pymta check-config /etc/pymta/pymta.toml          # every key, defaults filled in
    pymta check-config --diff /etc/pymta/pymta.toml   # only what differs from the defaults

The file is loaded by the same loader ``twistd pymta`` uses: every table
checked, every plugin and backend created and ``verifyObject``-checked, the
files they name read.  A problem is the same one line start-up prints
(``pymta: configuration error: FILE: KEY: PROBLEM``) and exit status 1.
On success the effective configuration is printed as TOML
(:mod:`pymta.config.effective`); secrets are not shown.
"""

from __future__ import annotations

import argparse
import sys

from pymta.admin import EXIT_ERROR, EXIT_OK
from pymta.config.errors import ConfigError

__all__ = ["register", "run", "configuration_error_line"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "check-config", help="check a configuration file as start-up does and print it",
        description="Load FILE exactly as start-up does (every table checked, plugins created "
                    "and verified, the files they name read) and print the effective "
                    "configuration as TOML, defaults filled in.  A problem is printed as the "
                    "one line start-up prints, with exit status 1.")
    parser.add_argument("file", metavar="FILE", help="the TOML configuration file")
    parser.add_argument("--diff", action="store_true",
                        help="print only the keys whose value differs from the default "
                             "(like postconf -n)")
    parser.set_defaults(run=run)


def configuration_error_line(error: ConfigError) -> str:
    """The line start-up prints for a bad configuration (pymta.tap.makeService)."""
    return f"pymta: configuration error: {error}"


def run(args: argparse.Namespace) -> int:
    from twisted.internet import reactor

    from pymta.config.effective import effective_document, load_recorded
    from pymta.config.toml_text import dumps

    try:
        config, recorder = load_recorded(args.file, reactor=reactor)
    except ConfigError as e:
        print(configuration_error_line(e), file=sys.stderr)
        return EXIT_ERROR
    document = effective_document(config, recorder, changed_only=args.diff)
    what = "differs from the defaults in" if args.diff else "effective configuration of"
    sys.stdout.write(f"# pymta check-config: {what} {config.source}\n")
    if document:
        sys.stdout.write("\n" + dumps(document))
    return EXIT_OK
