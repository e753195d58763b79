"""The delivery scheduler: hands spooled messages to delivery backends and retries.

For each message the scheduler groups the pending recipients that are due by
their route (the backend name chosen at RCPT time) and calls
``backend.deliver(message, recipients)`` once per group.  Each
:class:`pymta.delivery.result.DeliveryResult` is recorded in its
:class:`pymta.envelope.Recipient`, the envelope is persisted with
``Spool.update``, and the message leaves the spool when no recipient is
pending.  Temporary failures are retried on a :class:`RetrySchedule`; a
recipient still deferred after the queue lifetime fails.

One log line per recipient and attempt, in the style of Postfix::

    1K0T...: to=<bob@example.org>, relay=local[maildir:/var/mail/...], delay=0.12, status=sent (250 2.0.0 delivered)
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from pymta.config.model import Retry
from pymta.delivery.result import DELIVERED, DEFERRED, FAILED, DeliveryResult
from pymta.envelope import FAILED as RECIPIENT_FAILED
from pymta.envelope import DELIVERED as RECIPIENT_DELIVERED
from pymta.envelope import PENDING, Envelope, Recipient
from pymta.spool.store import Spool

log = Logger()

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


def format_duration(seconds: float) -> str:
    """A time in the queue for humans: "5 days", "2.5 hours", "90 seconds"."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size:
            count = f"{seconds / size:.1f}".removesuffix(".0")
            return f"{count} {unit}{'' if count == '1' else 's'}"
    return f"{seconds:.0f} seconds"


@dataclass
class _Message:
    """A message the scheduler is responsible for."""
    envelope: Envelope
    #: indices of recipients waiting in the run queue or being delivered
    busy: set[int] = field(default_factory=set)
    timer: Any = None  # IDelayedCall of the next due time, or None


@dataclass
class _Job:
    """One backend call: a route and the recipients (by index) it gets."""
    message: _Message
    route: str
    indices: list[int]


