"""The delivery scheduler: hands spooled messages to delivery backends and retries.

For each message the scheduler groups the pending recipients that are due by
their route (the backend name chosen at RCPT time) and calls
``backend.deliver(message, recipients)`` once per group.  Each
:class:`pymta.delivery.result.DeliveryResult` is recorded in its
:class:`pymta.envelope.Recipient`, the envelope is persisted with
``Spool.update``, and the message leaves the spool when no recipient is
pending.  Temporary failures are retried on a :class:`RetrySchedule`; a
recipient still deferred after the queue lifetime fails.  Those decisions,
and the others that need no reactor (which recipients are due, whether a
delivery finishes its message), are in :mod:`pymta.delivery.retry`.

Delivery status notifications (bounces, delay warnings, success reports)
are decided by a :class:`pymta.bounce.notifier.DeliveryNotifier` whenever
none of a message's recipients is being delivered.  Each is a new message,
committed to the spool *before* the envelope that records it as sent is
updated (or the message removed), and no delivery of the message starts
meanwhile (one could finish and remove it): a crash in between sends it
twice, never not at all.  :meth:`DeliveryScheduler.flush` (ETRN) makes pending
recipients due at once.

A failure no one can be told about (a notification to the postmaster that
failed, see :mod:`pymta.bounce.notifier`) *holds* its message: it stays in
the queue with ``envelope.held`` set (written with ``Spool.update``), is
neither retried nor expired, and is skipped at start-up until an
administrator releases it (:meth:`DeliveryScheduler.release`).

One log line per recipient and attempt, in the style of Postfix::

    1K0T...: to=<bob@example.org>, relay=local[maildir:/var/mail/...], delay=0.12, status=sent (250 2.0.0 delivered)
"""

from __future__ import annotations

import collections
import enum
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, Iterator

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from pymta.bounce.notifier import NotificationHeld
from pymta.config.model import Retry
from pymta.delivery.backends_in_use import BackendsInUse
from pymta.delivery.queue_admin import QueueAdministration, fail_pending
from pymta.delivery.result import DELIVERED, DEFERRED, FAILED, DeliveryResult
from pymta.delivery.retry import (RetrySchedule, delivery_finishes, due_by_route,
                                  format_delay, next_due, postpone, record_result,
                                  split_by_sender, unreported_failures)
from pymta.envelope import Envelope, Recipient
from pymta.spool.store import Spool

log = Logger()


class _Pump(enum.Enum):
    """Whether the scheduler starts deliveries (see DeliveryScheduler._pump)."""
    #: deliveries start as jobs come (also before startService)
    READY = "ready"
    #: inside _pump: a job that ends at once does not pump again (no nesting)
    PUMPING = "pumping"
    #: stopService was called: no delivery starts until startService
    STOPPED = "stopped"


@dataclass
class _Message:
    """A message the scheduler is responsible for."""
    envelope: Envelope
    #: indices of recipients waiting in the run queue or being delivered
    busy: set[int] = field(default_factory=set)
    timer: Any = None  # IDelayedCall of the next due time, or None
    #: its file was removed behind the server's back: forgotten (see _forget_removed)
    gone: bool = False
    #: the backend removed it from the spool with its last delivery (DeliveryRecord)
    removed: bool = False
    #: an administrator deleted it during a delivery: removed when that ends (queue_admin)
    deleted: bool = False
    #: an administrator bounced it: its recipients in flight fail with this text after
    #: their attempt, unless delivered (queue_admin)
    bouncing: str | None = None


@dataclass
class _Job:
    """One backend call: a route and the recipients (by index) it gets."""
    message: _Message
    route: str
    indices: list[int]
    #: the SpooledMessage given to the backend
    spooled: Any = None
    #: the scheduler's backends when the call started (a reload may replace them)
    backends: Any = None
    #: perf_counter() when the backend was called (only with an events sink)
    started: float = 0.0


