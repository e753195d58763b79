"""The scheduler's pure decisions (pymta.delivery.retry): no reactor, no spool."""

from pymta.delivery.result import DeliveryResult
from pymta.delivery.retry import (RetrySchedule, delivery_finishes, domain_matcher, due_by_route,
                                  make_due, next_due, record_result, unreported_failures)
from pymta.envelope import DELIVERED, FAILED, PENDING, Envelope, Recipient

SCHEDULE = RetrySchedule(initial=60, maximum=600, lifetime=3600)


def recipient(address: str = "a@example.org", route: str = "local", **fields) -> Recipient:
    r = Recipient(address, address, route)
    for name, value in fields.items():
        setattr(r, name, value)
    return r


def envelope(*recipients: Recipient) -> Envelope:
    return Envelope(queue_id="Q1", sender="s@example.net", recipients=list(recipients),
                    received_at=1000.0)


def test_a_delivered_result_is_final():
    r = recipient()
    assert record_result(r, DeliveryResult.delivered(), SCHEDULE, 1000, 1010) == (
        "sent", "250 2.0.0 delivered")
    assert (r.state, r.finished_at, r.attempts, r.last_result) == (DELIVERED, 1010, 1, "250 2.0.0 delivered")


def test_a_deferred_result_is_retried_then_expires():
    r = recipient()
    status, _ = record_result(r, DeliveryResult.deferred("busy"), SCHEDULE, 1000, 1010)
    assert status == "deferred" and r.state == PENDING and r.next_attempt == 1010 + 60
    status, summary = record_result(r, DeliveryResult.deferred("busy"), SCHEDULE, 1000, 1000 + 3600)
    assert status == "bounced" and r.state == FAILED
    assert summary == "451 4.4.7 message expired after 1 hour in the queue; last error: 451 4.3.0 busy"
    assert unreported_failures(envelope(r, recipient("b@example.org"))) == [r]


def test_which_recipients_are_due_and_when():
    env = envelope(recipient("a@example.org", next_attempt=50), recipient("b@example.org", "relay"),
                   recipient("c@example.org", next_attempt=10), recipient("d@example.org", state=DELIVERED))
    assert due_by_route(env, set(), 20) == {"relay": [1], "local": [2]}
    assert due_by_route(env, {1}, 20) == {"local": [2]}
    assert next_due(env, {1, 2}) == 50 and next_due(env, {0, 1, 2}) is None
    assert make_due(env, set(), domain_matcher("example.org"), 5)
    assert [r.next_attempt for r in env.recipients[:3]] == [5, 0, 5]
    assert not make_due(env, set(), domain_matcher("@other.test"), 0)


def test_a_delivery_finishes_its_message_only_if_nothing_else_waits():
    done = recipient("b@example.org", state=DELIVERED)
    assert delivery_finishes(envelope(recipient(), done), {0}, notifying=False)
    assert not delivery_finishes(envelope(recipient(), done), {0}, notifying=True)   # b's report
    assert not delivery_finishes(envelope(recipient(), recipient("b@example.org")), {0}, False)
    assert not delivery_finishes(envelope(recipient(notify=("SUCCESS",))), {0}, False)
