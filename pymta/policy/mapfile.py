"""Map files: the lookup tables the policies read (alias map, sender login map).

One format, like Postfix's ``aliases`` and lookup tables::

    # a comment
    alice@example.org:  value, value     # a comment after blanks
                        value            # a line starting with blanks continues
    @example.net:       value            # every address in the domain

A key is ``user@domain`` or ``@domain``; it is compared lower-cased, with
its domain IDNA-encoded, and may appear once.  What the values are (and how
they are separated) is the map's own business: :func:`map_entries` gives
each entry's key and its value text, line by line.  The file is UTF-8 (a
byte order mark is ignored).  Every problem is an error naming the file and
line, made by the map's own ``error(source, line, problem)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from pymta.addresses import normalize_domain

__all__ = ["MapEntry", "map_entries", "read_map_file"]

_COMMENT = re.compile(r"(?:^|(?<=\s))#.*")

T = TypeVar("T")
#: makes the exception for a problem: (file name, line number, problem)
ErrorFactory = Callable[[str, int, str], Exception]


@dataclass(frozen=True)
class MapEntry:
    #: the line the entry starts on
    line: int
    #: ``user@domain`` or ``@domain``, lower case, the domain IDNA-encoded
    key: str
    #: the key's domain (IDNA-encoded)
    domain: str
    #: (line number, text): the rest of the key's line, then each continuation line
    values: tuple[tuple[int, str], ...]


def map_entries(text: str, source: str, error: ErrorFactory, *, value_name: str,
                indent_name: str = "whitespace") -> Iterator[MapEntry]:
    """The entries of map ``text`` in file order; ``error(...)`` raised at the first problem.

    The syntax of the whole text is checked first; an entry's key when it is
    reached, so that a caller checking the values of each entry as it comes
    reports the first problem in the file.  ``value_name`` ("target") and
    ``indent_name`` ("whitespace") are the map's words in its messages.
    """
    logical: list[list[tuple[int, str]]] = []
    for number, raw in enumerate(text.split("\n"), 1):
        raw = _COMMENT.sub("", raw.rstrip("\r"))
        stripped = raw.strip()
        if not stripped:
            continue
        if raw[0] in " \t":
            if not logical:
                raise error(source, number,
                            f"continuation line (starts with {indent_name}) before any entry")
            logical[-1].append((number, stripped))
        else:
            logical.append([(number, stripped)])

    first_seen: dict[str, int] = {}
    for segments in logical:
        number, head = segments[0]
        key_text, colon, rest = head.partition(":")
        if not colon:
            raise error(source, number, f"expected 'address: {value_name}, ...', got {head!r}")
        key, domain = _parse_key(key_text.strip(), source, number, error)
        if key in first_seen:
            raise error(source, number, f"duplicate entry for {key!r} (first on line {first_seen[key]})")
        first_seen[key] = number
        yield MapEntry(number, key, domain, ((number, rest), *segments[1:]))


def _parse_key(text: str, source: str, number: int, error: ErrorFactory) -> tuple[str, str]:
    local, at, domain = text.rpartition("@")
    if not at or not domain or any(c.isspace() for c in text):
        raise error(source, number, f"expected 'user@domain' or '@domain' before ':', got {text!r}")
    try:
        domain = normalize_domain(domain)
    except ValueError as e:
        raise error(source, number, str(e)) from None
    return f"{local.lower()}@{domain}", domain


def read_map_file(path: str, parse: Callable[[str, str], T], error: ErrorFactory) -> T:
    """Read ``path`` and ``parse(text, path)`` it: OSError if unreadable, ``error(...)`` if not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(path, data[: e.start].count(b"\n") + 1, "not valid UTF-8") from None
    return parse(text.removeprefix("\ufeff"), path)
