"""The verdict model: what a plugin answers at a decision point.

A plugin never writes to the transport; it returns a :class:`Verdict` (or a
Deferred firing with one).  The core turns it into an SMTP reply.  This module
is pure (no Twisted), so the sans-I/O state machine can use it too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AliasTarget:
    """A rewrite target that carries more than an address (system alias file expansions).

    ``address``: the address delivered to, or, with ``command``, the alias
    whose entry holds that ``|command``; the core then routes the recipient
    to the backend ``route`` (a pipe backend) with the command attached
    (:attr:`pymta.envelope.Recipient.command`).  ``sender``: the envelope
    sender for this recipient (``owner-NAME`` of the alias list it came
    through), or None to keep the message's.
    """

    address: str
    command: str | None = None
    route: str | None = None
    sender: str | None = None


class Kind(enum.Enum):
    ACCEPT = "accept"          # decide: yes (stop the chain)
    REJECT = "reject"          # permanent refusal, 5xx
    DEFER = "defer"            # temporary refusal, 4xx
    DISCONNECT = "disconnect"  # reply (421 by default) and close the session
    DUNNO = "dunno"            # no opinion: ask the next plugin


@dataclass(frozen=True)
class Verdict:
    kind: Kind
    code: int | None = None
    enhanced: str | None = None
    text: str | None = None
    #: recipient stage only: the addresses this recipient expands to
    #: (alias / virtual maps).  ``None`` keeps the recipient as given.  The
    #: core's own rcpt verdict (pymta.server.policy) carries them routed, as
    #: pymta.envelope.Recipient.
    rewrite: tuple[Any, ...] | None = None
    #: message stage only: header fields to prepend, as (name, value) pairs.
    headers: tuple[tuple[str, str], ...] = field(default=())
    #: message stage only: positions (in ``message.headers()``) of header
    #: fields to remove from the stored message, e.g. a forged
    #: Authentication-Results claiming our authserv-id (RFC 8601 5).
    drop_headers: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.code is not None:
            first = self.code // 100
            wanted = {Kind.ACCEPT: (2,), Kind.REJECT: (5,), Kind.DEFER: (4,),
                      Kind.DISCONNECT: (4, 5), Kind.DUNNO: ()}[self.kind]
            if first not in wanted or not 200 <= self.code <= 599:
                raise ValueError(f"reply code {self.code} does not fit a {self.kind.value} verdict")
        if self.enhanced is not None and self.code is not None:
            if self.enhanced[:1] != str(self.code)[:1]:
                raise ValueError(f"enhanced status {self.enhanced} does not match reply code {self.code}")

    @property
    def decided(self) -> bool:
        return self.kind is not Kind.DUNNO

    # -- constructors a plugin author uses -------------------------------
    @classmethod
    def accept(cls, text: str | None = None, *, rewrite=None, headers=(), drop_headers=()) -> "Verdict":
        return cls(Kind.ACCEPT, None, None, text,
                   tuple(rewrite) if rewrite is not None else None, tuple(headers),
                   tuple(drop_headers))

    @classmethod
    def reject(cls, text: str = "Rejected", code: int = 550, enhanced: str = "5.7.1") -> "Verdict":
        return cls(Kind.REJECT, code, enhanced, text)

    @classmethod
    def defer(cls, text: str = "Try again later", code: int = 451, enhanced: str = "4.7.1") -> "Verdict":
        return cls(Kind.DEFER, code, enhanced, text)

    @classmethod
    def disconnect(cls, text: str = "Closing connection", code: int = 421,
                   enhanced: str = "4.7.0") -> "Verdict":
        return cls(Kind.DISCONNECT, code, enhanced, text)

    @classmethod
    def dunno(cls) -> "Verdict":
        return DUNNO


DUNNO = Verdict(Kind.DUNNO)


#: RFC 5322 2.1.1: at most 998 octets on a line, CRLF not counted
MAX_LINE_OCTETS = 998


def header_problem(headers: object, drop_headers: object = ()) -> str | None:
    """Why these header changes cannot be applied as they are, or None if they can.

    ``headers`` must be (name, value) pairs of strings.  A name is 1*ftext
    (RFC 5322 2.2: printable US-ASCII, 33..126, except ":").  A value may
    be folded (CRLF followed by a space or tab) but has no other CR or LF,
    no NUL or other control character except tab, no line that is only
    white space after a fold, and no line over 998 octets (the first line
    counted with its "Name: ").  Non-ASCII text is allowed as UTF-8
    (RFC 6532).  ``drop_headers`` must be non-negative field positions.
    """
    if not isinstance(headers, (tuple, list)):
        return f"headers must be a tuple of (name, value) pairs, not {type(headers).__name__}"
    for item in headers:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            return f"header {_short(item)}: not a (name, value) pair"
        name, value = item
        if not isinstance(name, str) or not isinstance(value, str):
            return f"header {_short(name)}: name and value must be strings"
        if not name or not all(33 <= ord(c) <= 126 and c != ":" for c in name):
            return f"header field name {_short(name)}: not 1*ftext (RFC 5322 2.2)"
        problem = _value_problem(name, value)
        if problem is not None:
            return f"header field {_short(name)}: {problem}"
    if not isinstance(drop_headers, (tuple, list)):
        return f"drop_headers must be a tuple of positions, not {type(drop_headers).__name__}"
    for index in drop_headers:
        if type(index) is not int or index < 0:
            return f"drop_headers: {_short(index)} is not a header field position (an int >= 0)"
    return None


def _value_problem(name: str, value: str) -> str | None:
    lines = value.split("\r\n")
    for number, line in enumerate(lines):
        if "\r" in line or "\n" in line:
            return "bare CR or LF in the value (only CRLF followed by a space or tab folds it)"
        bad = next((c for c in line if (c < " " and c != "\t") or c == "\x7f"), None)
        if bad is not None:
            return f"control character {bad!r} in the value"
        if number:
            if line[:1] not in (" ", "\t"):
                return "CRLF in the value not followed by a space or tab"
            if not line.strip(" \t"):
                return "a folded line of only white space"
        try:
            size = len(line.encode("utf-8")) + (len(name) + 2 if number == 0 else 0)
        except UnicodeEncodeError:
            return "the value is not encodable as UTF-8 (a lone surrogate)"

        if size > MAX_LINE_OCTETS:
            return f"line {number + 1} is {size} octets long (at most {MAX_LINE_OCTETS})"
    return None


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
