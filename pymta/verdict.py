"""The verdict model: what a plugin answers at a decision point.

A plugin never writes to the transport; it returns a :class:`Verdict` (or a
Deferred firing with one).  The core turns it into an SMTP reply.  This module
is pure (no Twisted), so the sans-I/O state machine can use it too.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


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
    #: (alias / virtual maps).  ``None`` keeps the recipient as given.
    rewrite: tuple[str, ...] | None = None
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
