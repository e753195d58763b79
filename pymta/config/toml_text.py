"""Write TOML: the values a config holds, as text ``tomllib`` reads back.

Only what a pymta config contains: strings, integers, floats, booleans,
dates, arrays, tables and arrays of tables.  A table is written as its
plain keys first, then its sub-tables (``[a.b]``) and arrays of tables
(``[[a.b]]``), as TOML requires.  Comment lines may be attached to a
table (:class:`Comment` values are written as ``# key = text``).
"""

from __future__ import annotations

import datetime
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Comment", "dumps", "format_value", "format_key"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


@dataclass(frozen=True)
class Comment:
    """A key written as a comment, ``# key = text`` (a value not set, a secret not shown)."""
    text: str


def format_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else format_string(key)


def format_string(text: str) -> str:
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def format_value(value: Any) -> str:
    """One value as TOML (arrays and tables inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return format_string(value)
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{format_key(k)} = {format_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, Sequence):
        return "[" + ", ".join(format_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _is_table_array(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, str) and bool(value)
            and all(isinstance(v, Mapping) for v in value))


def dumps(document: Mapping[str, Any]) -> str:
    """``document`` as TOML text."""
    lines: list[str] = []
    _table(document, [], lines, header=None)
    return "\n".join(lines).strip("\n") + "\n"


def _table(table: Mapping[str, Any], path: list[str], lines: list[str], header: str | None) -> None:
    plain = [(k, v) for k, v in table.items() if not isinstance(v, Mapping) and not _is_table_array(v)]
    if header is not None and (header.startswith("[[") or plain
                               or not any(isinstance(v, Mapping) for v in table.values())):
        lines.extend(["", header])
    for key, value in plain:
        if isinstance(value, Comment):
            lines.append(f"# {format_key(key)} = {value.text}")
        else:
            lines.append(f"{format_key(key)} = {format_value(value)}")
    for key, value in table.items():
        sub = path + [format_key(key)]
        if isinstance(value, Mapping):
            _table(value, sub, lines, header=f"[{'.'.join(sub)}]")
        elif _is_table_array(value):
            for item in value:
                _table(item, sub, lines, header=f"[[{'.'.join(sub)}]]")
