"""The scheduler's administrative changes (pymta.delivery.queue_admin) on a fake clock with a
real spool: hold, delete, bounce, requeue, flush, release, also while a delivery is in flight."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.logger import capturedLogs

from pymta.delivery.queue_admin import QueueError
from pymta.delivery.result import DeliveryResult
from pymta.envelope import FAILED

from test_scheduler import Harness, RecordingBackend, log_lines, rcpt


def deferred_message(tmp_path, *outcomes):
    backend = RecordingBackend("defer", *outcomes)
    h = Harness(tmp_path, {"local": backend})
    h.scheduler.startService()
    envelope = h.submit(rcpt("alice@example.org"))
    h.reactor.advance(0)
    assert len(backend.calls) == 1 and h.stored(envelope.queue_id).recipients[0].attempts == 1
    return h, backend, envelope.queue_id


def in_flight(tmp_path, *addresses):
    """A message whose delivery is in flight: (harness, its answer, backend, envelope)."""
    answer = defer.Deferred()
    backend = RecordingBackend(answer)
    h = Harness(tmp_path, {"local": backend})
    h.scheduler.startService()
    envelope = h.submit(*(rcpt(a) for a in addresses))
    h.reactor.advance(0)
    return h, answer, backend, envelope


def test_held_is_not_delivered_nor_expired_and_survives_a_restart(tmp_path):
    h, backend, qid = deferred_message(tmp_path)
    assert h.scheduler.hold(qid, "by hand") == "held"
    assert h.stored(qid).held == "by hand"
    h.reactor.advance(10_000)                              # past retries and the lifetime
    assert len(backend.calls) == 1
    assert h.scheduler.flush() == 0
    with pytest.raises(QueueError, match="held; release it first"):
        h.scheduler.flush_message(qid)
    with pytest.raises(QueueError, match="already held"):
        h.scheduler.hold(qid, "again")
    h.scheduler.stopService()
    h.scheduler.startService()                              # recovers it, held
    assert h.scheduler.held() == {qid: "by hand"}
    assert h.scheduler.release(qid)
    h.reactor.advance(0)
    assert len(backend.calls) == 2 and h.spool.queue_ids() == []


def test_hold_in_flight_records_the_attempt_then_holds(tmp_path):
    h, answer, backend, envelope = in_flight(tmp_path, "alice@example.org")
    qid = envelope.queue_id
    assert h.scheduler.hold(qid, "by hand") == "held (the delivery in flight finishes)"
    answer.callback([DeliveryResult.deferred("busy", 451, "4.2.0")])
    assert h.scheduler.held() == {qid: "by hand"}
    stored = h.stored(qid)
    assert stored.held == "by hand" and stored.recipients[0].attempts == 1
    h.reactor.advance(10_000)
    assert len(backend.calls) == 1


@pytest.mark.parametrize("result", [DeliveryResult.delivered(), DeliveryResult.failed("no", 550, "5.1.1"),
                                    DeliveryResult.deferred("busy", 451, "4.2.0")])
def test_delete_in_flight_drops_the_result_and_removes_once(tmp_path, result):
    h, answer, backend, envelope = in_flight(tmp_path, "alice@example.org")
    qid = envelope.queue_id
    assert h.scheduler.delete(qid) == "deleted (removed when the delivery in flight ends)"
    assert not h.scheduler.has_message(qid) and h.scheduler.entries() == []
    assert h.spool.queue_ids() == [qid]                      # until the attempt ends
    with capturedLogs() as events:
        answer.callback([result])
        h.reactor.advance(10_000)
    assert h.spool.queue_ids() == []
    assert log_lines(events).count(f"{qid}: removed") == 1
    assert h.scheduler.final_failures == []
    assert len(backend.calls) == 1 and h.scheduler.in_flight == 0


def test_delete_held_and_waiting(tmp_path):
    h, backend, qid = deferred_message(tmp_path)
    other = h.submit(rcpt("bob@example.org")).queue_id     # due, not started yet
    h.scheduler.hold(qid, "by hand")
    assert h.scheduler.delete(qid) == "deleted"
    assert h.scheduler.delete(other) == "deleted"
    h.reactor.advance(10_000)
    assert h.spool.queue_ids() == [] and len(backend.calls) == 1


def test_bounce_fails_the_pending_recipients_and_reports_them(tmp_path):
    h, backend, qid = deferred_message(tmp_path)
    assert h.scheduler.bounce(qid, "spam") == "bounced"
    assert h.scheduler.final_failures == [(qid, ["alice@example.org"])]
    h.reactor.advance(0)
    assert h.spool.queue_ids() == [] and len(backend.calls) == 1


def test_bounce_in_flight_fails_a_deferred_recipient_after_its_attempt(tmp_path):
    h, answer, _, envelope = in_flight(tmp_path, "alice@example.org", "bob@example.org")
    assert h.scheduler.bounce(envelope.queue_id, "spam").startswith("bounced (recipients in flight")
    answer.callback([DeliveryResult.delivered(), DeliveryResult.deferred("busy", 451, "4.2.0")])
    assert h.scheduler.final_failures == [(envelope.queue_id, ["bob@example.org"])]
    assert envelope.recipients[1].state == FAILED
    assert envelope.recipients[1].last_result == "550 5.0.0 spam"
    h.reactor.advance(0)
    assert h.spool.queue_ids() == []


def test_requeue_routes_again_and_resets_the_backoff(tmp_path):
    h, backend, qid = deferred_message(tmp_path)
    other = RecordingBackend("ok")
    h.scheduler.backends["other"] = other
    assert h.scheduler.requeue(qid, lambda address: "other") == "requeued"
    h.reactor.advance(0)
    assert other.calls == [(qid, ["alice@example.org"])] and h.spool.queue_ids() == []
