"""What the SMTP client machine (:mod:`pymta.smtp.client`) is given and emits.

Values: the timeouts, a server reply, a mail transaction and its
recipients, the result for one recipient.  Events: what
``ClientConnection.next_event()`` returns besides NEED_DATA and CLOSED.
Plain data, no behaviour beyond reading a reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:[ \t]+|\Z)")


# -- values ------------------------------------------------------------------------

@dataclass(frozen=True)
class ClientTimeouts:
    """Seconds to wait, per command (RFC 5321 4.5.3.2 where it gives a value)."""
    connect: float = 30.0        # TCP connect (used by the transport layer)
    greeting: float = 300.0      # 4.5.3.2.1 initial 220 message
    helo: float = 300.0
    starttls: float = 300.0      # STARTTLS reply and the TLS handshake
    auth: float = 300.0
    mail: float = 300.0          # 4.5.3.2.2
    rcpt: float = 300.0          # 4.5.3.2.3
    data_init: float = 120.0     # 4.5.3.2.4 DATA initiation (354)
    data_block: float = 180.0    # 4.5.3.2.5 each block of content accepted by the transport
    data_done: float = 600.0     # 4.5.3.2.6 DATA termination (also the BDAT LAST reply)
    rset: float = 120.0
    quit: float = 60.0


@dataclass(frozen=True)
class ServerReply:
    """One (possibly multi-line) reply, or a result the client made up (``local``)."""
    code: int
    #: the text of each line, after "NNN " / "NNN-"
    lines: tuple[str, ...]
    #: made up by the client (connection lost, timeout, a requirement not met)
    local: bool = False

    @classmethod
    def make(cls, code: int, enhanced: str, text: str) -> "ServerReply":
        return cls(code, (f"{enhanced} {text}",), local=True)

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @cached_property
    def enhanced(self) -> str | None:
        """The RFC 3463 status code of the first line, when its class matches the reply."""
        match = _ENHANCED.match(self.lines[0]) if self.lines else None
        if match and int(match.group(1)) == self.code // 100:
            return f"{match.group(1)}.{match.group(2)}.{match.group(3)}"
        return None

    @cached_property
    def text(self) -> str:
        """The lines joined by spaces, without the repeated enhanced status code."""
        enhanced = self.enhanced
        parts = []
        for line in self.lines:
            if enhanced and line.startswith(enhanced):
                line = line[len(enhanced):].lstrip(" \t")
            parts.append(line)
        return " ".join(p for p in parts if p)

    def summary(self) -> str:
        """``"550 5.1.1 text"`` (the enhanced code only if the server sent one)."""
        enhanced = self.enhanced
        return " ".join(str(p) for p in (self.code, enhanced, self.text) if p)


@dataclass(frozen=True)
class RecipientSpec:
    address: str
    #: RFC 3461 NOTIFY values, passed on when the server offers DSN
    notify: tuple[str, ...] | None = None
    #: RFC 3461 ORCPT as "addr-type;address" (decoded), passed on when the server offers DSN
    orcpt: str | None = None


@dataclass(frozen=True)
class MailTransaction:
    """What one mail transaction needs to know about the message."""
    sender: str
    recipients: tuple[RecipientSpec, ...]
    #: octets of content the caller will send (before dot-stuffing): SIZE= and BDAT
    size: int
    #: BODY= as the message was declared when received ("8BITMIME", "7BIT" or None)
    body: str | None = None
    #: the content has octets above 127 (None: unknown, taken as yes when it matters)
    eight_bit: bool | None = None
    #: the message was received with SMTPUTF8 (passed on when offered)
    smtputf8: bool = False
    #: ... and really needs it: non-ASCII addresses or header fields (RFC 6531 3.4)
    smtputf8_required: bool = False
    #: RFC 3461 RET and ENVID (decoded), passed on when the server offers DSN
    ret: str | None = None
    envid: str | None = None


@dataclass(frozen=True)
class RecipientResult:
    """The reply that decides one recipient, and the command it answered."""
    reply: ServerReply
    command: str


# -- events --------------------------------------------------------------------------

@dataclass(frozen=True)
class Ready:
    """EHLO/HELO answered (again after STARTTLS): transactions, STARTTLS and AUTH may start."""
    esmtp: bool
    extensions: dict[str, str]
    tls: bool


@dataclass(frozen=True)
class TLSGranted:
    """220 to STARTTLS: switch the transport to TLS now, then call ``tls_started()``."""


@dataclass(frozen=True)
class TLSRefused:
    """STARTTLS was refused; the session is READY again, in plaintext."""
    reply: ServerReply


@dataclass(frozen=True)
class Authenticated:
    reply: ServerReply


@dataclass(frozen=True)
class AuthRejected:
    """AUTH failed; the session is READY, unauthenticated."""
    reply: ServerReply


@dataclass(frozen=True)
class BodyWanted:
    """Send the message content now: ``send_body()`` any number of times, then ``end_body()``."""


@dataclass(frozen=True)
class TransactionDone:
    """One result per recipient, in order; the session is READY again (or closing)."""
    results: tuple[RecipientResult, ...]
    #: the server answered at least one command of this transaction.  When
    #: False the connection failed before any reply (a stale connection): the
    #: message was certainly not accepted and may go out on another connection.
    answered: bool


@dataclass(frozen=True)
class SessionFailed:
    """The session could not be set up (greeting, EHLO/HELO, STARTTLS or AUTH stage)."""
    stage: str
    reply: ServerReply | None
    reason: str


@dataclass(frozen=True)
class Closed:
    """The machine is done: send what ``data_to_send()`` holds, then close."""
    reason: str