class DeliveryScheduler(QueueAdministration, Service):
    """Deliver spooled messages through the configured backends, with retries.

    The administrator's changes (hold, delete, bounce, ...) are in
    :class:`pymta.delivery.queue_admin.QueueAdministration`.
    """

    def __init__(self, spool: Spool, backends: dict[str, Any], retry: Retry, reactor=None,
                 notifier: Any = None, events: Any = None):
        """``events``: the metrics' events sink (pymta.metrics.instruments.ServerMetrics),
        told each attempt's result and duration; None: nothing is measured."""
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.spool = spool
        #: backend name -> IDeliveryBackend provider; may be replaced on reload
        self.backends = backends
        self.schedule = RetrySchedule(retry.initial, retry.maximum, retry.lifetime)
        self.concurrency = max(1, int(retry.concurrency))
        #: seconds in the queue before a "delayed" DSN (0: never)
        self.delay_warning = float(getattr(retry, "delay_warning", 0.0))
        #: pymta.bounce.notifier.DeliveryNotifier, or None: notifications are only logged
        self.notifier = notifier
        self._reactor = reactor
        self._messages: dict[str, _Message] = {}
        #: held messages (see the module docstring): queue id -> envelope
        self._held: dict[str, Envelope] = {}
        self._run_queue: collections.deque[_Job] = collections.deque()
        self._in_flight = 0
        self._pump_state = _Pump.READY
        self._spool_writes = 0
        #: queue id -> notifications being spooled before its update or removal
        self._noticing: collections.Counter[str] = collections.Counter()
        self._idle_waiters: list[defer.Deferred] = []
        #: backend calls in flight by the backends they started with (see reconfigure)
        self._backends_in_use = BackendsInUse()
        self.events = events

    # -- service ---------------------------------------------------------------

    def startService(self) -> None:
        if self._pump_state is _Pump.STOPPED:
            self._pump_state = _Pump.READY
        self._messages.clear()
        self._held.clear()
        envelopes = self.spool.recover()
        super().startService()
        for envelope in envelopes:
            if envelope.held:
                self._held[envelope.queue_id] = envelope
                log.warn("{queue_id}: held ({reason}); not delivered until released",
                         queue_id=envelope.queue_id, reason=envelope.held)
            else:
                self._track(envelope)
        if envelopes:
            log.info("scheduler: {count} message(s) in the spool", count=len(envelopes))

    def stopService(self) -> defer.Deferred:
        """Start no new deliveries; fire when those in flight are recorded."""
        super().stopService()
        self._pump_state = _Pump.STOPPED
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
        if self._stopped:
            log.info("{queue_id}: scheduler stopping; delivery waits for the next start",
                     queue_id=envelope.queue_id)
            return
        self._track(envelope)

    def reconfigure(self, backends: dict[str, Any], retry: Retry, notifier: Any) -> defer.Deferred:
        """A reload: deliveries that start from now on use these.

        Deliveries in flight finish with the backends they started with; the
        returned Deferred fires with those previous backends once none of
        them is in flight any more (then they may be closed).  Recipients
        keep the route (backend name) chosen when they were received.
        """
        previous = self.backends
        self.backends = backends
        self.schedule = RetrySchedule(retry.initial, retry.maximum, retry.lifetime)
        self.concurrency = max(1, int(retry.concurrency))
        self.delay_warning = float(getattr(retry, "delay_warning", 0.0))
        self.notifier = notifier
        d = self._backends_in_use.unused(previous, backends)
        self._pump()                      # the concurrency may have grown
        return d

    # -- introspection (admin tools, tests) ---------------------------------

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def queued(self) -> list[str]:
        """Ids of the messages the scheduler is responsible for (not the held ones)."""
        return sorted(self._messages)

    def message_states(self) -> Iterator[tuple[str, Envelope]]:
        """Every message the scheduler knows, with its state (for the metrics' queue gauges):
        "active" (recipients due or being delivered), "incoming" (not tried yet),
        "deferred" (waiting for a retry) or "held"."""
        for message in self._messages.values():
            if message.busy:
                state = "active"
            elif any(r.attempts for r in message.envelope.recipients):
                state = "deferred"
            else:
                state = "incoming"
            yield state, message.envelope
        for envelope in self._held.values():
            yield "held", envelope

    def held(self) -> dict[str, str]:
        """The held messages: queue id -> why."""
        return {queue_id: envelope.held or "" for queue_id, envelope in self._held.items()}

    # -- scheduling --------------------------------------------------------------

    @property
    def _stopped(self) -> bool:
        """stopService was called (and startService not since)."""
        return self._pump_state is _Pump.STOPPED

    def _now(self) -> float:
        return self._reactor.seconds()

    def _new_message(self, envelope: Envelope) -> _Message:
        return _Message(envelope)

    def _track(self, envelope: Envelope) -> None:
        message = self._new_message(envelope)
        self._messages[envelope.queue_id] = message
        self._reschedule(message)

    def _reschedule(self, message: _Message) -> None:
        """Set the timer for the next due recipient, or finish the message."""
        self._cancel_timer(message)
        if message.envelope.held:
            # held by an administrator while a delivery was in flight: no new
            # attempt; once none is in flight it joins the held messages
            if not message.busy:
                self._finish(message)
            return
        due = next_due(message.envelope, message.busy)
        if due is None:
            if not message.busy:
                self._finish(message)
            return
        if self._stopped:
            return
        delay = max(0.0, due - self._now())
        message.timer = self._reactor.callLater(delay, self._due, message)

    def _cancel_timer(self, message: _Message) -> None:
        if message.timer is not None and message.timer.active():
            message.timer.cancel()
        message.timer = None

    def _due(self, message: _Message) -> None:
        message.timer = None
        if self._stopped or self._messages.get(message.envelope.queue_id) is not message:
            return
        envelope = message.envelope
        if self._noticing[envelope.queue_id]:
            # Its notifications are on their way to disk: its next delivery
            # could finish it, and it must not leave the spool before they
            # are durable (see _after_notices, which reschedules it then).
            return
        # A retry: an administrator may have removed the message meanwhile (one
        # stat, only for messages that waited in the queue).
        if any(r.attempts for r in envelope.recipients) \
                and not self.spool.is_queued(envelope.queue_id):
            self._forget_removed(message)
            return
        for route, due in due_by_route(envelope, message.busy, self._now()).items():
            for indices in split_by_sender(envelope, due):    # one envelope sender a call
                message.busy.update(indices)
                self._run_queue.append(_Job(message, route, indices))
        self._reschedule(message)
        self._pump()

    def _pump(self) -> None:
        # Not re-entrant: a backend that answers at once (a cached failure, a
        # local error) ends its job inside _start, whose _job_done pumps again;
        # nesting that once per message would exhaust the stack on a big queue.
        if self._pump_state is not _Pump.READY:
            return
        self._pump_state = _Pump.PUMPING
        try:
            while (self._pump_state is _Pump.PUMPING and self._run_queue
                   and self._in_flight < self.concurrency):
                self._start(self._run_queue.popleft())
        finally:
            if self._pump_state is _Pump.PUMPING:      # not stopped meanwhile
                self._pump_state = _Pump.READY

    # -- one backend call ----------------------------------------------------------

    def _start(self, job: _Job) -> None:
        envelope = job.message.envelope
        recipients = [envelope.recipients[i] for i in job.indices]
        backend = self.backends.get(job.route)
        job.backends = self.backends
        self._backends_in_use.started(job.backends)
        self._in_flight += 1
        if self.events is not None:
            job.started = perf_counter()
        if backend is None:
            result = DeliveryResult.deferred(
                f"no delivery backend named {job.route!r} is configured", 451, "4.3.5")
            d = defer.succeed([result] * len(recipients))
        else:
            job.spooled = self.spool.message(envelope)
            job.spooled.record_delivery = self._delivery_record(job)
            d = defer.maybeDeferred(backend.deliver, job.spooled, recipients)
            d.addCallback(self._check_results, job, len(recipients))
            d.addErrback(self._backend_failed, job, len(recipients))
        d.addCallback(self._record, job)
        d.addErrback(self._internal_error, job)
        d.addBoth(self._job_done, job)

    def _delivery_record(self, job: _Job) -> Any:
        """A DeliveryRecord when ``job`` holds the only recipients of its message in flight.

        A local backend then records the deliveries in its delivery batch,
        so that a crash repeats only the deliveries in flight: the message
        leaves the spool when delivering them finishes it (no other
        recipient pending, none waiting for a notification, no success
        report asked for); otherwise the delivered recipients are marked.
        """
        message = job.message
        if len(message.busy) != len(job.indices) or self._noticing[message.envelope.queue_id]:
            return None
        finishes = delivery_finishes(message.envelope, set(job.indices), self.notifier is not None)
        return self.spool.delivery_record(message.envelope, tuple(job.indices), finishes)

    def _check_results(self, results, job: _Job, count: int) -> list[DeliveryResult]:
        results = list(results) if results is not None else []
        if len(results) != count or not all(isinstance(r, DeliveryResult) for r in results):
            raise TypeError(f"backend {job.route!r} returned {results!r}, "
                            f"not {count} DeliveryResult(s)")
        return results

    def _backend_failed(self, failure: Failure, job: _Job, count: int) -> list[DeliveryResult]:
        if not self.spool.is_queued(job.message.envelope.queue_id):
            # it could not read a message removed behind our back: _record forgets it
            return [DeliveryResult.deferred("the message left the queue", 451, "4.3.0")] * count
        log.failure("{queue_id}: delivery backend {backend!r} failed",
                    failure, LogLevel.error, queue_id=job.message.envelope.queue_id, backend=job.route)
        text = f"delivery backend {job.route!r} failed: {failure.getErrorMessage()}"
        return [DeliveryResult.deferred(text, 451, "4.3.0")] * count

    def _record(self, results: list[DeliveryResult], job: _Job) -> None:
        message = job.message
        envelope = message.envelope
        if message.gone:
            message.busy.difference_update(job.indices)
            return
        if any(result.status != DELIVERED for result in results) \
                and not self.spool.is_queued(envelope.queue_id):
            # removed behind our back (the attempt probably failed for that):
            # nothing to retry, bounce or update
            message.busy.difference_update(job.indices)
            self._forget_removed(message)
            return
        now = self._now()
        events = self.events
        if events is not None:
            events.delivery_attempt(job.route, perf_counter() - job.started)
        if job.spooled is not None and job.spooled.removed:
            message.removed = True
        for index, result in zip(job.indices, results):
            if result.status not in (DELIVERED, DEFERRED, FAILED):
                log.error("{queue_id}: backend {backend!r} returned unknown status {status!r}; "
                          "taken as deferred", queue_id=envelope.queue_id, backend=job.route,
                          status=result.status)
            recipient = envelope.recipients[index]
            status, summary = record_result(recipient, result, self.schedule, envelope.received_at, now)
            if events is not None:
                events.recipient_result(job.route, status, now - envelope.received_at)
            self._log_attempt(envelope, recipient, job.route, result.relay, now, status, summary)
        message.busy.difference_update(job.indices)
        if message.deleted:
            if not message.busy:
                self._remove_deleted(message)
            return
        if message.bouncing is not None:
            for recipient in fail_pending(envelope, message.busy, message.bouncing, now):
                self._log_attempt(envelope, recipient, "none", "", now, "bounced", message.bouncing)
        if envelope.held and message.busy:
            return          # held meanwhile: the last attempt in flight settles it (_finish)
        notices = [] if message.busy else self._notices(message, now)
        if (envelope.pending or message.busy) and not envelope.held:
            self._after_notices(notices, envelope, "update", lambda: self._update_if_queued(message))
            self._reschedule(message)
        else:
            self._finish(message, notices)

    def _log_attempt(self, envelope: Envelope, recipient: Recipient, route: str, relay: str,
                     now: float, status: str, summary: str) -> None:
        orig_to = (f", orig_to=<{recipient.original}>"
                   if recipient.original and recipient.original != recipient.address else "")
        relay_text = f"{route}[{relay}]" if relay else route
        delay = format_delay(now - envelope.received_at)
        # One pre-formatted field for the text (formatting 7 fields per line is
        # a noticeable share of a relay's CPU); the parts stay in the event.
        line = (f"{envelope.queue_id}: to=<{recipient.address}>{orig_to}, relay={relay_text}, "
                f"delay={delay}, status={status} ({summary})")
        log.info("{log_line}", log_line=line, queue_id=envelope.queue_id, to=recipient.address,
                 relay=relay_text, delay=delay, status=status, result=summary)

    def _internal_error(self, failure: Failure, job: _Job) -> None:
        # A bug in the scheduler itself: keep the message, try again later.
        # Unless reading its file failed because it was removed behind our back.
        if job.message.gone or not self.spool.is_queued(job.message.envelope.queue_id):
            job.message.busy.difference_update(job.indices)
            self._forget_removed(job.message)
            return
        log.failure("{queue_id}: scheduler error; delivery will be retried",
                    failure, LogLevel.critical, queue_id=job.message.envelope.queue_id)
        job.message.busy.difference_update(job.indices)
        if job.message.deleted:
            if not job.message.busy:
                self._remove_deleted(job.message)
            return
        postpone(job.message.envelope, job.indices, self._now() + self.schedule.initial)
        self._reschedule(job.message)

    def _forget_removed(self, message: _Message) -> None:
        """The message's file was removed behind the server's back (an admin ``rm``).

        One warning, then the message is forgotten: no retry, no bounce (its
        content is gone), no traceback.  Deliveries of it still in flight end
        without being recorded.  The spool drops what it still holds for it
        (its leftover ``ID.env``, the body it kept in memory).
        """
        if message.gone:
            return
        message.gone = True
        envelope = message.envelope
        self._cancel_timer(message)
        if self._messages.get(envelope.queue_id) is message:
            del self._messages[envelope.queue_id]
        if self._held.get(envelope.queue_id) is envelope:
            del self._held[envelope.queue_id]
        if any(job.message is message for job in self._run_queue):
            self._run_queue = collections.deque(job for job in self._run_queue
                                                if job.message is not message)
        log.warn("{queue_id}: queue file removed behind the server's back; message forgotten",
                 queue_id=envelope.queue_id)
        self._persist(self.spool.remove(envelope.queue_id, envelope.size), envelope, "remove")

    def _job_done(self, _, job: _Job) -> None:
        self._in_flight -= 1
        self._backends_in_use.ended(job.backends)
        self._pump()
        self._check_idle()

    # -- finishing -------------------------------------------------------------------

    def _finish(self, message: _Message, notices: list | None = None) -> None:
        """No recipient pending and none in flight: notifications, then remove."""
        envelope = message.envelope
        self._cancel_timer(message)
        self._messages.pop(envelope.queue_id, None)
        if notices is None:
            notices = self._notices(message, self._now())
        if envelope.held and not message.removed and (envelope.pending
                                                       or unreported_failures(envelope)):
            # kept, not removed: the hold is written into its envelope
            self._held[envelope.queue_id] = envelope
            self._after_notices(notices, envelope, "update", lambda: self.spool.update(envelope))
            return

        def remove() -> defer.Deferred | None:
            if message.removed:                  # by the backend, with its delivery
                self.spool.removed_on_delivery(envelope.queue_id)
                log.info("{queue_id}: removed", queue_id=envelope.queue_id)
                return None
            d = self.spool.remove(envelope.queue_id, envelope.size)
            d.addCallback(lambda _: log.info("{queue_id}: removed", queue_id=envelope.queue_id))
            return d
        self._after_notices(notices, envelope, "remove", remove)

    def _notices(self, message: _Message, now: float) -> list:
        """The notifications due for a message none of whose recipients is in flight."""
        envelope = message.envelope
        failed = unreported_failures(envelope)
        notices = []
        if failed:
            try:
                notices = list(self._final_failures(envelope, failed) or [])
            except NotificationHeld as held:
                for recipient in failed:
                    recipient.notified = False       # reported when it is released
                self._hold(message, held.reason)
        if self.notifier is not None:
            notices += self.notifier.others(self.spool.message(envelope), now, self.delay_warning,
                                            self.schedule.lifetime)
        return notices

    def _hold(self, message: _Message, reason: str) -> None:
        """Hold the message (the caller keeps it instead of removing it)."""
        envelope = message.envelope
        envelope.held = reason
        self._cancel_timer(message)
        log.warn("{queue_id}: held: {reason}; kept in the queue, neither retried nor expired, "
                 "until an administrator releases or removes it", queue_id=envelope.queue_id, reason=reason)

    def _final_failures(self, envelope: Envelope, recipients: list[Recipient]) -> list:
        """Recipients that ended FAILED and were not reported yet: their bounce.

        Returns the notices to spool (see :mod:`pymta.bounce.notifier`).
        Without a notifier the failures are only logged (each already has
        its ``status=bounced`` line).
        """
        if self.notifier is not None:
            return self.notifier.failures(self.spool.message(envelope), recipients, self._now())
        for recipient in recipients:
            recipient.notified = True
        addresses = ", ".join(f"<{r.address}>" for r in recipients)
        if envelope.sender:
            log.warn("{queue_id}: sender non-delivery notification NOT sent to <{sender}> "
                     "for {addresses} (no notifier configured)",
                     queue_id=envelope.queue_id, sender=envelope.sender, addresses=addresses)
        else:
            log.info("{queue_id}: no non-delivery notification for {addresses}: null sender",
                     queue_id=envelope.queue_id, addresses=addresses)
        return []

    def _update_if_queued(self, message: _Message) -> defer.Deferred | None:
        """Persist the envelope, unless the message finished (and was removed) meanwhile."""
        envelope = message.envelope
        if self._messages.get(envelope.queue_id) is not message:
            return None
        return self.spool.update(envelope)

    def _after_notices(self, notices: list, envelope: Envelope, what: str, then) -> None:
        """Spool ``notices``; once they are durable, run ``then()`` (the update or removal)."""
        if not notices:
            d = then()
            if d is not None:
                self._persist(d, envelope, what)
            return
        self._spool_writes += 1
        self._noticing[envelope.queue_id] += 1
        waits = [self._spool_notice(envelope, notice) for notice in notices]
        d = defer.gatherResults(waits, consumeErrors=True)

        def committed(_):
            d = then()
            if d is not None:
                self._persist(d, envelope, what)

        def failed(failure: Failure) -> None:
            # Leave the original as it is on disk (not updated, not removed) and
            # decide its notifications again: at the next round while it is
            # queued, else after a restart.  None is lost; one may be repeated.
            for notice in notices:
                notice.unmark()
            log.failure("{queue_id}: cannot spool a delivery status notification; it will be "
                        "tried again", failure, LogLevel.critical, queue_id=envelope.queue_id)

        def done(_) -> None:
            self._spool_writes -= 1
            self._noticing[envelope.queue_id] -= 1
            if not self._noticing[envelope.queue_id]:
                del self._noticing[envelope.queue_id]
                message = self._messages.get(envelope.queue_id)
                if message is not None and message.envelope is envelope:
                    self._reschedule(message)      # the deliveries _due held back
            self._check_idle()

        d.addCallbacks(committed, failed)
        d.addBoth(done)

    def _spool_notice(self, original: Envelope, notice) -> defer.Deferred:
        writer = None
        try:
            writer = self.spool.new_message()
            writer.write(notice.content)
            d = writer.commit(notice.envelope)
        except Exception:
            failure = Failure()
            if writer is not None:
                writer.abort()
            return defer.fail(failure)

        def committed(_) -> None:
            who = "postmaster" if notice.envelope.notification == "postmaster" else "sender"
            kind = {"failed": "non-delivery", "delayed": "delay"}.get(notice.action,
                                                                       "delivery status")
            log.info("{queue_id}: {who} {kind} notification: {notice_id}",
                     queue_id=original.queue_id, who=who, kind=kind, notice_id=writer.queue_id)
            log.info("{queue_id}: client=local, from=<>, size={size}, nrcpt=1 ({kind} for {original})",
                     queue_id=writer.queue_id, size=notice.envelope.size,
                     kind=notice.envelope.notification, original=original.queue_id)
            if self._stopped:
                return
            self.submit(notice.envelope)

        return d.addCallback(committed)

    # -- spool writes and idleness -----------------------------------------------------

    def _persist(self, d: defer.Deferred, envelope: Envelope, what: str) -> None:
        self._spool_writes += 1

        def failed(failure: Failure) -> None:
            if what == "update" and not self.spool.is_queued(envelope.queue_id):
                # removed behind our back between the attempt and this update
                message = self._messages.get(envelope.queue_id)
                if message is not None and message.envelope is envelope:
                    self._forget_removed(message)
                elif self._held.get(envelope.queue_id) is envelope:   # as it was held
                    self._forget_removed(_Message(envelope))
                return
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

