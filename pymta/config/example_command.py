"""``pymta example-config``: print the commented example configuration.

::

    pymta example-config > /etc/pymta/pymta.toml      # every key, commented
    pymta example-config plugins/vip_tag.py           # the example site plugin

The examples are the files of the source tree's ``etc/`` directory; a built
wheel carries them as ``pymta/etc/`` (``setup.py`` copies them there), so an
installed pymta prints the same text as a source checkout.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from pymta.admin import EXIT_OK, CommandError

__all__ = ["register", "run", "example_directory", "EXAMPLE_CONFIG"]

EXAMPLE_CONFIG = "pymta.toml"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "example-config", help="print the commented example configuration (etc/pymta.toml)",
        description="Print the commented example configuration, which documents every key "
                    "with its default, or another file of the examples (the site plugin "
                    "plugins/vip_tag.py, aliases, vip-senders).")
    parser.add_argument("name", metavar="NAME", nargs="?", default=EXAMPLE_CONFIG,
                        help=f"a file of the examples (default {EXAMPLE_CONFIG})")
    parser.set_defaults(run=run)


def example_directory() -> Path:
    """Where the examples are: ``pymta/etc`` in an installed wheel, else the source tree's ``etc``."""
    installed = resources.files("pymta") / "etc"
    if installed.is_dir():
        return Path(str(installed))
    return Path(__file__).resolve().parent.parent.parent / "etc"


def run(args: argparse.Namespace) -> int:
    directory = example_directory()
    path = (directory / args.name).resolve()
    if directory.resolve() not in path.parents:
        raise CommandError(f"{args.name}: not a file of the examples")
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                       if p.is_file() and "__pycache__" not in p.parts)
        raise CommandError(f"{args.name}: no such example; there are: {', '.join(names)}") from None
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror or e}") from None
    sys.stdout.buffer.write(data)
    sys.stdout.flush()
    return EXIT_OK
