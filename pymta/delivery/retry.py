"""The scheduler's decisions that need no reactor: when, what a result does, what is due.

:class:`RetrySchedule` says when to try a deferred recipient again and when
a message has been queued too long.  The functions below read and change
:class:`pymta.envelope.Recipient` records only: which recipients are due
(by route), what one :class:`pymta.delivery.result.DeliveryResult` does to
its recipient (delivered, failed, deferred or expired), whether a delivery
finishes its message, which failures are not reported yet.  The clock is
always an argument; :class:`pymta.delivery.scheduler.DeliveryScheduler`
calls them with its reactor's time, logs and persists.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable

from pymta.addresses import domain_key
from pymta.delivery.result import DELIVERED, FAILED
from pymta.envelope import DELIVERED as RECIPIENT_DELIVERED
from pymta.envelope import FAILED as RECIPIENT_FAILED
from pymta.envelope import PENDING, Envelope, Recipient

#: exponent cap in RetrySchedule.next_delay (2**64 * any sane initial is past any maximum)
_MAX_DOUBLINGS = 64


class RetrySchedule:
    """When to retry, and when to give up.  Pure arithmetic, no clock of its own."""

    def __init__(self, initial: float, maximum: float, lifetime: float):
        if initial <= 0 or maximum < initial or lifetime < 0:
            raise ValueError("retry schedule needs 0 < initial <= maximum and lifetime >= 0 "
                             f"(got initial={initial}, maximum={maximum}, lifetime={lifetime})")
        self.initial = float(initial)
        self.maximum = float(maximum)
        self.lifetime = float(lifetime)

    def next_delay(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (attempts >= 1)."""
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        return min(self.initial * 2 ** min(attempts - 1, _MAX_DOUBLINGS), self.maximum)

    def expired(self, received_at: float, now: float) -> bool:
        """Has a message received at ``received_at`` been queued too long?"""
        return now - received_at >= self.lifetime


def format_delay(seconds: float) -> str:
    """Seconds as Postfix prints them: two significant digits, no exponent."""
    seconds = max(seconds, 0.0)
    if seconds >= 10:
        return str(int(round(seconds)))
    return f"{seconds:.2g}"


def format_queue_time(seconds: float) -> str:
    """A time in the queue for humans: "5 days", "2.5 hours", "90 seconds"."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = f"{seconds / size:.1f}".removesuffix(".0")
            return f"{count} {unit}{'' if count == '1' else 's'}"
    return f"{seconds:.0f} seconds"


# -- which recipients are due -------------------------------------------------------

def next_due(envelope: Envelope, busy: Collection[int]) -> float | None:
    """When the next pending recipient not in ``busy`` is due; None if there is none."""
    waiting = [r.next_attempt for i, r in enumerate(envelope.recipients)
               if r.state == PENDING and i not in busy]
    return min(waiting) if waiting else None


def due_by_route(envelope: Envelope, busy: Collection[int], now: float) -> dict[str, list[int]]:
    """The pending recipients (by index) not in ``busy`` that are due at ``now``, by route."""
    groups: dict[str, list[int]] = {}
    for index, recipient in enumerate(envelope.recipients):
        if recipient.state == PENDING and index not in busy and recipient.next_attempt <= now:
            groups.setdefault(recipient.route, []).append(index)
    return groups


def split_by_sender(envelope: Envelope, indices: list[int]) -> list[list[int]]:
    """``indices`` in groups of one envelope sender each (list owners, see Recipient.sender)."""
    groups: dict[str | None, list[int]] = {}
    for index in indices:
        groups.setdefault(envelope.recipients[index].sender, []).append(index)
    return list(groups.values())


def make_due(envelope: Envelope, busy: Collection[int], match: Callable[[str], bool],
             now: float) -> bool:
    """Make the matching pending recipients not in ``busy`` due at ``now`` (ETRN); any?"""
    hit = False
    for index, recipient in enumerate(envelope.recipients):
        if recipient.state == PENDING and index not in busy and match(recipient.address):
            recipient.next_attempt = min(recipient.next_attempt, now)
            hit = True
    return hit


def postpone(envelope: Envelope, indices: Iterable[int], retry_at: float) -> None:
    """The pending recipients at ``indices`` are not due before ``retry_at`` (after an error)."""
    for index in indices:
        recipient = envelope.recipients[index]
        if recipient.state == PENDING:
            recipient.next_attempt = max(recipient.next_attempt, retry_at)


def domain_matcher(domain: str | None) -> Callable[[str], bool]:
    """ETRN's node: None (everything), "example.org", or "@example.org" (and its subdomains)."""
    if domain is None:
        return lambda address: True
    wanted = domain_key(domain.lstrip("@"))
    subdomains = domain.startswith("@")

    def match(address: str) -> bool:
        got = domain_key(address.rpartition("@")[2])
        return got == wanted or (subdomains and got.endswith("." + wanted))
    return match


# -- what a result does ----------------------------------------------------------------

def record_result(recipient: Recipient, result, schedule: RetrySchedule, received_at: float,
                  now: float) -> tuple[str, str]:
    """Record one attempt's ``result`` in ``recipient``; the log line's (status, text).

    Delivered and failed are final; a deferred recipient is retried on
    ``schedule``, or fails once its message (received at ``received_at``)
    has been queued longer than the schedule's lifetime.  An unknown status
    counts as deferred.
    """
    recipient.attempts += 1
    recipient.remote_mta = getattr(result, "remote_mta", None)
    recipient.diagnostic = getattr(result, "diagnostic", None)
    summary = result.summary()
    if result.status == DELIVERED:
        recipient.state, recipient.finished_at, status = RECIPIENT_DELIVERED, now, "sent"
        if getattr(result, "notify_forwarded", False):
            recipient.notified = True     # the next hop reports success (RFC 3461 4.3)
    elif result.status == FAILED:
        recipient.state, recipient.finished_at, status = RECIPIENT_FAILED, now, "bounced"
    elif schedule.expired(received_at, now):
        summary = (f"{result.code} 4.4.7 message expired after "
                   f"{format_queue_time(now - received_at)} in the queue; "
                   f"last error: {summary}")
        recipient.state, recipient.finished_at, status = RECIPIENT_FAILED, now, "bounced"
    else:
        recipient.next_attempt = now + schedule.next_delay(recipient.attempts)
        status = "deferred"
    recipient.last_result = summary
    return status, summary


def delivery_finishes(envelope: Envelope, indices: Collection[int], notifying: bool) -> bool:
    """Does delivering the recipients at ``indices`` leave nothing to do for the message?

    True when no other recipient is pending or waits for a notification
    (with ``notifying`` False, no notifier: a delivered recipient waits for
    none) and none of these asked for a success report.
    """
    for index, recipient in enumerate(envelope.recipients):
        if index in indices:
            if recipient.notify and "SUCCESS" in recipient.notify:
                return False
        elif recipient.state == PENDING or not (
                recipient.notified or (recipient.state == RECIPIENT_DELIVERED and not notifying)):
            return False
    return True


def unreported_failures(envelope: Envelope) -> list[Recipient]:
    """The recipients that ended failed and were not reported (bounced) yet."""
    return [r for r in envelope.recipients if r.state == RECIPIENT_FAILED and not r.notified]
