"""The retry schedule and the delivery scheduler (on a fake clock, with a real spool)."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.logger import capturedLogs, formatEvent

from pymta.config.model import Retry
from pymta.delivery.result import DeliveryResult
from pymta.envelope import DELIVERED, PENDING, Envelope, Recipient
from pymta.delivery.retry import RetrySchedule, format_delay
from pymta.delivery.scheduler import DeliveryScheduler
from pymta.spool.store import Spool

from schedulerkit import START, FakeReactor


# -- RetrySchedule ------------------------------------------------------------------

def test_delays_double_up_to_the_maximum():
    schedule = RetrySchedule(initial=300, maximum=4200, lifetime=5 * 86400)
    assert [schedule.next_delay(n) for n in range(1, 7)] == [300, 600, 1200, 2400, 4200, 4200]
    assert schedule.next_delay(10_000) == 4200


def test_expiry_after_the_lifetime():
    schedule = RetrySchedule(initial=60, maximum=600, lifetime=3600)
    assert not schedule.expired(START, START + 3599)
    assert schedule.expired(START, START + 3600)


@pytest.mark.parametrize("initial, maximum, lifetime", [(0, 10, 10), (20, 10, 10), (1, 10, -1)])
def test_nonsense_schedules_are_refused(initial, maximum, lifetime):
    with pytest.raises(ValueError):
        RetrySchedule(initial, maximum, lifetime)


def test_attempt_numbers_start_at_one():
    with pytest.raises(ValueError):
        RetrySchedule(1, 2, 3).next_delay(0)


@given(initial=st.floats(0.001, 1e6), factor=st.floats(1, 1e3), attempts=st.integers(1, 5000))
def test_delays_never_shrink_and_stay_in_bounds(initial, factor, attempts):
    schedule = RetrySchedule(initial, initial * factor, 1)
    delay = schedule.next_delay(attempts)
    assert initial <= delay <= schedule.maximum
    assert schedule.next_delay(attempts + 1) >= delay


def test_delay_is_printed_like_postfix():
    assert format_delay(0.01234) == "0.012"
    assert format_delay(3.5) == "3.5"
    assert format_delay(754.4) == "754"


# -- test doubles ---------------------------------------------------------------------

class RecordingBackend:
    """Answers each call with the next scripted outcome; records what it got."""

    def __init__(self, *outcomes):
        self.outcomes = list(outcomes)
        self.calls: list[tuple[str, list[str]]] = []
        self.bodies: list[bytes] = []

    def deliver(self, message, recipients):
        self.calls.append((message.envelope.queue_id, [r.address for r in recipients]))
        with message.open_body() as fp:
            self.bodies.append(fp.read())
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if isinstance(outcome, BaseException):
            raise outcome
        if isinstance(outcome, defer.Deferred):
            return outcome
        if outcome == "ok":
            return [DeliveryResult.delivered(relay="maildir:/var/mail/x") for _ in recipients]
        if outcome == "defer":
            return [DeliveryResult.deferred("mailbox busy", 451, "4.2.0") for _ in recipients]
        if outcome == "fail":
            return [DeliveryResult.failed("no such user", 550, "5.1.1") for _ in recipients]
        return outcome(recipients)


class Harness:
    def __init__(self, tmp_path, backends, retry=Retry(initial=300, maximum=1200, lifetime=3600,
                                                        concurrency=8)):
        self.reactor = FakeReactor()
        self.spool = Spool(str(tmp_path / "spool"), reactor=self.reactor)
        self.scheduler = RecordingScheduler(self.spool, backends, retry, reactor=self.reactor)

    def spool_message(self, *recipients, body=b"Subject: t\r\n\r\nhello\r\n") -> Envelope:
        writer = self.spool.new_message()
        writer.write(body)
        envelope = Envelope("", "sender@example.net", list(recipients), self.reactor.seconds())
        writer.commit(envelope)
        return envelope

    def submit(self, *recipients, **kw) -> Envelope:
        envelope = self.spool_message(*recipients, **kw)
        self.scheduler.submit(envelope)
        return envelope

    def stored(self, queue_id: str) -> Envelope:
        return self.spool.load(queue_id)


class RecordingScheduler(DeliveryScheduler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.final_failures: list[tuple[str, list[str]]] = []

    def _final_failures(self, envelope, recipients):
        self.final_failures.append((envelope.queue_id, [r.address for r in recipients]))
        super()._final_failures(envelope, recipients)


def rcpt(address: str, route: str = "local", original: str | None = None) -> Recipient:
    return Recipient(address, original or address, route)


def log_lines(events) -> list[str]:
    return [formatEvent(e) for e in events]


# -- delivery -------------------------------------------------------------------------------

def test_submitted_message_is_delivered_logged_and_removed(tmp_path):
    backend = RecordingBackend("ok")
    h = Harness(tmp_path, {"local": backend})
    h.scheduler.startService()
    envelope = h.submit(rcpt("alice@example.org"), rcpt("bob@example.org", original="robert@example.org"))
    assert backend.calls == []                     # as soon as possible, not inside submit()
    with capturedLogs() as events:
        h.reactor.advance(0.25)
    qid = envelope.queue_id
    assert backend.calls == [(qid, ["alice@example.org", "bob@example.org"])]
    assert backend.bodies == [b"Subject: t\r\n\r\nhello\r\n"]
    assert h.spool.queue_ids() == []
    lines = log_lines(events)
    assert f"{qid}: to=<alice@example.org>, relay=local[maildir:/var/mail/x], delay=0.25, " \
           f"status=sent (250 2.0.0 delivered)" in lines
    assert f"{qid}: to=<bob@example.org>, orig_to=<robert@example.org>, " \
           f"relay=local[maildir:/var/mail/x], delay=0.25, status=sent (250 2.0.0 delivered)" in lines
    assert lines[-1] == f"{qid}: removed"
    assert h.scheduler.final_failures == []


def test_recipients_are_grouped_by_route(tmp_path):
    local, relay = RecordingBackend("ok"), RecordingBackend("ok")
    h = Harness(tmp_path, {"local": local, "relay": relay})
    h.scheduler.startService()
    h.submit(rcpt("a@example.org"), rcpt("x@remote.example", "relay"), rcpt("b@example.org"))
    h.reactor.advance(0)
    assert [addresses for _, addresses in local.calls] == [["a@example.org", "b@example.org"]]
    assert [addresses for _, addresses in relay.calls] == [["x@remote.example"]]
    assert h.spool.queue_ids() == []


def test_deferred_recipient_is_retried_with_backoff_and_state_persisted(tmp_path):
    backend = RecordingBackend("defer", "defer", "ok")
    h = Harness(tmp_path, {"local": backend})
    h.scheduler.startService()
    envelope = h.submit(rcpt("alice@example.org"))
    with capturedLogs() as events:
        h.reactor.advance(0)
    assert any("status=deferred (451 4.2.0 mailbox busy)" in line for line in log_lines(events))
    stored = h.stored(envelope.queue_id).recipients[0]
    assert (stored.state, stored.attempts, stored.last_result) == (PENDING, 1, "451 4.2.0 mailbox busy")
    assert stored.next_attempt == START + 300

    h.reactor.advance(299)
    assert len(backend.calls) == 1
    h.reactor.advance(1)
    assert len(backend.calls) == 2
    assert h.stored(envelope.queue_id).recipients[0].next_attempt == START + 300 + 600
    h.reactor.advance(599)
    assert len(backend.calls) == 2
    h.reactor.advance(1)
    assert len(backend.calls) == 3
    assert h.spool.queue_ids() == []


def test_only_pending_recipients_are_retried(tmp_path):
    def half(recipients):
        return [DeliveryResult.delivered(), DeliveryResult.deferred("try later")]
    backend = RecordingBackend(half, "ok")
    h = Harness(tmp_path, {"local": backend})
    h.scheduler.startService()
    envelope = h.submit(rcpt("a@example.org"), rcpt("b@example.org"))
    h.reactor.advance(0)
    states = [r.state for r in h.stored(envelope.queue_id).recipients]
    assert states == [DELIVERED, PENDING]
    h.reactor.advance(300)
    assert backend.calls[1][1] == ["b@example.org"]
    assert h.spool.queue_ids() == []


@pytest.mark.parametrize("how", ["raise", "errback"])
def test_a_failing_backend_defers_its_whole_group_with_a_traceback(tmp_path, how):
    error = RuntimeError("connection pool exploded")
    outcome = error if how == "raise" else defer.fail(error)
    other = RecordingBackend("ok")
    h = Harness(tmp_path, {"local": RecordingBackend(outcome), "other": other})
    h.scheduler.startService()
    envelope = h.submit(rcpt("a@example.org"), rcpt("b@example.org"), rcpt("c@example.org", "other"))
    with capturedLogs() as events:
        h.reactor.advance(0)
    stored = h.stored(envelope.queue_id).recipients
    assert [r.state for r in stored] == [PENDING, PENDING, DELIVERED]
    assert "connection pool exploded" in stored[0].last_result
    assert stored[0].last_result.startswith("451 4.3.0")
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1
    assert failures[0]["log_failure"].value is error
    assert "delivery backend 'local' failed" in formatEvent(failures[0])


def test_wrong_number_of_results_is_a_backend_error(tmp_path):
    h = Harness(tmp_path, {"local": RecordingBackend(lambda rs: [DeliveryResult.delivered()])})
    h.scheduler.startService()
    envelope = h.submit(rcpt("a@example.org"), rcpt("b@example.org"))
    with capturedLogs():
        h.reactor.advance(0)
    assert [r.state for r in h.stored(envelope.queue_id).recipients] == [PENDING, PENDING]


def test_route_without_backend_is_deferred_with_a_clear_text(tmp_path):
    h = Harness(tmp_path, {})
    h.scheduler.startService()
    envelope = h.submit(rcpt("a@example.org", "lmtp"))
    h.reactor.advance(0)
    stored = h.stored(envelope.queue_id).recipients[0]
    assert stored.state == PENDING
    assert stored.last_result == "451 4.3.5 no delivery backend named 'lmtp' is configured"
    # the admin fixes the config; the retry finds the backend
    backend = RecordingBackend("ok")
    h.scheduler.backends = {"lmtp": backend}
    h.reactor.advance(300)
    assert len(backend.calls) == 1
    assert h.spool.queue_ids() == []


def test_permanent_failure_bounces_and_removes(tmp_path):
    h = Harness(tmp_path, {"local": RecordingBackend("fail")})
    h.scheduler.startService()
    envelope = h.submit(rcpt("nobody@example.org"))
    with capturedLogs() as events:
        h.reactor.advance(0)
    lines = log_lines(events)
    assert any(line.startswith(f"{envelope.queue_id}: to=<nobody@example.org>, relay=local, ")
               and line.endswith("status=bounced (550 5.1.1 no such user)") for line in lines)
    assert h.scheduler.final_failures == [(envelope.queue_id, ["nobody@example.org"])]
    assert lines[-1] == f"{envelope.queue_id}: removed"
    assert h.spool.queue_ids() == []


def test_deferred_past_the_lifetime_fails_as_expired(tmp_path):
    backend = RecordingBackend("defer", "defer", "defer", "defer")
    h = Harness(tmp_path, {"local": backend},
                Retry(initial=100, maximum=100, lifetime=250, concurrency=1))
    h.scheduler.startService()
    envelope = h.submit(rcpt("slow@example.org"))
    h.reactor.advance(0)
    h.reactor.advance(100)
    h.reactor.advance(100)
    assert h.spool.queue_ids() == [envelope.queue_id]
    with capturedLogs() as events:
        h.reactor.advance(100)          # 300 s in the queue: past the lifetime
    assert len(backend.calls) == 4
    bounced = [line for line in log_lines(events) if "status=bounced" in line]
    assert len(bounced) == 1
    assert re.search(r"status=bounced \(451 4\.4\.7 message expired after 5 minutes in the queue; "
                     r"last error: 451 4\.2\.0 mailbox busy\)", bounced[0])
    assert h.scheduler.final_failures == [(envelope.queue_id, ["slow@example.org"])]
    assert h.spool.queue_ids() == []


def test_concurrency_limits_backend_calls_in_flight(tmp_path):
    answers = [defer.Deferred() for _ in range(5)]
    backend = RecordingBackend(*answers)
    h = Harness(tmp_path, {"local": backend},
                Retry(initial=300, maximum=600, lifetime=3600, concurrency=2))
    h.scheduler.startService()
    for n in range(5):
        h.submit(rcpt(f"u{n}@example.org"))
    h.reactor.advance(0)
    assert len(backend.calls) == 2
    assert h.scheduler.in_flight == 2
    answers[0].callback([DeliveryResult.delivered()])
    assert len(backend.calls) == 3
    answers[2].callback([DeliveryResult.delivered()])
    answers[1].callback([DeliveryResult.delivered()])
    assert len(backend.calls) == 5
    for d in answers[3:]:
        d.callback([DeliveryResult.delivered()])
    assert h.scheduler.in_flight == 0
    assert h.spool.queue_ids() == []


def test_start_recovers_the_spool_and_respects_next_attempt(tmp_path):
    backend = RecordingBackend("ok", "ok")
    h = Harness(tmp_path, {"local": backend})
    later = Recipient("later@example.org", "later@example.org", "local", attempts=2,
                      next_attempt=START + 100, last_result="451 4.2.0 busy")
    done = Recipient("done@example.org", "done@example.org", "local", state=DELIVERED, attempts=1)
    waiting = h.spool_message(later, done)
    due = h.spool_message(rcpt("now@example.org"))
    finished = h.spool_message(Recipient("x@example.org", "x@example.org", "local", state=DELIVERED))
    h.scheduler.startService()              # recover() + schedule everything
    assert finished.queue_id not in h.spool.queue_ids()   # nothing pending: removed
    h.reactor.advance(0)
    assert backend.calls == [(due.queue_id, ["now@example.org"])]
    h.reactor.advance(99)
    assert len(backend.calls) == 1
    h.reactor.advance(1)
    assert backend.calls[1] == (waiting.queue_id, ["later@example.org"])
    assert h.spool.queue_ids() == []


def test_stop_waits_for_deliveries_in_flight_and_starts_no_more(tmp_path):
    answer = defer.Deferred()
    backend = RecordingBackend(answer, "ok")
    h = Harness(tmp_path, {"local": backend},
                Retry(initial=300, maximum=600, lifetime=3600, concurrency=1))
    h.scheduler.startService()
    first = h.submit(rcpt("a@example.org"))
    second = h.submit(rcpt("b@example.org"))
    h.reactor.advance(0)
    assert len(backend.calls) == 1            # the second waits for a slot
    stopped = h.scheduler.stopService()
    assert not stopped.called
    answer.callback([DeliveryResult.delivered()])
    assert stopped.called
    h.reactor.advance(1000)
    assert len(backend.calls) == 1            # nothing started after stop
    assert h.spool.queue_ids() == [second.queue_id]
    assert first.queue_id not in h.spool.queue_ids()
    assert h.reactor.getDelayedCalls() == []


def test_a_slow_group_does_not_block_the_others_and_removal_waits_for_both(tmp_path):
    slow_answer = defer.Deferred()
    slow, fast = RecordingBackend(slow_answer), RecordingBackend("ok")
    h = Harness(tmp_path, {"slow": slow, "fast": fast})
    h.scheduler.startService()
    envelope = h.submit(rcpt("a@example.org", "slow"), rcpt("b@example.org", "fast"))
    h.reactor.advance(0)
    assert len(fast.calls) == 1
    assert [r.state for r in h.stored(envelope.queue_id).recipients] == [PENDING, DELIVERED]
    h.reactor.advance(10_000)                  # the in-flight recipient is not started twice
    assert len(slow.calls) == 1
    slow_answer.callback([DeliveryResult.delivered()])
    assert h.spool.queue_ids() == []


def test_end_to_end_from_spool_into_a_maildir(tmp_path):
    from pymta.delivery.maildir import MaildirBackend
    from relaykit import local_backend

    (tmp_path / "mail").mkdir()
    h = Harness(tmp_path, {})
    h.scheduler.backends = {"local": local_backend(MaildirBackend, tmp_path, h.reactor)}
    h.scheduler.startService()
    body = b"Subject: e2e\r\n\r\nbody\r\n"
    envelope = h.spool_message(rcpt("alice@example.org"), rcpt("bob+Work@example.org"),
                               rcpt("../evil@example.org"), body=body)
    envelope.prepend.append("Received: by mx.example.org\r\n")
    h.spool.update(envelope)
    with capturedLogs() as events:
        h.scheduler.submit(envelope)
        h.reactor.advance(0)
    alice = list((tmp_path / "mail" / "example.org" / "alice" / "new").iterdir())
    bob = list((tmp_path / "mail" / "example.org" / "bob" / ".Work" / "new").iterdir())
    assert len(alice) == len(bob) == 1
    assert alice[0].read_bytes() == (b"Return-Path: <sender@example.net>\r\n"
                                     b"Delivered-To: alice@example.org\r\n"
                                     b"Received: by mx.example.org\r\n" + body)
    lines = log_lines(events)
    assert sum("status=sent" in line for line in lines) == 2
    assert any("to=<../evil@example.org>" in line and "status=bounced (550 5.1.3" in line
               for line in lines)
    assert any("non-delivery notification NOT sent to <sender@example.net>" in line for line in lines)
    assert lines[-1] == f"{envelope.queue_id}: removed"
    assert h.spool.queue_ids() == []


def test_a_backend_answering_at_once_does_not_nest_one_call_per_message(tmp_path):
    import sys
    first = defer.Deferred()
    backend = RecordingBackend(first, *["defer"] * 600)
    h = Harness(tmp_path, {"local": backend},
                Retry(initial=300, maximum=600, lifetime=3600, concurrency=1))
    h.scheduler.startService()
    for n in range(601):
        h.submit(rcpt(f"u{n}@example.org"))
    h.reactor.advance(0)                  # one call in flight, 600 waiting in the run queue
    assert len(backend.calls) == 1
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(300)            # fewer frames than a nesting per message needs
    try:
        first.callback([DeliveryResult.deferred("busy")])   # the rest answer synchronously
    finally:
        sys.setrecursionlimit(limit)
    assert len(backend.calls) == 601
    assert h.scheduler.in_flight == 0


# -- queue files removed behind the server's back --------------------------------------

def _rm(h: Harness, queue_id: str, which=(".msg", ".env")) -> None:
    import os
    for suffix in which:
        try:
            os.unlink(os.path.join(h.spool.queue_dir, queue_id + suffix))
        except FileNotFoundError:
            pass


def _problems(lines: list[str]) -> list[str]:
    return [line for line in lines if "Traceback" in line or "FileNotFoundError" in line
            or "spool update failed" in line or "scheduler error" in line]


@pytest.mark.parametrize("which", [(".msg", ".env"), (".msg",)])
def test_a_deferred_message_removed_by_an_admin_is_forgotten_with_one_warning(tmp_path, which):
    backend = RecordingBackend("defer", "ok")
    h = Harness(tmp_path, {"local": backend})
    h.scheduler.startService()
    gone = h.submit(rcpt("alice@example.org"))
    h.reactor.advance(0)
    assert len(backend.calls) == 1 and h.scheduler.queued() == [gone.queue_id]
    _rm(h, gone.queue_id, which)
    with capturedLogs() as events:
        h.reactor.advance(300)                     # the retry: no attempt, one warning
        h.reactor.advance(3600)                    # and nothing more, ever
    lines = log_lines(events)
    warning = f"{gone.queue_id}: queue file removed behind the server's back; message forgotten"
    assert lines.count(warning) == 1
    assert [e["log_level"].name for e in events if formatEvent(e) == warning] == ["warn"]
    assert _problems(lines) == []
    assert len(backend.calls) == 1
    assert h.scheduler.queued() == []
    assert h.spool.queue_ids() == [] and not any(
        name.startswith(gone.queue_id) for name in __import__("os").listdir(h.spool.queue_dir))
    # another message still goes through
    other = h.submit(rcpt("bob@example.org"))
    h.reactor.advance(0)
    assert backend.calls[-1] == (other.queue_id, ["bob@example.org"])
    assert h.scheduler.queued() == [] and h.spool.queue_ids() == []


@pytest.mark.parametrize("outcome", ["defer", "fail", "raise"])
def test_a_message_removed_during_its_delivery_attempt_is_forgotten(tmp_path, outcome):
    attempt = defer.Deferred()
    backend = RecordingBackend(attempt)
    h = Harness(tmp_path, {"local": backend})
    h.scheduler.startService()
    gone = h.submit(rcpt("alice@example.org"))
    h.reactor.advance(0)
    assert len(backend.calls) == 1                 # in flight
    _rm(h, gone.queue_id)
    with capturedLogs() as events:
        if outcome == "raise":
            attempt.errback(FileNotFoundError(2, "No such file or directory"))
        else:
            result = (DeliveryResult.deferred("mailbox busy", 451, "4.2.0") if outcome == "defer"
                      else DeliveryResult.failed("no such user", 550, "5.1.1"))
            attempt.callback([result])
        h.reactor.advance(3600)
    lines = log_lines(events)
    assert lines.count(f"{gone.queue_id}: queue file removed behind the server's back; "
                       "message forgotten") == 1
    assert _problems(lines) == []
    assert h.scheduler.final_failures == []        # no bounce of a message that is gone
    assert len(backend.calls) == 1 and h.scheduler.queued() == []
    assert h.spool.queue_ids() == []


def test_only_the_updated_envelope_removed_keeps_the_message(tmp_path):
    """Without its ID.env the message is still queued: the next update writes it again."""
    backend = RecordingBackend("defer", "defer", "ok")
    h = Harness(tmp_path, {"local": backend})
    h.scheduler.startService()
    kept = h.submit(rcpt("alice@example.org"))
    h.reactor.advance(0)
    _rm(h, kept.queue_id, (".env",))
    with capturedLogs() as events:
        h.reactor.advance(300)
    assert len(backend.calls) == 2
    assert h.stored(kept.queue_id).recipients[0].attempts == 2
    assert not any("removed behind" in line for line in log_lines(events))
    h.reactor.advance(600)
    assert len(backend.calls) == 3 and h.spool.queue_ids() == []

# -- removal in the delivery batch (a crash repeats only the deliveries in flight) ----------

def _maildir_harness(tmp_path):
    from pymta.delivery.maildir import MaildirBackend
    from relaykit import local_backend

    h = Harness(tmp_path, {})
    backend = local_backend(MaildirBackend, tmp_path, h.reactor)
    seen = []                      # (queue file still there?, maildir files) when the results came
    stored = []                    # then, the recipients' states on disk (if still there)

    def deliver(message, recipients):
        d = MaildirBackend.deliver(backend, message, recipients)

        def answered(results):
            new = tmp_path / "mail" / "example.org"
            queue_id = message.envelope.queue_id
            seen.append((os.path.exists(h.spool.body_path(queue_id)), len(list(new.glob("*/new/*")))))
            if seen[-1][0]:
                stored.append([(r.address, r.state) for r in h.spool.load(queue_id).recipients])
            return results
        return d.addCallback(answered)
    backend.deliver = deliver
    h.scheduler.backends = {"local": backend, "relay": RecordingBackend(defer.Deferred())}
    h.scheduler.startService()
    h.stored = stored
    return h, seen


def test_a_delivered_message_leaves_the_spool_in_its_delivery_batch(tmp_path):
    """When the backend answers, the message is already out of queue/ (no later removal batch)."""
    h, seen = _maildir_harness(tmp_path)
    envelope = h.submit(rcpt("alice@example.org"), rcpt("bob@example.org"))
    removals = []
    h.spool._removals.submit = lambda request: removals.append(request)   # a later batch: none
    with capturedLogs() as events:
        h.reactor.advance(0)
    assert seen == [(False, 2)]
    assert removals == []
    assert h.spool.queue_ids() == [] and h.scheduler.queued() == []
    assert log_lines(events)[-1] == f"{envelope.queue_id}: removed"
    # the file went to free/ for reuse, as a removal batch does
    assert len(os.listdir(h.spool.free_dir)) == 1


def test_a_delivery_that_does_not_finish_the_message_leaves_its_removal_to_the_scheduler(tmp_path):
    h, seen = _maildir_harness(tmp_path)
    # another recipient in flight on another route: the message is not finished
    envelope = h.submit(rcpt("alice@example.org"), rcpt("carol@example.net", route="relay"))
    h.reactor.advance(0)
    assert seen == [(True, 1)]
    assert h.spool.queue_ids() == [envelope.queue_id]
    # a success report asked for: it must be spooled before the message goes
    sure = rcpt("dave@example.org")
    sure.notify = ("SUCCESS",)
    other = h.submit(sure)
    h.reactor.advance(0)
    assert seen[-1] == (True, 2)
    assert other.queue_id not in h.spool.queue_ids()        # removed afterwards, as before
    # one recipient refused (no safe mailbox): not every delivery succeeded
    bad = h.submit(rcpt("../x@example.org"), rcpt("erin@example.org"))
    h.reactor.advance(0)
    assert seen[-1][0] is True
    assert bad.queue_id not in h.spool.queue_ids()          # bounced (550), then removed as before


def test_no_removal_with_delivery_while_a_notification_of_the_message_is_being_spooled(tmp_path):
    """The update that follows the notification must not race a removal in the delivery batch."""
    orders = []

    class Backend(RecordingBackend):
        def deliver(self, message, recipients):
            orders.append(message.record_delivery)
            return super().deliver(message, recipients)

    class Notifier:
        def failures(self, message, recipients, now):
            for recipient in recipients:
                recipient.notified = True
            return ["bounce"]

        def others(self, message, now, delay_warning, lifetime):
            return []

    backend = Backend(lambda recipients: [DeliveryResult.failed("no such user"),
                                          DeliveryResult.deferred("busy")], "ok", "ok")
    h = Harness(tmp_path, {"local": backend})
    h.scheduler.notifier = Notifier()
    h.scheduler._final_failures = lambda env, failed: DeliveryScheduler._final_failures(h.scheduler, env, failed)
    spooling = []
    h.scheduler._spool_notice = lambda original, notice: spooling.append(defer.Deferred()) or spooling[-1]
    h.scheduler.startService()
    envelope = h.submit(rcpt("x@example.org"), rcpt("y@example.org"))
    h.reactor.advance(0)
    assert orders[0] is not None and len(spooling) == 1       # the bounce is being spooled
    h.scheduler.flush()
    h.reactor.advance(0)
    assert len(orders) == 1                                   # y waits until it is durable
    assert h.spool.queue_ids() == [envelope.queue_id]
    spooling[0].callback(None)
    h.reactor.advance(0)
    assert len(orders) == 2                                   # y delivered; the message removed
    assert h.spool.queue_ids() == []
    # a message without a notification in flight gets its order again
    h.submit(rcpt("z@example.org"))
    h.reactor.advance(0)
    assert orders[2] is not None and orders[2].queue_id != envelope.queue_id


def test_deliveries_that_do_not_finish_the_message_are_recorded_in_their_batch(tmp_path):
    """Recipients left for later: the delivered ones are marked in the stored envelope at once."""
    h, seen = _maildir_harness(tmp_path)
    later = rcpt("carol@example.net", route="relay")
    later.next_attempt = h.reactor.seconds() + 3600          # pending, not due now
    envelope = h.submit(rcpt("alice@example.org"), later, rcpt("bob@example.org"))
    h.reactor.advance(0)
    assert seen == [(True, 2)]
    assert h.stored == [[("alice@example.org", DELIVERED), ("carol@example.net", PENDING),
                         ("bob@example.org", DELIVERED)]]
    stored = h.spool.load(envelope.queue_id).recipients
    assert stored[0].attempts == 1 and stored[0].last_result.startswith("250 2.0.0 delivered to maildir")
    # a success report asked for: recorded, then reported and removed by the scheduler
    sure = rcpt("dave@example.org")
    sure.notify = ("SUCCESS",)
    other = h.submit(sure)
    h.reactor.advance(0)
    assert h.stored[-1] == [("dave@example.org", DELIVERED)]
    assert other.queue_id not in h.spool.queue_ids()


def test_a_recorded_delivery_keeps_what_an_update_wrote_meanwhile(tmp_path):
    h = Harness(tmp_path, {})
    envelope = h.spool_message(rcpt("alice@example.org"), rcpt("carol@example.net", route="relay"))
    envelope.recipients[1].attempts = 3                   # the update of another delivery
    h.spool.update(envelope)
    record = h.spool.delivery_record(envelope, (0,), False)
    assert record.apply([(True, "250 2.0.0 delivered")]) is False
    stored = h.spool.load(envelope.queue_id).recipients
    assert [(r.state, r.attempts) for r in stored] == [(DELIVERED, 1), (PENDING, 3)]
    assert os.listdir(tmp_path / "spool" / "tmp") == []


def test_a_message_is_not_delivered_further_while_its_notification_is_being_spooled(tmp_path):
    """The bounce of one recipient must be durable before the message leaves the spool.

    Its last recipient delivered meanwhile (ETRN, a retry) would finish it
    and remove it while the bounce was still on its way to disk; and if
    spooling the bounce then failed, it was lost with the message."""
    from pymta.bounce.notifier import Notice

    class Notifier:
        def failures(self, message, recipients, now):
            for recipient in recipients:
                recipient.notified = True
            return [Notice(None, b"", "failed", list(recipients))]

        def others(self, message, now, delay_warning, lifetime):
            return []

    backend = RecordingBackend(lambda recipients: [DeliveryResult.failed("no such user"),
                                                   DeliveryResult.deferred("busy")], "ok")
    h = Harness(tmp_path, {"local": backend})
    h.scheduler.notifier = Notifier()
    h.scheduler._final_failures = lambda env, failed: DeliveryScheduler._final_failures(h.scheduler, env, failed)
    spooling = []
    h.scheduler._spool_notice = lambda original, notice: spooling.append(defer.Deferred()) or spooling[-1]
    h.scheduler.startService()
    envelope = h.submit(rcpt("x@example.org"), rcpt("y@example.org"))
    h.reactor.advance(0)
    assert len(spooling) == 1                                # x's bounce on its way to disk
    h.scheduler.flush()
    h.reactor.advance(0)
    assert len(backend.calls) == 1                           # y waits for it
    assert h.spool.queue_ids() == [envelope.queue_id]
    with capturedLogs():
        spooling[0].errback(OSError(28, "No space left on device"))
    h.reactor.advance(0)
    # y delivered now; x's bounce decided again, and the message kept until it is durable
    assert len(backend.calls) == 2
    assert len(spooling) == 2
    assert h.spool.queue_ids() == [envelope.queue_id]
    spooling[1].callback(None)
    assert h.spool.queue_ids() == [] and h.scheduler.queued() == []


def test_a_message_removed_by_an_admin_while_its_delivery_is_recorded_gets_one_warning(tmp_path):
    h, seen = _maildir_harness(tmp_path)
    backend = h.scheduler.backends["local"]
    deliver_all = type(backend).deliver_all

    def deliver_all_then_rm(self, jobs):
        results = deliver_all(self, jobs)
        for message, _ in jobs:
            _rm(h, message.envelope.queue_id)        # between the mailbox sync and the record
        return results
    backend.deliver_all = deliver_all_then_rm.__get__(backend)
    later = rcpt("carol@example.net", route="relay")
    later.next_attempt = h.reactor.seconds() + 3600          # pending: the delivery only marks
    with capturedLogs() as events:
        gone = h.submit(rcpt("alice@example.org"), later)
        h.reactor.advance(0)
        h.reactor.advance(3600)
    lines = log_lines(events)
    assert seen == [(False, 1)]
    assert [formatEvent(e) for e in events if e["log_level"].name in ("warn", "error", "critical")] == [
        f"{gone.queue_id}: queue file removed behind the server's back; message forgotten"]
    assert _problems(lines) == [] and h.scheduler.queued() == []


def test_a_message_removed_by_an_admin_as_it_is_held_is_forgotten_with_one_warning(tmp_path):
    from pymta.bounce.notifier import NotificationHeld

    class Notifier:
        def failures(self, message, recipients, now):
            raise NotificationHeld("undeliverable postmaster notification")

        def others(self, message, now, delay_warning, lifetime):
            return []

    h = Harness(tmp_path, {"local": RecordingBackend("fail")})
    h.scheduler.notifier = Notifier()
    h.scheduler._final_failures = lambda env, failed: DeliveryScheduler._final_failures(h.scheduler, env, failed)
    update = h.spool.update

    def rm_then_update(envelope):
        _rm(h, envelope.queue_id)                   # between the hold and its update
        return update(envelope)
    h.spool.update = rm_then_update
    h.scheduler.startService()
    with capturedLogs() as events:
        gone = h.submit(rcpt("postmaster@example.org"))
        h.reactor.advance(0)
    warnings = [formatEvent(e) for e in events if e["log_level"].name in ("warn", "error", "critical")]
    assert warnings[-1] == f"{gone.queue_id}: queue file removed behind the server's back; message forgotten"
    assert _problems(log_lines(events)) == []
    assert h.scheduler.held() == {} and h.scheduler.queued() == []
