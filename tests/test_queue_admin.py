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


# -- while the message's notifications are being written -------------------------------------

def noticing(tmp_path):
    """A message whose bounce for x@r.test is on its way to the spool (not durable yet), with
    later@r.test deferred: (bounce harness, envelope, the Deferreds of the notices spooled)."""
    from test_bounce import Harness as NotifyingHarness, fail_for, rcpt as out_rcpt
    h = NotifyingHarness(tmp_path, fail_for("x@r.test"))
    writes: list[defer.Deferred] = []
    spool_notice = h.scheduler._spool_notice

    def slow_spool_notice(original, notice):
        d = defer.Deferred()
        writes.append(d)
        d.addCallback(lambda _: spool_notice(original, notice))
        return d
    h.scheduler._spool_notice = slow_spool_notice
    envelope = h.submit(out_rcpt("x@r.test"), out_rcpt("later@r.test", "local"))
    h.local.decide = lambda address: DeliveryResult.deferred("busy", 451, "4.2.0")
    h.reactor.advance(0)
    assert len(writes) == 1 and envelope.recipients[0].notified
    return h, envelope, writes


def test_bounce_waits_until_the_notifications_in_writing_are_durable(tmp_path):
    h, envelope, writes = noticing(tmp_path)
    qid = envelope.queue_id
    with pytest.raises(QueueError, match="being written; try again"):
        h.scheduler.bounce(qid, "spam")
    writes[0].errback(OSError(28, "No space left on device"))    # x@r.test's bounce not spooled
    assert h.spool.queue_ids() == [qid]
    assert h.scheduler.bounce(qid, "spam") == "bounced"             # both reported now
    for d in writes[1:]:
        d.callback(None)
    h.reactor.advance(0)
    bounces = [addrs for env, addrs, _ in h.out.received if env.notification == "bounce"]
    assert bounces == [["alice@example.net"]] and h.spool.queue_ids() == []
    [report] = [body for env, _, body in h.out.received if env.notification == "bounce"]
    assert b"x@r.test" in report and b"later@r.test" in report


def test_release_waits_until_the_notifications_in_writing_are_durable(tmp_path):
    from test_bounce import Harness as NotifyingHarness, fail_for, rcpt as out_rcpt
    h = NotifyingHarness(tmp_path, fail_for())
    answer = defer.Deferred()
    h.out.deliver = lambda message, recipients: answer
    writes: list[defer.Deferred] = []
    h.scheduler._spool_notice = lambda original, notice: writes.append(defer.Deferred()) or writes[-1]
    envelope = h.submit(out_rcpt("x@r.test"), out_rcpt("later@r.test"))
    qid = envelope.queue_id
    h.reactor.advance(0)
    h.scheduler.hold(qid, "by hand")                   # while the delivery is in flight
    answer.callback([DeliveryResult.failed("no", 550, "5.1.1"),
                     DeliveryResult.deferred("busy", 451, "4.2.0")])
    assert len(writes) == 1 and h.scheduler.held() == {qid: "by hand"}   # x's bounce in writing
    with pytest.raises(QueueError, match="being written; try again"):
        h.scheduler.release(qid)
    assert h.scheduler.held() == {qid: "by hand"}
    writes[0].callback(None)
    assert h.scheduler.release(qid)


def test_a_notification_to_the_postmaster_is_not_bounced_even_when_not_held(tmp_path):
    from test_bounce import Harness as NotifyingHarness, fail_for, rcpt as out_rcpt
    h = NotifyingHarness(tmp_path, fail_for("x@r.test"),
                         decide_local=lambda address: DeliveryResult.deferred("busy", 451, "4.2.0"))
    h.submit(out_rcpt("x@r.test"), sender="")          # its failure goes to the postmaster
    h.reactor.advance(0)
    [copy_id] = h.spool.queue_ids()
    assert h.scheduler.held() == {} and h.scheduler.queued() == [copy_id]
    with pytest.raises(QueueError, match="notification to the postmaster cannot be bounced"):
        h.scheduler.bounce(copy_id, "spam")
    assert h.scheduler.queued() == [copy_id] and h.scheduler.held() == {}
    assert h.spool.load(copy_id).recipients[0].state != FAILED


