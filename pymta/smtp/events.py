"""Events the server state machine emits.

Events marked *decision* put the machine on hold until the caller answers
with :meth:`ServerConnection.answer`; the others need no answer.
"""

from __future__ import annotations

from dataclasses import dataclass


class Sentinel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


#: next_event(): more bytes are needed
NEED_DATA = Sentinel("NEED_DATA")
#: next_event(): a decision is pending; call answer() first
PAUSED = Sentinel("PAUSED")
#: next_event(): the session is over; close after sending data_to_send()
CLOSED = Sentinel("CLOSED")


@dataclass(frozen=True)
class Hello:
    """*decision*: HELO or EHLO."""
    verb: str          # "HELO" | "EHLO"
    hostname: str


@dataclass(frozen=True)
class MailFrom:
    """*decision*: MAIL FROM, syntax and parameters already checked."""
    sender: str                         # "" is the null reverse-path
    params: dict                        # {KEYWORD: value|None}, xtext already decoded for ENVID/AUTH


@dataclass(frozen=True)
class RcptTo:
    """*decision*: RCPT TO, syntax and parameters already checked."""
    recipient: str                      # "postmaster" for the bare <Postmaster>
    params: dict                        # NOTIFY as tuple, ORCPT decoded "type;addr"


@dataclass(frozen=True)
class MessageStart:
    """DATA was answered with 354, or the first BDAT chunk began: open a spool file."""
    chunking: bool


@dataclass(frozen=True)
class MessageData:
    """Content to store (dot-unstuffed, line rules applied)."""
    data: bytes


@dataclass(frozen=True)
class MessageEnd:
    """*decision*: the whole message was received and is acceptable to the protocol.

    Answer ACCEPT (text "Ok: queued as ID") only once it is durable."""
    size: int


@dataclass(frozen=True)
class MessageAborted:
    """The message begun by MessageStart will not complete: discard what was stored."""
    reason: str


@dataclass(frozen=True)
class MessageRejected:
    """The message was refused at its end: a protocol rule (bare newline,
    line too long, size, ...) or the answer to MessageEnd said no.  The
    reply is already queued; this is for the log.  MessageAborted follows."""
    command: str                        # "DATA" | "BDAT"
    code: int
    enhanced: str | None
    text: str
    sender: str | None
    recipients: tuple[str, ...]         # forward-paths as given


@dataclass(frozen=True)
class StartTLS:
    """220 to STARTTLS is queued: write it, start TLS, then call ``conn.tls_started()``.

    Everything the client sent after the STARTTLS line in plaintext has been
    discarded (RFC 3207 4.2; CVE-2011-0411)."""


@dataclass(frozen=True)
class Authenticate:
    """*decision*: SASL credentials (RFC 4954, PLAIN RFC 4616, LOGIN).

    Answer ACCEPT (235), REJECT (535 5.7.8 by default) or DEFER (454)."""
    mechanism: str
    username: str
    password: str
    #: PLAIN authorization identity ("" when none was given)
    authzid: str = ""


@dataclass(frozen=True)
class Etrn:
    """*decision*: ETRN (RFC 1985) for ``node``: a domain, or "@domain" for its subdomains too.

    Answer ACCEPT (250, the text says what was started) or refuse (459 for a
    client that may not ask)."""
    node: str


@dataclass(frozen=True)
class Quit:
    """The client said QUIT; 221 is queued and the machine is CLOSED."""
