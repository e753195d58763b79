"""Authentication-Results (RFC 8601) fields: what checks record, how it is written.

A check (SPF at MAIL time; DKIM, DMARC and ARC in the data stage) records its outcome as an
:class:`AuthResult` in the transaction's notes with :func:`add_auth_result`
(both part of :mod:`pymta.plugin_api`); the ``authres`` plugin
(:mod:`pymta.policy.authres`) writes them as one header field with
:func:`format_authentication_results`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["AuthResult", "add_auth_result", "authserv_id_of", "valid_authserv_id",
           "format_authentication_results",
           "comment_text", "quoted", "property_value", "fold", "NOTES_KEY", "HEADER"]

NOTES_KEY = "auth_results"
HEADER = "Authentication-Results"

_TOKEN = re.compile(r"[^\x00-\x20()<>@,;:\\\"/\[\]?=\x7f]+\Z")            # RFC 2045 token
_DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?:\.[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*\Z")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f]")
#: fold the field before a result once a line would pass this many characters
FOLD_AT = 78


@dataclass(frozen=True)
class AuthResult:
    """One ``resinfo``: method=result, an optional comment and ptype.property=value pairs."""

    method: str                                   # "spf", "auth", "dkim", "dmarc", "arc"
    result: str                                   # "pass", "fail", ...
    properties: tuple[tuple[str, str], ...] = ()  # (("smtp.mailfrom", "a@example.org"),)
    comment: str | None = None

    def format(self) -> str:
        text = f"{self.method}={self.result}"
        if self.comment:
            text += f" ({comment_text(self.comment)})"
        for name, value in self.properties:
            text += f" {name}={property_value(value)}"
        return text


def add_auth_result(notes: dict[str, Any], result: AuthResult) -> None:
    """Record ``result`` for the Authentication-Results field of this transaction."""
    notes.setdefault(NOTES_KEY, []).append(result)


def comment_text(text: str) -> str:
    """Text safe inside an RFC 5322 comment: no controls, parentheses and backslash escaped."""
    text = _CONTROLS.sub(" ", text)
    return re.sub(r"([()\\])", r"\\\1", text)


def quoted(text: str) -> str:
    text = _CONTROLS.sub(" ", text)
    return '"' + re.sub(r'(["\\])', r"\\\1", text) + '"'


def property_value(value: str) -> str:
    """A pvalue (RFC 8601 2.2): a token, [local-part] "@" domain, or a quoted string."""
    if _TOKEN.match(value):
        return value
    local, at, domain = value.rpartition("@")
    if at and _DOT_ATOM.match(domain) and (not local or _DOT_ATOM.match(local)):
        return value
    if at and _DOT_ATOM.match(domain):
        return f"{quoted(local)}@{domain}"
    return quoted(value)


def fold(value: str, column: int = 0) -> str:
    """Fold a one-line field value at spaces (CRLF inserted before the space, RFC 5322
    2.2.3) so that lines stay within :data:`FOLD_AT` where the words allow; ``column``
    is where the value starts (the length of ``"Name: "``).  Unfolding gives back
    ``value`` exactly."""
    words = value.split(" ")
    out = [words[0]]
    line = column + len(words[0])
    for word in words[1:]:
        if word and line + 1 + len(word) > FOLD_AT and line > 1:
            out.append("\r\n " + word)
            line = 1 + len(word)
        else:
            out.append(" " + word)
            line += 1 + len(word)
    return "".join(out)


def format_authentication_results(authserv_id: str, results: list[AuthResult]) -> str:
    """The field value: ``authserv-id; resinfo; resinfo`` or ``authserv-id; none``."""
    if not results:
        return f"{authserv_id}; none"
    return fold("; ".join([authserv_id] + [r.format() for r in results]), len(HEADER) + 2)


def valid_authserv_id(text: str) -> bool:
    """Whether ``text`` may be an authserv-id as pymta writes it (an RFC 2045 token)."""
    return _TOKEN.match(text) is not None


def authserv_id_of(value: str) -> str | None:
    """The authserv-id an Authentication-Results value starts with (comments skipped)."""
    i, n = 0, len(value)

    def skip_cfws(i: int) -> int:
        while i < n:
            if value[i] in " \t\r\n":
                i += 1
            elif value[i] == "(":
                depth = 0
                while i < n:
                    ch = value[i]
                    if ch == "\\":
                        i += 2
                        continue
                    if ch == "(":
                        depth += 1
                    elif ch == ")":
                        depth -= 1
                        if depth == 0:
                            i += 1
                            break
                    i += 1
            else:
                break
        return i

    i = skip_cfws(i)
    if i >= n:
        return None
    if value[i] == '"':
        out = []
        i += 1
        while i < n and value[i] != '"':
            if value[i] == "\\" and i + 1 < n:
                i += 1
            out.append(value[i])
            i += 1
        return "".join(out) or None
    start = i
    while i < n and value[i] not in " \t\r\n;(":
        i += 1
    return value[start:i] or None
