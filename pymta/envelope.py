"""The envelope: what the server learnt about one message, as spooled.

Plain data classes with a JSON form; shared by the server (which fills them),
the spool (which persists them) and the scheduler and delivery backends
(which read them and record per-recipient outcomes).  No Twisted here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

#: Recipient.command of a ``/path/to/file`` target of the system alias file:
#: ``":file:/path/to/file"`` (a real command always starts with "/")
FILE_COMMAND_PREFIX = ":file:"

# Per-recipient delivery states
PENDING = "pending"        # not yet delivered; next_attempt says when
DELIVERED = "delivered"
FAILED = "failed"          # permanent failure (bounce material)


@dataclass
class Recipient:
    #: the address we deliver to (after alias rewriting), e.g. "alice@example.org"
    address: str
    #: the forward-path as the client gave it in RCPT TO (without <>)
    original: str
    #: name of the backend route chosen for ``address`` (key of [backends.*])
    route: str
    #: RFC 3461 NOTIFY values ("SUCCESS", "FAILURE", "DELAY") or ("NEVER",); None if absent
    notify: tuple[str, ...] | None = None
    #: RFC 3461 ORCPT as "addr-type;address" (xtext decoded); None if absent
    orcpt: str | None = None
    state: str = PENDING
    attempts: int = 0
    #: unix time of the next delivery attempt (0 = as soon as possible)
    next_attempt: float = 0.0
    #: last result text as "code enhanced text", for logs, mailq and bounces
    last_result: str | None = None
    #: unix time the outcome was final (delivered/failed)
    finished_at: float | None = None
    #: the remote SMTP server of the last result (DSN Remote-MTA), if any
    remote_mta: str | None = None
    #: RFC 3464 Diagnostic-Code of the last result ("smtp; 550 5.1.1 ..."), if any
    diagnostic: str | None = None
    #: a "delayed" DSN was sent for this recipient
    delay_notified: bool = False
    #: the final outcome needs no (more) DSN: sent, or not asked for
    notified: bool = False
    #: the ``|command`` of a system alias entry this recipient is delivered to
    #: (by the pipe backend of its route), or ``FILE_COMMAND_PREFIX + path``
    #: for a ``/path`` entry, or None for an ordinary recipient.
    #: Only the core sets it, from a system alias map (pymta.policy.aliases).
    command: str | None = None
    #: the envelope sender for this recipient when it is not the message's:
    #: ``owner-NAME`` of the alias list it was expanded from (its deliveries
    #: and bounces use it); None for the message's sender
    sender: str | None = None

    def to_json(self) -> dict[str, Any]:
        # shallow: every field is a plain value (asdict's deep copies cost on the hot path)
        d = {f.name: getattr(self, f.name) for f in _RECIPIENT_FIELDS}
        d["notify"] = list(self.notify) if self.notify is not None else None
        # written only when set: a spool written by this version stays readable
        # by the version before it unless it holds alias commands or list owners
        if self.command is None:
            del d["command"]
        if self.sender is None:
            del d["sender"]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Recipient":
        d = dict(d)
        if d.get("notify") is not None:
            d["notify"] = tuple(d["notify"])
        return cls(**d)


@dataclass
class Envelope:
    queue_id: str
    #: reverse-path without <>; "" is the null sender (bounces)
    sender: str
    recipients: list[Recipient]
    #: unix time the message was accepted (250 sent)
    received_at: float
    #: bytes of the body as received (after dot-unstuffing), without prepended headers
    size: int = 0
    client_ip: str = ""
    client_name: str = "unknown"
    helo: str = ""
    #: "SMTP", "ESMTP", "ESMTPS", "ESMTPA", "ESMTPSA", "UTF8SMTP", ... (RFC 3848)
    protocol: str = "ESMTP"
    #: BODY= parameter ("7BIT", "8BITMIME") or None when absent
    body: str | None = None
    smtputf8: bool = False
    #: RFC 3461 RET ("FULL" / "HDRS") and ENVID (xtext decoded)
    ret: str | None = None
    envid: str | None = None
    #: authenticated identity of the submitting session (issue: submission)
    auth: str | None = None
    #: header fields to prepend at delivery, in order, each a complete
    #: "Name: value\r\n" string (folded lines allowed).  The Received: line
    #: written by the server is the first one.
    prepend: list[str] = field(default_factory=list)
    #: what this message is, when pymta made it: "bounce", "delay", "success" (DSNs to
    #: the sender) or "postmaster" (a failed DSN sent to the postmaster instead); None
    #: for mail received over SMTP.  A failed "postmaster" message is held.
    notification: str | None = None
    #: why the message is held, or None.  A held message stays in the queue and
    #: is neither retried nor expired until an administrator releases it
    #: (:meth:`release`): a failed notification to the postmaster, which no one
    #: else can be told about.
    held: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in _ENVELOPE_FIELDS}
        d["recipients"] = [r.to_json() for r in self.recipients]
        d["prepend"] = list(self.prepend)
        if self.held is None:
            # written only when set: the version before it, which takes no
            # "held", can still read a queue after a rollback
            del d["held"]
        d["version"] = 1
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Envelope":
        d = dict(d)
        d.pop("version", None)
        d["recipients"] = [Recipient.from_json(r) for r in d["recipients"]]
        return cls(**d)

    def sender_for(self, recipient: Recipient) -> str:
        """The envelope sender of ``recipient``'s delivery and bounces (see Recipient.sender)."""
        return self.sender if recipient.sender is None else recipient.sender

    def release(self, now: float) -> None:
        """An administrator releases the held message: its delivery resumes at ``now``.

        The recipients that failed and were never reported (the postmaster a
        notification could not reach) are pending again, due at once; its
        other recipients keep their state.  A message still failing after
        that is held again, never discarded.
        """
        self.held = None
        for recipient in self.recipients:
            if recipient.state == FAILED and not recipient.notified:
                recipient.state = PENDING
                recipient.next_attempt = now
                recipient.finished_at = None

    def prepend_bytes(self) -> bytes:
        return "".join(self.prepend).encode("utf-8")

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state == PENDING]


_RECIPIENT_FIELDS = dataclasses.fields(Recipient)
_ENVELOPE_FIELDS = dataclasses.fields(Envelope)
