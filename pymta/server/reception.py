"""One mail transaction as the server receives it: from the accepted MAIL FROM
to the spool's answer at the end of its message.

A :class:`Reception` is the one owner of what a transaction gathers: the
plugins' view of it (:class:`pymta.session.Transaction`), the recipients as
the rcpt stage routed them (:class:`pymta.envelope.Recipient`), the spool
writer its message streams into, and the :class:`pymta.envelope.Envelope`
built from them when the message is committed.  The adapter
(:mod:`pymta.server.protocol`) hands it the state machine's message events
and gives the client the answer it returns.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pymta.envelope import Envelope, Recipient
from pymta.server.received import received_header, with_protocol
from pymta.session import Session, Transaction
from pymta.spool.queuefile import SpoolError
from pymta.verdict import Kind, Verdict

if TYPE_CHECKING:
    from pymta.server.factory import SMTPServerFactory

log = Logger(namespace="pymta.smtpd")

QUEUE_WRITE_ERROR = Verdict(Kind.DEFER, 451, "4.3.0", "Error: queue file write error")


class Reception:
    """The transaction a session is receiving, its recipients and its message."""

    __slots__ = ("transaction", "recipients", "committing", "_writer", "_write_failed")

    def __init__(self, sender: str, mail_params: dict) -> None:
        #: what the plugins are told about this transaction
        self.transaction = Transaction(sender=sender, mail_params=dict(mail_params))
        #: the accepted recipients as routed, in RCPT order (an address given
        #: twice is merged in the envelope)
        self.recipients: list[Recipient] = []
        #: the spool commit of this transaction's message is in flight
        self.committing = False
        self._writer = None
        self._write_failed = False

    def add_recipients(self, given: str, routed: Iterable[Recipient]) -> None:
        """An accepted RCPT: ``given`` as the client wrote it, ``routed`` the
        recipients the rcpt stage made of it."""
        self.transaction.recipients.append(given)
        self.recipients.extend(routed)

    # ------------------------------------------------------------ message
    def start_message(self, spool) -> None:
        """The message's content starts: open its queue file."""
        self.abort()
        self._write_failed = False
        try:
            self._writer = spool.new_message()
            self.transaction.queue_id = self._writer.queue_id
        except (OSError, SpoolError) as e:
            log.error("cannot create a queue file: {error}", error=e)
            self._write_failed = True

    def write(self, data: bytes) -> None:
        if self._writer is None or self._write_failed:
            return
        try:
            self._writer.write(data)
        except OSError as e:
            log.error("{queue_id}: queue file write error: {error}", queue_id=self._writer.queue_id, error=e)
            self._write_failed = True

    def abort(self) -> None:
        """Drop the message received so far (nothing once it is committed)."""
        if self._writer is not None:
            self._writer.abort()
            self._writer = None

    def view(self):
        """The whole message, for the data stage's plugins; None when it could
        not be written (logged, the message dropped: answer QUEUE_WRITE_ERROR)."""
        if self._writer is None or self._write_failed:
            self.abort()
            return None
        try:
            return self._writer.view()
        except OSError as e:
            log.error("{queue_id}: queue file write error: {error}", queue_id=self._writer.queue_id, error=e)
            self.abort()
            return None

    def store(self, verdict: Verdict, session: Session, factory: "SMTPServerFactory",
              client: str) -> Verdict | Deferred | None:
        """Act on the data stage's ``verdict``: drop the message, or commit it
        to the spool and hand it to the scheduler.  Returns the answer for the
        client, or a Deferred firing with it once the message is durable; None
        when the message was dropped meanwhile (the client left)."""
        writer = self._writer
        if writer is None:
            return None
        if verdict.kind not in (Kind.ACCEPT, Kind.DUNNO):
            self.abort()          # the machine's MessageRejected logs it
            return verdict
        if verdict.drop_headers:
            try:
                writer.drop_headers(verdict.drop_headers)
            except OSError as e:
                log.error("{queue_id}: queue file write error: {error}", queue_id=writer.queue_id, error=e)
                self.abort()
                return QUEUE_WRITE_ERROR
        ctx = factory.context
        envelope = self._envelope(writer, session, ctx.config.hostname, ctx.reactor.seconds(), verdict)
        self._writer = None
        self.committing = True
        d = writer.commit(envelope)
        factory.commit_started(d)

        def committed(_):
            self.committing = False
            log.info("{queue_id}: client={client}, from=<{sender}>, size={size}, nrcpt={nrcpt}",
                     queue_id=envelope.queue_id, client=client, sender=envelope.sender,
                     size=envelope.size, nrcpt=len(envelope.recipients))
            ctx.scheduler.submit(envelope)
            if ctx.events is not None:
                ctx.events.message_accepted(session.listener, envelope.size)
            return Verdict.accept(f"Ok: queued as {envelope.queue_id}")

        def failed(failure):
            self.committing = False
            log.failure("{queue_id}: cannot commit the queue file", failure, queue_id=envelope.queue_id)
            writer.abort()
            return QUEUE_WRITE_ERROR

        return d.addCallbacks(committed, failed)

    def _envelope(self, writer, session: Session, hostname: str, now: float,
                  verdict: Verdict) -> Envelope:
        recipients = []
        seen = set()
        for rcpt in self.recipients:
            key = (rcpt.address.lower(), rcpt.route)
            if key not in seen:
                seen.add(key)
                recipients.append(rcpt)
        txn = self.transaction
        params = txn.mail_params
        smtputf8 = "SMTPUTF8" in params
        prepend = [received_header(session, hostname, writer.queue_id,
                                   [r.address for r in recipients], smtputf8, now)]
        prepend += [f"{name}: {value}\r\n" for name, value in verdict.headers]
        return Envelope(queue_id=writer.queue_id, sender=txn.sender, recipients=recipients,
                        received_at=now, size=writer.size, client_ip=session.client_ip,
                        client_name=session.client_name, helo=session.helo or "",
                        protocol=with_protocol(session, smtputf8), body=params.get("BODY"),
                        smtputf8=smtputf8, ret=params.get("RET"), envid=params.get("ENVID"),
                        auth=session.auth_user, prepend=prepend)
