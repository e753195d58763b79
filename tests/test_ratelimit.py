"""The ratelimit plugin and its sliding-window counter."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from pymta.config.errors import OptionError
from pymta.config.options import PluginContext
from pymta.policy.ratelimit import RateLimit, SlidingWindowCounter
from pymta.session import Session, Transaction
from pymta.verdict import DUNNO, Kind


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_counter_allows_up_to_the_limit_per_key():
    clock = FakeClock()
    counter = SlidingWindowCounter(60, clock=clock)
    assert [counter.allow("a", 3) for _ in range(4)] == [True, True, True, False]
    assert counter.allow("b", 3)
    assert counter.current("a") == 3           # refused events are not counted


def test_counter_slides():
    clock = FakeClock(6000.0)                  # the start of a window
    counter = SlidingWindowCounter(60, clock=clock)
    for _ in range(4):
        assert counter.allow("k", 4)
    clock.now += 60                             # next window: the previous one still overlaps fully
    assert not counter.allow("k", 4)
    clock.now += 30                             # half of it overlaps: 4 * 0.5 = 2 counted
    assert counter.current("k") == pytest.approx(2.0)
    assert counter.allow("k", 4) and counter.allow("k", 4)
    assert not counter.allow("k", 4)
    clock.now += 120                            # two windows later everything is forgotten
    assert counter.current("k") == 0
    assert all(counter.allow("k", 4) for _ in range(4))


def test_counter_memory_is_bounded():
    clock = FakeClock()
    counter = SlidingWindowCounter(10, max_keys=50, clock=clock)
    for n in range(200):
        counter.allow(n, 5)
    assert len(counter) == 50
    assert counter.current(199) == 1 and counter.current(0) == 0    # the oldest went first
    clock.now += 25                              # more than a window after the last event
    counter.allow("new", 5)                      # the sweep runs on the next event
    assert len(counter) == 1


def make(options, clock=None):
    clock = clock or Clock()
    return RateLimit(options, PluginContext("mx.example.org", (), "/", clock, None)), clock


def session(ip="192.0.2.7", **kw) -> Session:
    return Session(client_ip=ip, client_port=1, **kw)


def test_connections_per_ip():
    plugin, clock = make({"window": "1m", "connections_per_ip": 2})
    assert plugin.check_connect(session()) is DUNNO
    assert plugin.check_connect(session()) is DUNNO
    verdict = plugin.check_connect(session())
    assert (verdict.kind, verdict.code, verdict.enhanced) == (Kind.DISCONNECT, 421, "4.7.0")
    assert verdict.text == "Too many connections from [192.0.2.7] (at most 2 per 1m); try again later"
    assert plugin.check_connect(session("192.0.2.8")) is DUNNO
    clock.advance(120)
    assert plugin.check_connect(session()) is DUNNO


def test_messages_and_recipients_per_ip_and_per_user():
    plugin, _ = make({"messages_per_ip": 1, "messages_per_user": 2,
                      "recipients_per_ip": 2, "recipients_per_user": 3})
    txn = Transaction(sender="a@example.org")
    assert plugin.check_sender(session(), txn) is DUNNO
    verdict = plugin.check_sender(session(), txn)
    assert (verdict.kind, verdict.code, verdict.enhanced) == (Kind.DEFER, 451, "4.7.1")
    assert verdict.text == "Too many messages from [192.0.2.7] (at most 1 per 1m); try again later"
    # an authenticated user is counted as the user, from any address
    assert plugin.check_sender(session(auth_user="alice"), txn) is DUNNO
    assert plugin.check_sender(session("198.51.100.1", auth_user="alice"), txn) is DUNNO
    verdict = plugin.check_sender(session(auth_user="alice"), txn)
    assert verdict.text == "Too many messages from user alice (at most 2 per 1m); try again later"
    for n in range(2):
        assert plugin.check_recipient(session(), txn, f"r{n}@example.org") is DUNNO
    verdict = plugin.check_recipient(session(), txn, "r9@example.org")
    assert (verdict.kind, verdict.code, verdict.enhanced) == (Kind.DEFER, 451, "4.5.3")
    for n in range(3):
        assert plugin.check_recipient(session(auth_user="bob"), txn, f"r{n}@example.org") is DUNNO
    assert plugin.check_recipient(session(auth_user="bob"), txn, "x@example.org").code == 451


def test_unlimited_by_default_and_trusted_exempt():
    plugin, _ = make({})
    assert all(plugin.check_connect(session()) is DUNNO for _ in range(100))
    plugin, _ = make({"connections_per_ip": 1})
    assert all(plugin.check_connect(session(trusted=True)) is DUNNO for _ in range(5))
    plugin, _ = make({"connections_per_ip": 1, "exempt_trusted": False})
    assert plugin.check_connect(session(trusted=True)) is DUNNO
    assert plugin.check_connect(session(trusted=True)).code == 421


@pytest.mark.parametrize("options, key", [
    ({"window": 0}, "window"),
    ({"messages_per_ip": -1}, "messages_per_ip"),
    ({"messages_per_ipp": 3}, "messages_per_ipp"),
    ({"max_keys": 0}, "max_keys"),
])
def test_option_errors(options, key):
    with pytest.raises(OptionError) as info:
        make(options)
    assert info.value.key == key