def test_release_during_a_delivery_keeps_a_failure_of_that_hold_failed(tmp_path):
    out, local = defer.Deferred(), defer.Deferred()
    h = Harness(tmp_path, {"out": RecordingBackend(out), "local": RecordingBackend(local)})
    h.scheduler.startService()
    envelope = h.submit(rcpt("x@r.test", "out"), rcpt("y@example.org"))
    qid = envelope.queue_id
    h.reactor.advance(0)
    h.scheduler.hold(qid, "by hand")
    out.callback([DeliveryResult.failed("no such user", 550, "5.1.1")])
    assert h.scheduler.release(qid)
    local.callback([DeliveryResult.delivered()])
    h.reactor.advance(10_000)
    assert envelope.recipients[0].state == FAILED and envelope.recipients[0].attempts == 1
    assert h.scheduler.final_failures == [(qid, ["x@r.test"])]
    assert h.spool.queue_ids() == []


def test_requeue_keeps_an_alias_command_with_its_pipe_backend(tmp_path):
    pipe, local = RecordingBackend("defer", "defer"), RecordingBackend("ok")
    h = Harness(tmp_path, {"pipe": pipe, "local": local})
    h.scheduler.startService()
    command = rcpt("list@example.org", "pipe")
    command.command, command.sender = "/usr/bin/archive --list", "owner-list@example.org"
    qid = h.submit(command, rcpt("bob@example.org", "pipe")).queue_id
    h.reactor.advance(0)
    assert [addresses for _, addresses in pipe.calls] == [["list@example.org"], ["bob@example.org"]]
    pipe.outcomes = ["ok", "ok"]
    assert h.scheduler.requeue(qid, lambda address: "local") == "requeued"
    h.reactor.advance(0)
    assert [addresses for _, addresses in pipe.calls][2:] == [["list@example.org"]]
    assert local.calls == [(qid, ["bob@example.org"])]        # the address, routed again
    assert h.spool.queue_ids() == []


def test_requeue_routes_again_the_recipients_waiting_for_a_delivery_slot(tmp_path):
    from pymta.config.model import Retry
    answer = defer.Deferred()
    old = RecordingBackend(answer)
    h = Harness(tmp_path, {"old": old},
                retry=Retry(initial=300, maximum=1200, lifetime=3600, concurrency=1))
    h.scheduler.startService()
    first = h.submit(rcpt("a@example.org", "old")).queue_id
    waiting = h.submit(rcpt("b@example.org", "old")).queue_id
    h.reactor.advance(0)
    assert old.calls == [(first, ["a@example.org"])]   # the second waits for the one slot
    new = RecordingBackend("ok")
    h.scheduler.reconfigure({"new": new}, Retry(initial=300, maximum=1200, lifetime=3600,
                                                 concurrency=1), None)
    assert h.scheduler.requeue(waiting, lambda address: "new") == "requeued"
    answer.callback([DeliveryResult.delivered()])
    h.reactor.advance(0)
    assert new.calls == [(waiting, ["b@example.org"])]
    assert h.spool.queue_ids() == []


def test_bounce_that_no_one_can_be_told_of_says_the_message_is_held_again(tmp_path):
    from test_bounce import Harness as NotifyingHarness, notifier, rcpt as out_rcpt
    h = NotifyingHarness(tmp_path, lambda address: DeliveryResult.deferred("busy", 451, "4.2.0"))
    h.scheduler.notifier = notifier(routes={"r.test": "out"})     # no route to the postmaster
    qid = h.submit(out_rcpt("x@r.test"), sender="").queue_id      # a bounce: its failure goes there
    h.reactor.advance(0)
    outcome = h.scheduler.bounce(qid, "spam")
    assert outcome.startswith("held again: no delivery route for the postmaster")
    assert h.scheduler.held() == {qid: outcome.removeprefix("held again: ")}
    assert h.spool.queue_ids() == [qid]
