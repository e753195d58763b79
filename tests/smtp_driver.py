"""A scripted client-side driver for the sans-I/O SMTP server state machine.

It feeds bytes to a :class:`ServerConnection`, answers decision events with a
scripted policy (accept unless told otherwise), and records every event and
every reply byte, so tests can compare whole sessions byte for byte.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Union

from pymta.smtp import events as E
from pymta.smtp.server import Features, ProtocolLimits, ServerConnection
from pymta.verdict import Verdict

DECISIONS = (E.Hello, E.MailFrom, E.RcptTo, E.MessageEnd, E.Authenticate, E.Etrn)
SENTINELS = (E.NEED_DATA, E.PAUSED, E.CLOSED)

#: what the policy answers for one decision event: a verdict, a function of the
#: event returning a verdict (``None`` = accept), or a list of those used in turn
#: (accept once the list is used up)
Answer = Union[Verdict, Callable[[object], Union[Verdict, None]], list]


class Driver:
    """One SMTP session against a ServerConnection.

    ``policy`` maps a decision event class (``E.Hello``, ``E.MailFrom``,
    ``E.RcptTo``, ``E.MessageEnd``) to an :data:`Answer`.  With
    ``auto=False`` decisions are left pending and the test answers them with
    :meth:`answer`.
    """

    def __init__(self, limits: ProtocolLimits | None = None, *, hostname: str = "mx.test",
                 policy: dict[type, Answer] | None = None, greet: bool = True,
                 auto: bool = True, features: Features | None = None) -> None:
        self.conn = ServerConnection(hostname, limits or ProtocolLimits(), features)
        self.policy: dict[type, Answer] = dict(policy or {})
        self.auto = auto
        self.events: list = []
        self.replies = bytearray()
        self.last_sentinel = None
        if greet:
            self.conn.send_greeting()
            self._collect()

    # ------------------------------------------------------------ driving
    def feed(self, data: bytes) -> bytes:
        """Give the server ``data`` (``b""``: the client closed), run it as far
        as it goes; the new reply bytes."""
        start = len(self.replies)
        self.conn.receive_data(data)
        self.pump()
        return bytes(self.replies[start:])

    def feed_chunks(self, chunks: Iterable[bytes]) -> bytes:
        start = len(self.replies)
        for chunk in chunks:
            if chunk:
                self.feed(chunk)
        return bytes(self.replies[start:])

    def pump(self):
        """Pull events until NEED_DATA, PAUSED or CLOSED (answering decisions when auto)."""
        while True:
            event = self.conn.next_event()
            if event in SENTINELS:
                self.last_sentinel = event
                self._collect()
                return event
            self.events.append(event)
            if isinstance(event, E.StartTLS):
                self._collect()          # the 220 leaves in plaintext, then TLS is in place
                self.conn.tls_started()
            if isinstance(event, DECISIONS) and self.auto:
                self.conn.answer(self._verdict_for(event))
            self._collect()

    def answer(self, verdict: Verdict | None = None) -> bytes:
        """Answer the pending decision by hand, run on; the new reply bytes."""
        start = len(self.replies)
        self.conn.answer(verdict or Verdict.accept())
        self._collect()
        self.pump()
        return bytes(self.replies[start:])

    def _collect(self) -> None:
        self.replies += self.conn.data_to_send()

    def _verdict_for(self, event) -> Verdict:
        rule = self.policy.get(type(event))
        if isinstance(rule, list):
            rule = rule.pop(0) if rule else None
        if callable(rule) and not isinstance(rule, Verdict):
            rule = rule(event)
        return rule if rule is not None else Verdict.accept()

    # ---------------------------------------------------------- inspection
    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def closed(self) -> bool:
        return self.conn.closed

    def messages(self) -> list[tuple[str, bytes]]:
        """Every message begun: (outcome, concatenated content).

        outcome is "end" (MessageEnd reached), "aborted" or "open".
        """
        out: list[tuple[str, bytes]] = []
        current: list[bytes] | None = None
        for event in self.events:
            if isinstance(event, E.MessageStart):
                assert current is None, "MessageStart while a message is open"
                current = []
            elif isinstance(event, E.MessageData):
                assert current is not None, "MessageData outside a message"
                current.append(event.data)
            elif isinstance(event, (E.MessageEnd, E.MessageAborted)):
                if isinstance(event, E.MessageEnd) and current is None:
                    raise AssertionError("MessageEnd without MessageStart")
                if current is not None:
                    outcome = "end" if isinstance(event, E.MessageEnd) else "aborted"
                    out.append((outcome, b"".join(current)))
                current = None
        if current is not None:
            out.append(("open", b"".join(current)))
        return out

    def normalized_events(self) -> list:
        """The event sequence with each message's MessageData joined into one.

        The content of a message that did not reach MessageEnd (aborted, or
        still open) is left out: how much of it was passed on before a
        problem showed depends on how the bytes were split, and the consumer
        throws it away.  :meth:`messages` still has it.
        """
        out: list = []
        pending: list[bytes] | None = None
        for event in self.events:
            if isinstance(event, E.MessageData):
                if pending is None:
                    pending = []
                pending.append(event.data)
                continue
            if pending is not None and isinstance(event, E.MessageEnd):
                out.append(E.MessageData(b"".join(pending)))
            pending = None
            out.append(event)
        return out


def reply_lines(data: bytes) -> list[bytes]:
    """Reply bytes → lines without CRLF; every line must end with CRLF."""
    assert data.endswith(b"\r\n") or not data, data
    lines = data.split(b"\r\n")[:-1]
    for line in lines:
        assert b"\r" not in line and b"\n" not in line, line
    return lines


def reply_codes(data: bytes) -> list[int]:
    """The code of each complete reply (multi-line replies count once)."""
    return [int(line[:3]) for line in reply_lines(data) if line[3:4] != b"-"]


def session(driver: Driver, *commands: bytes) -> list[bytes]:
    """Send each command on its own and return the reply bytes of each."""
    return [driver.feed(cmd) for cmd in commands]


def one_byte_chunks(data: bytes) -> list[bytes]:
    """``data`` split into single bytes (the harshest packetisation)."""
    return [data[i:i + 1] for i in range(len(data))]