class DeliveryScheduler(Service):
    """Deliver spooled messages through the configured backends, with retries."""

    def __init__(self, spool: Spool, backends: dict[str, Any], retry: Retry, reactor=None):
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.spool = spool
        #: backend name -> IDeliveryBackend provider; may be replaced on reload
        self.backends = backends
        self.schedule = RetrySchedule(retry.initial, retry.maximum, retry.lifetime)
        self.concurrency = max(1, int(retry.concurrency))
        self._reactor = reactor
        self._messages: dict[str, _Message] = {}
        self._run_queue: collections.deque[_Job] = collections.deque()
        self._in_flight = 0
        self._spool_writes = 0
        self._idle_waiters: list[defer.Deferred] = []
        self._stopping = False

    # -- service ---------------------------------------------------------------

    def startService(self) -> None:
        self._stopping = False
        self._messages.clear()
        envelopes = self.spool.recover()
        super().startService()
        for envelope in envelopes:
            self._track(envelope)
        if envelopes:
            log.info("scheduler: {count} message(s) in the spool", count=len(envelopes))

    def stopService(self) -> defer.Deferred:
        """Start no new deliveries; fire when those in flight are recorded."""
        super().stopService()
        self._stopping = True
        for message in self._messages.values():
            self._cancel_timer(message)
        for job in self._run_queue:
            job.message.busy.difference_update(job.indices)
        self._run_queue.clear()
        return self._when_idle()

    def submit(self, envelope: Envelope) -> None:
        """A newly committed message: deliver it as soon as possible."""
        if envelope.queue_id in self._messages:
            log.warn("{queue_id}: submitted twice; ignoring the second submission",
                     queue_id=envelope.queue_id)
            return
        if self._stopping:
            log.info("{queue_id}: scheduler stopping; delivery waits for the next start",
                     queue_id=envelope.queue_id)
            return
        self._track(envelope)

    # -- introspection (admin tools, tests) ---------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def queued(self) -> list[str]:
        """Ids of the messages the scheduler is responsible for."""
        return sorted(self._messages)

    # -- scheduling --------------------------------------------------------------

    def _now(self) -> float:
        return self._reactor.seconds()

    def _track(self, envelope: Envelope) -> None:
        message = _Message(envelope)
        self._messages[envelope.queue_id] = message
        self._reschedule(message)

    def _reschedule(self, message: _Message) -> None:
        """Set the timer for the next due recipient, or finish the message."""
        self._cancel_timer(message)
        waiting = [r for i, r in enumerate(message.envelope.recipients)
                   if r.state == PENDING and i not in message.busy]
        if not waiting:
            if not message.busy:
                self._finish(message)
            return
        if self._stopping:
            return
        due = min(r.next_attempt for r in waiting)
        delay = max(0.0, due - self._now())
        message.timer = self._reactor.callLater(delay, self._due, message)

    def _cancel_timer(self, message: _Message) -> None:
        if message.timer is not None and message.timer.active():
            message.timer.cancel()
        message.timer = None

    def _due(self, message: _Message) -> None:
        message.timer = None
        if self._stopping or self._messages.get(message.envelope.queue_id) is not message:
            return
        now = self._now()
        groups: dict[str, list[int]] = {}
        for index, recipient in enumerate(message.envelope.recipients):
            if (recipient.state == PENDING and index not in message.busy
                    and recipient.next_attempt <= now):
                groups.setdefault(recipient.route, []).append(index)
        for route, indices in groups.items():
            message.busy.update(indices)
            self._run_queue.append(_Job(message, route, indices))
        self._reschedule(message)
        self._pump()

    def _pump(self) -> None:
        while not self._stopping and self._run_queue and self._in_flight < self.concurrency:
            self._start(self._run_queue.popleft())

    # -- one backend call ----------------------------------------------------------

    def _start(self, job: _Job) -> None:
        envelope = job.message.envelope
        recipients = [envelope.recipients[i] for i in job.indices]
        backend = self.backends.get(job.route)
        self._in_flight += 1
        if backend is None:
            result = DeliveryResult.deferred(
                f"no delivery backend named {job.route!r} is configured", 451, "4.3.5")
            d = defer.succeed([result] * len(recipients))
        else:
            d = defer.maybeDeferred(backend.deliver, self.spool.message(envelope), recipients)
            d.addCallback(self._check_results, job, len(recipients))
            d.addErrback(self._backend_failed, job, len(recipients))
        d.addCallback(self._record, job)
        d.addErrback(self._internal_error, job)
        d.addBoth(self._job_done)

    def _check_results(self, results, job: _Job, count: int) -> list[DeliveryResult]:
        results = list(results) if results is not None else []
        if len(results) != count or not all(isinstance(r, DeliveryResult) for r in results):
            raise TypeError(f"backend {job.route!r} returned {results!r}, "
                            f"not {count} DeliveryResult(s)")
        return results

    def _backend_failed(self, failure: Failure, job: _Job, count: int) -> list[DeliveryResult]:
        log.failure("{queue_id}: delivery backend {backend!r} failed",
                    failure, LogLevel.error, queue_id=job.message.envelope.queue_id, backend=job.route)
        text = f"delivery backend {job.route!r} failed: {failure.getErrorMessage()}"
        return [DeliveryResult.deferred(text, 451, "4.3.0")] * count

    def _record(self, results: list[DeliveryResult], job: _Job) -> None:
        message = job.message
        envelope = message.envelope
        now = self._now()
        for index, result in zip(job.indices, results):
            if result.status not in (DELIVERED, DEFERRED, FAILED):
                log.error("{queue_id}: backend {backend!r} returned unknown status {status!r}; "
                          "taken as deferred", queue_id=envelope.queue_id, backend=job.route,
                          status=result.status)
            recipient = envelope.recipients[index]
            recipient.attempts += 1
            summary = result.summary()
            if result.status == DELIVERED:
                recipient.state, recipient.finished_at, status = RECIPIENT_DELIVERED, now, "sent"
            elif result.status == FAILED:
                recipient.state, recipient.finished_at, status = RECIPIENT_FAILED, now, "bounced"
            elif self.schedule.expired(envelope.received_at, now):
                summary = (f"{result.code} 4.4.7 message expired after "
                           f"{format_duration(now - envelope.received_at)} in the queue; "
                           f"last error: {summary}")
                recipient.state, recipient.finished_at, status = RECIPIENT_FAILED, now, "bounced"
            else:
                recipient.next_attempt = now + self.schedule.next_delay(recipient.attempts)
                status = "deferred"
            recipient.last_result = summary
            self._log_attempt(envelope, recipient, job.route, result.relay, now, status, summary)
        message.busy.difference_update(job.indices)
        if envelope.pending or message.busy:
            self._persist(self.spool.update(envelope), envelope, "update")
            self._reschedule(message)
        else:
            self._finish(message)

    def _log_attempt(self, envelope: Envelope, recipient: Recipient, route: str, relay: str,
                     now: float, status: str, summary: str) -> None:
        orig_to = (f", orig_to=<{recipient.original}>"
                   if recipient.original and recipient.original != recipient.address else "")
        log.info("{queue_id}: to=<{to}>{orig_to}, relay={relay}, delay={delay}, "
                 "status={status} ({result})",
                 queue_id=envelope.queue_id, to=recipient.address, orig_to=orig_to,
                 relay=f"{route}[{relay}]" if relay else route,
                 delay=format_delay(now - envelope.received_at), status=status, result=summary)

    def _internal_error(self, failure: Failure, job: _Job) -> None:
        # A bug in the scheduler itself: keep the message, try again later.
        log.failure("{queue_id}: scheduler error; delivery will be retried",
                    failure, LogLevel.critical, queue_id=job.message.envelope.queue_id)
        job.message.busy.difference_update(job.indices)
        envelope = job.message.envelope
        retry_at = self._now() + self.schedule.initial
        for index in job.indices:
            recipient = envelope.recipients[index]
            if recipient.state == PENDING:
                recipient.next_attempt = max(recipient.next_attempt, retry_at)
        self._reschedule(job.message)

    def _job_done(self, _) -> None:
        self._in_flight -= 1
        self._pump()
        self._check_idle()

    # -- finishing -------------------------------------------------------------------

    def _finish(self, message: _Message) -> None:
        """No recipient pending and none in flight: bounce hook, then remove."""
        envelope = message.envelope
        self._cancel_timer(message)
        self._messages.pop(envelope.queue_id, None)
        failures = [r for r in envelope.recipients if r.state == RECIPIENT_FAILED]
        if failures:
            self._final_failures(envelope, failures)
        d = self.spool.remove(envelope.queue_id)
        d.addCallback(lambda _: log.info("{queue_id}: removed", queue_id=envelope.queue_id))
        self._persist(d, envelope, "remove")

    def _final_failures(self, envelope: Envelope, recipients: list[Recipient]) -> None:
        """Recipients that ended FAILED, just before the message leaves the spool.

        TODO(bounces): build an RFC 3464 delivery status notification to
        ``envelope.sender`` (not for the null sender; honour NOTIFY and RET)
        and commit it to the spool *before* returning, so that a crash
        between this hook and the removal re-runs the hook rather than
        losing the bounce.  For now this only logs; each failed recipient
        already has its ``status=bounced`` line from the attempt that failed.
        """
        addresses = ", ".join(f"<{r.address}>" for r in recipients)
        if envelope.sender:
            log.warn("{queue_id}: sender non-delivery notification NOT sent to <{sender}> "
                     "for {addresses} (bounces are not implemented yet)",
                     queue_id=envelope.queue_id, sender=envelope.sender, addresses=addresses)
        else:
            log.info("{queue_id}: no non-delivery notification for {addresses}: null sender",
                     queue_id=envelope.queue_id, addresses=addresses)

    # -- spool writes and idleness -----------------------------------------------------

    def _persist(self, d: defer.Deferred, envelope: Envelope, what: str) -> None:
        self._spool_writes += 1

        def failed(failure: Failure) -> None:
            log.failure("{queue_id}: spool {what} failed; the recorded state may be repeated "
                        "after a restart", failure, LogLevel.error, queue_id=envelope.queue_id, what=what)

        def done(_) -> None:
            self._spool_writes -= 1
            self._check_idle()

        d.addErrback(failed)
        d.addBoth(done)

    def _when_idle(self) -> defer.Deferred:
        d = defer.Deferred()
        self._idle_waiters.append(d)
        self._check_idle()
        return d

    def _check_idle(self) -> None:
        if self._in_flight == 0 and self._spool_writes == 0 and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)
