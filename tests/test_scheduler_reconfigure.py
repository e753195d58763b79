"""A reload hands the scheduler new backends and retry settings (DeliveryScheduler.reconfigure).

Attempts in flight finish with the backends they started with; attempts
started afterwards use the new ones; the Deferred ``reconfigure`` returns
fires once no attempt with the previous backends is in flight, so they can
be closed.  The queue stays: the same messages, the same spool.
"""

from __future__ import annotations

from twisted.internet import defer

from pymta.config.model import Retry
from pymta.delivery.result import DeliveryResult
from test_scheduler import Harness, RecordingBackend, rcpt


def test_attempts_in_flight_finish_with_the_old_backends_new_ones_use_the_new(tmp_path):
    pending = defer.Deferred()
    old = RecordingBackend(pending, "defer")
    h = Harness(tmp_path, {"local": old})
    h.scheduler.startService()
    first = h.submit(rcpt("a@example.org"))
    h.reactor.advance(0)
    assert len(old.calls) == 1                         # in flight, with the old backend

    new = RecordingBackend("ok", "ok")
    released = h.scheduler.reconfigure({"local": new}, Retry(initial=60, maximum=600, lifetime=3600,
                                                            concurrency=4), None)
    assert not released.called
    second = h.submit(rcpt("b@example.org"))
    h.reactor.advance(0)
    assert [addresses for _, addresses in new.calls] == [["b@example.org"]]

    pending.callback([DeliveryResult.deferred("busy", 451, "4.2.0")])
    assert released.called and released.result == {"local": old}
    assert len(old.calls) == 1
    # its retry: the new backend, on the new schedule (60 s, not 300 s)
    assert h.stored(first.queue_id).recipients[0].next_attempt == h.reactor.seconds() + 60
    h.reactor.advance(60)
    assert [addresses for _, addresses in new.calls] == [["b@example.org"], ["a@example.org"]]
    assert h.spool.queue_ids() == [] and second.queue_id not in h.scheduler.queued()
    assert h.scheduler.concurrency == 4


def test_with_nothing_in_flight_the_old_backends_are_free_at_once(tmp_path):
    old = RecordingBackend()
    h = Harness(tmp_path, {"local": old})
    h.scheduler.startService()
    released = h.scheduler.reconfigure({"local": RecordingBackend()}, Retry(), None)
    assert released.called and released.result == {"local": old}
