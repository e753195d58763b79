"""What an administrator does to the queue (``pymta queue``, ETRN), as the scheduler carries it out.

:class:`QueueAdministration` is a part of
:class:`pymta.delivery.scheduler.DeliveryScheduler` (a base class of it, so
that the scheduler module keeps to delivery): every change goes through the
scheduler, which owns the messages, and through the spool
(``Spool.update`` / ``Spool.remove``), never behind their backs.  The
caller (:mod:`pymta.control.service`) logs who asked.

What each does to a message whose delivery is in flight:

* **hold**: the message is held at once (and the hold written to the
  spool); the attempt in flight finishes and is recorded, no new one starts.
* **delete**: the message leaves the queue listing at once; the attempt in
  flight finishes (a next hop may still get it), its result is dropped,
  and then the message is removed: no bounce, no retry, removed once.
  Should the server crash before that, the message is still there after
  the restart.
* **bounce**: its recipients not in flight fail at once; those in flight
  fail when their attempt ends, unless it delivered them.  Then one
  non-delivery notification goes to the sender (RFC 3464, through
  :mod:`pymta.bounce`) and the message leaves the queue.
* **requeue** and **flush**: recipients in flight are left alone (those
  waiting for a delivery slot are not in flight: requeue routes them again).

Hold, release, requeue and bounce are refused (QueueError, "try again in a
moment") while the message's delivery status notifications are on their
way to the spool: the envelope that records them as sent, or the removal,
must wait until they are durable, and one that fails is decided again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

from pymta.delivery.retry import domain_matcher, make_due
from pymta.envelope import FAILED, PENDING, Envelope

log = Logger(namespace="pymta.delivery.scheduler")

#: the last result of a recipient returned by ``pymta queue bounce``
BOUNCE_RESULT = "550 5.0.0 {reason}"
DEFAULT_BOUNCE_REASON = "returned to the sender by the mail administrator"


class QueueError(Exception):
    """An administrative change that cannot be made to this message (the text says why)."""


def fail_pending(envelope: Envelope, busy, text: str, now: float) -> list:
    """Fail the pending recipients not in ``busy`` with ``text``; the ones failed."""
    failed = []
    for index, recipient in enumerate(envelope.recipients):
        if recipient.state == PENDING and index not in busy:
            recipient.state, recipient.finished_at = FAILED, now
            recipient.last_result, recipient.diagnostic, recipient.remote_mta = text, None, None
            failed.append(recipient)
    return failed


class QueueAdministration:
    """The administrator's changes (see the module docstring); mixed into DeliveryScheduler."""

    # provided by DeliveryScheduler
    _messages: dict[str, Any]
    _held: dict[str, Envelope]

    def entries(self) -> list[tuple[Envelope, frozenset[int]]]:
        """Every message the scheduler holds or delivers: (envelope, indices in flight), by id."""
        found = [(m.envelope, frozenset(m.busy)) for m in self._messages.values()]
        found += [(envelope, frozenset()) for queue_id, envelope in self._held.items()
                  if queue_id not in self._messages]
        return sorted(found, key=lambda entry: entry[0].queue_id)

    def has_message(self, queue_id: str) -> bool:
        return queue_id in self._messages or queue_id in self._held

    def envelope_of(self, queue_id: str) -> Envelope | None:
        message = self._messages.get(queue_id)
        return message.envelope if message is not None else self._held.get(queue_id)

    def hold(self, queue_id: str, reason: str) -> str:
        """Hold a message; what was done ("held"); QueueError if it already is."""
        message = self._messages.get(queue_id)
        if message is None or message.envelope.held:
            raise QueueError("already held")
        self._check_no_notices(queue_id)
        envelope = message.envelope
        envelope.held = reason
        self._unqueue(message)
        if not message.busy:
            del self._messages[queue_id]
            self._held[queue_id] = envelope
        self._persist(self.spool.update(envelope), envelope, "update")
        return "held" if not message.busy else "held (the delivery in flight finishes)"

    def delete(self, queue_id: str) -> str:
        """Remove a message from the queue; what was done."""
        message = self._messages.pop(queue_id, None)
        if message is None:
            self._remove_deleted(self._new_message(self._held.pop(queue_id)))
            return "deleted"
        message.deleted = True
        self._unqueue(message)
        self._held.pop(queue_id, None)
        if message.busy:
            return "deleted (removed when the delivery in flight ends)"
        self._remove_deleted(message)
        return "deleted"

    def requeue(self, queue_id: str, route_for: Callable[[str], str | None]) -> str:
        """Route the pending recipients again and try them now, their backoff reset.

        A recipient of an alias ``|command`` or ``/file`` keeps its route: the
        routes name a backend for its address, not for its command.
        """
        message = self._messages.get(queue_id)
        if message is None or message.envelope.held:
            raise QueueError("held; release it first")
        self._check_no_notices(queue_id)
        self._unqueue(message)                    # a job waiting for a slot has the old route
        envelope = message.envelope
        now = self._now()
        for index, recipient in enumerate(envelope.recipients):
            if recipient.state == PENDING and index not in message.busy:
                if recipient.command is None:     # an alias command keeps its pipe backend
                    recipient.route = route_for(recipient.address) or recipient.route
                recipient.attempts, recipient.next_attempt = 0, now
        self._persist(self.spool.update(envelope), envelope, "update")
        self._reschedule(message)
        return "requeued"

    def flush_message(self, queue_id: str) -> str:
        """Make the message's pending recipients due now."""
        message = self._messages.get(queue_id)
        if message is None or message.envelope.held:
            raise QueueError("held; release it first")
        self._forget_failures()
        now = self._now()
        for index, recipient in enumerate(message.envelope.recipients):
            if recipient.state == PENDING and index not in message.busy:
                recipient.next_attempt = min(recipient.next_attempt, now)
        self._reschedule(message)
        return "flushed"

    def bounce(self, queue_id: str, reason: str) -> str:
        """Return the message to its sender with a non-delivery notification."""
        self._check_no_notices(queue_id)
        if self.envelope_of(queue_id).notification == "postmaster":
            # its failure would only be held again (see pymta.bounce.notifier)
            raise QueueError("a notification to the postmaster cannot be bounced; delete it")
        message = self._messages.get(queue_id)
        if message is None:
            message = self._new_message(self._held.pop(queue_id))
        envelope = message.envelope
        envelope.held = None
        text = BOUNCE_RESULT.format(reason=reason)
        message.bouncing = text
        self._unqueue(message)
        now = self._now()
        for recipient in fail_pending(envelope, message.busy, text, now):
            self._log_attempt(envelope, recipient, "none", "", now, "bounced", text)
        if message.busy:
            return "bounced (recipients in flight fail when their attempt ends)"
        self._finish(message)
        if envelope.held:       # its non-delivery notification cannot be sent either
            return f"held again: {envelope.held}"
        return "bounced"

    def release(self, queue_id: str) -> bool:
        """Release a held message (``pymta queue release``): deliver it again now.

        Records the release in the spool (``Spool.update``) and schedules
        the message; False if no message of that id is held.
        """
        envelope = self._held.get(queue_id)
        if envelope is None:
            message = self._messages.get(queue_id)     # held while a delivery was in flight
            if message is None or not message.envelope.held:
                return False
            self._check_no_notices(queue_id)
            # held by an administrator (see hold): its failures wait for the end of
            # the deliveries in flight to be reported, not for a release to be retried
            message.envelope.held = None
            log.info("{queue_id}: released", queue_id=queue_id)
            self._persist(self.spool.update(message.envelope), message.envelope, "update")
            self._reschedule(message)
            return True
        self._check_no_notices(queue_id)
        del self._held[queue_id]
        envelope.release(self._now())
        log.info("{queue_id}: released", queue_id=queue_id)
        self._persist(self.spool.update(envelope), envelope, "update")
        if not self._stopped:
            self._track(envelope)
        return True

    def flush(self, domain: str | None = None) -> int:
        """Make pending recipients due now (ETRN, RFC 1985); the number of messages affected.

        ``domain`` selects recipients at that domain; ``"@domain"`` also its
        subdomains; None every pending recipient.  Recipients being
        delivered right now are left alone.
        """
        if self._stopped:
            return 0
        self._forget_failures()
        match = domain_matcher(domain)
        now = self._now()
        count = 0
        for message in list(self._messages.values()):
            if make_due(message.envelope, message.busy, match, now):
                count += 1
                self._reschedule(message)
        return count

    # -- helpers --------------------------------------------------------------------

    def _check_no_notices(self, queue_id: str) -> None:
        """QueueError while the message's notifications are on their way to the spool.

        Its envelope, which marks them sent, may be written only after they
        are durable (see the scheduler); the moment passes at once.
        """
        if self._noticing[queue_id]:
            raise QueueError("its delivery status notifications are being written; "
                             "try again in a moment")

    def _unqueue(self, message) -> None:
        """No timer and no waiting job for ``message`` (those in flight go on)."""
        self._cancel_timer(message)
        if any(job.message is message for job in self._run_queue):
            for job in self._run_queue:
                if job.message is message:
                    message.busy.difference_update(job.indices)
            self._run_queue = type(self._run_queue)(job for job in self._run_queue
                                                    if job.message is not message)

    def _remove_deleted(self, message) -> None:
        envelope = message.envelope
        if message.removed:                  # by its backend, with its last delivery
            self.spool.removed_on_delivery(envelope.queue_id)
        else:
            self._persist(self.spool.remove(envelope.queue_id, envelope.size), envelope, "remove")
        log.info("{queue_id}: removed", queue_id=envelope.queue_id)

    def _forget_failures(self) -> None:
        for backend in self.backends.values():
            forget = getattr(backend, "forget_failures", None)    # optional: relay backends
            if callable(forget):
                forget()
