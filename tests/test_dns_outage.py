"""DNS outage: a session waits at most its DNS time budget, and the cache spares the next ones.

End to end: a real twistd pymta whose only nameserver never answers (a
loopback UDP socket that reads and drops, counting the questions), with the
client-name lookup, a DNSBL and SPF all on; the client is smtplib from
127.0.0.2 (untrusted; 127.0.0.1, trusted here, is the start-up probe).
Before the budget, such a session waited for each lookup's full timeout one
after the other (PTR, DNSBL, SPF HELO, SPF MAIL FROM) before its 451.

Unit tests: the resolver's cache (TTLs on a task.Clock, size bound, failures
remembered briefly) and the session budget (task.Clock).
"""

from __future__ import annotations

import smtplib
import socket
import time

from twisted.internet import defer, task
from twisted.names import dns, error

from conftest import BACKEND_TOML
from dnsserver import SilentNameserver
from pymta.dns.budget import BUDGET_USED_UP, SESSION_CLOSED, SessionResolver
from pymta.dns.cache import MAX_TTL, AnswerCache
from pymta.dns.resolver import Answer, DNSError, DNSResolver

CLIENT = "127.0.0.2"
PTR_NAME = "2.0.0.127.in-addr.arpa"
DNSBL_NAME = "2.0.0.127.bl.test"


def outage_toml(ns: SilentNameserver, budget: str, timeout: str) -> str:
    return BACKEND_TOML + f"""
[dns]
nameservers = ["{ns.nameserver}"]
timeout = "{timeout}"
attempts = 1
hosts_file = ""
session_budget = "{budget}"

[stages]
connect = ["dnsbl"]
helo = ["spf"]
mail = ["spf"]

[plugins.dnsbl]
zones = ["bl.test"]
"""


def client_address_usable() -> bool:
    try:
        with socket.socket() as s:
            s.bind((CLIENT, 0))
        return True
    except OSError:
        return False


def session(port: int) -> tuple[float, int, tuple[int, bytes], tuple[int, bytes]]:
    """connect, EHLO, MAIL FROM from 127.0.0.2: (seconds taken, banner code, EHLO, MAIL reply)."""
    started = time.monotonic()
    client = smtplib.SMTP(timeout=60)
    banner, _ = client.connect("127.0.0.1", port, source_address=(CLIENT, 0))
    ehlo = client.ehlo("client.test")
    mail = client.mail("someone@sender.test")
    taken = time.monotonic() - started
    client.quit()
    return taken, banner, ehlo, mail


def test_unreachable_nameserver_session_waits_at_most_its_budget(make_server):
    assert client_address_usable(), "this test needs 127.0.0.2 on the loopback interface"
    budget = 2.0
    with SilentNameserver() as ns:
        # each lookup alone would wait 3 s: before the budget, PTR, DNSBL and SPF
        # (HELO and MAIL FROM identities) one after the other took ~9-12 s
        srv = make_server(outage_toml(ns, "2s", "3s"),
                          server_toml='trusted_networks = ["127.0.0.1/32"]')
        taken, banner, _ehlo, mail = session(srv.port)
        assert taken < 2 * budget + 2, f"session 1 took {taken:.1f}s"
        assert banner == 220                       # the DNSBL that did not answer is skipped
        assert mail[0] == 451
        assert mail[1].startswith(b"4.7.24 SPF: temporary error while checking sender.test: "
                                  b"DNS error looking up the SPF record of sender.test: "
                                  + BUDGET_USED_UP.encode())
        # the PTR and DNSBL queries went out at once, in parallel; SPF, after the
        # budget was gone, asked nothing
        assert sorted(ns.queries()) == sorted([(PTR_NAME, "PTR"), (DNSBL_NAME, "A")])

        # right after: the same names are not asked again (still in flight, then
        # remembered as failed); this session too waits at most its budget
        taken2, banner2, _ehlo, mail2 = session(srv.port)
        assert taken2 < 2 * budget + 2, f"session 2 took {taken2:.1f}s"
        assert (banner2, mail2[0]) == (220, 451)
        asked = ns.queries()
        assert asked.count((PTR_NAME, "PTR")) == 1
        assert asked.count((DNSBL_NAME, "A")) == 1

        log = srv.log_text()
        assert f"connect from unknown[{CLIENT}]" in log
        assert f"dnsbl: lookup of {DNSBL_NAME} failed ({BUDGET_USED_UP}); not refusing the client" in log
        assert f"{CLIENT}:" in log and "DNS time budget of 2s used up; 2 lookup(s) given up" in log
        assert "NOQUEUE: reject: MAIL from unknown[127.0.0.2]" in log
        assert "Traceback" not in log


def test_failures_are_remembered_so_the_next_session_asks_nothing(make_server):
    assert client_address_usable(), "this test needs 127.0.0.2 on the loopback interface"
    with SilentNameserver() as ns:
        # lookups time out (0.5 s) well within the budget: every name is asked once
        srv = make_server(outage_toml(ns, "5s", "0.5s"),
                          server_toml='trusted_networks = ["127.0.0.1/32"]')
        _taken, banner, _ehlo, mail = session(srv.port)
        assert (banner, mail[0]) == (220, 451)
        assert b"DNS error looking up the SPF record of sender.test: timeout" in mail[1]
        first = sorted(ns.queries())
        assert first == sorted([(PTR_NAME, "PTR"), (DNSBL_NAME, "A"), ("client.test", "TXT"),
                                ("sender.test", "TXT")])

        taken, banner, _ehlo, mail = session(srv.port)
        assert (banner, mail[0]) == (220, 451)
        assert b"timeout, cached" in mail[1]
        assert sorted(ns.queries()) == first      # not one more question
        assert taken < 5.0, f"session 2 took {taken:.1f}s"
        assert "Traceback" not in srv.log_text()


# -- the resolver's cache ------------------------------------------------------------

def a_record(name: str, address: str, ttl: int) -> dns.RRHeader:
    return dns.RRHeader(name.encode(), dns.A, dns.IN, ttl, dns.Record_A(address, ttl))


class ScriptedClient:
    """Stands in for twisted.names' client: each lookup gets a Deferred the test fires."""

    def __init__(self) -> None:
        self.asked: list[str] = []
        self.pending: dict[str, list[defer.Deferred]] = {}

    def lookupAddress(self, name):
        self.asked.append(name)
        d = defer.Deferred()
        self.pending.setdefault(name, []).append(d)
        return d

    lookupText = lookupPointer = lookupAddress

    def answer(self, name, result):
        for d in self.pending.pop(name):
            if isinstance(result, Exception):
                d.errback(result)
            else:
                d.callback(result)


def resolver_on(clock, **kw):
    resolver = DNSResolver(["127.0.0.1:1"], timeout=1, attempts=1, reactor=clock, **kw)
    client = ScriptedClient()
    resolver._client = client
    return resolver, client


def fired(d):
    results = []
    d.addBoth(results.append)
    assert results, "the Deferred has not fired"
    return results[0]


def test_positive_answers_cached_for_their_ttl():
    clock = task.Clock()
    resolver, client = resolver_on(clock)
    d = resolver.a_with_ttl("host.test")
    client.answer("host.test", ([a_record("host.test", "192.0.2.1", 60)], [], []))
    assert fired(d) == Answer(["192.0.2.1"], 60)
    clock.advance(59)
    assert fired(resolver.a("host.test")) == ["192.0.2.1"]       # same answer, no query
    assert fired(resolver.a_with_ttl("host.test")).ttl == 1       # TTL counts down
    assert client.asked == ["host.test"]
    clock.advance(1)
    resolver.a("host.test")                                       # expired: asked again
    assert client.asked == ["host.test", "host.test"]


def test_negative_answers_cached_for_the_negative_ttl():
    clock = task.Clock()
    resolver, client = resolver_on(clock)
    soa = dns.RRHeader(b"test", dns.SOA, dns.IN, 600, dns.Record_SOA(minimum=30, ttl=600))
    message = dns.Message(rCode=dns.ENAME)
    message.authority = [soa]
    d = resolver.txt_with_ttl("nothing.test")
    client.answer("nothing.test", error.DNSNameError(message))
    assert fired(d) == Answer([], 30)
    clock.advance(29)
    assert fired(resolver.txt("nothing.test")) == []
    assert client.asked == ["nothing.test"]
    clock.advance(1)
    resolver.txt("nothing.test")
    assert client.asked == ["nothing.test"] * 2


def test_failures_remembered_for_failure_ttl_only():
    clock = task.Clock()
    resolver, client = resolver_on(clock, failure_ttl=5)
    d = resolver.ptr("1.2.0.192.in-addr.arpa")
    client.answer("1.2.0.192.in-addr.arpa", error.DNSQueryTimeoutError(None))
    assert fired(d).value.reason == "timeout"
    clock.advance(4.9)
    again = fired(resolver.ptr("1.2.0.192.in-addr.arpa")).value
    assert isinstance(again, DNSError) and again.temporary and again.reason == "timeout, cached"
    assert client.asked == ["1.2.0.192.in-addr.arpa"]
    clock.advance(0.1)
    resolver.ptr("1.2.0.192.in-addr.arpa")
    assert len(client.asked) == 2
    # SERVFAIL too; failure_ttl = 0 remembers nothing
    resolver, client = resolver_on(clock, failure_ttl=0)
    d = resolver.a("x.test")
    client.answer("x.test", error.DNSServerError(None))
    assert fired(d).value.reason == "server failure (SERVFAIL)"
    resolver.a("x.test")
    assert client.asked == ["x.test", "x.test"]


def test_a_cancelled_lookup_leaves_the_query_to_finish_and_be_cached():
    clock = task.Clock()
    resolver, client = resolver_on(clock)
    d = resolver.a("host.test")
    d.cancel()
    assert fired(d).check(defer.CancelledError)
    client.answer("host.test", ([a_record("host.test", "192.0.2.1", 60)], [], []))
    assert fired(resolver.a("host.test")) == ["192.0.2.1"]
    assert client.asked == ["host.test"]


def test_cache_size_bound_drops_the_least_recently_used():
    clock = task.Clock()
    cache = AnswerCache(clock.seconds, entries=3)
    for name in "abc":
        cache.put("A", name, [name], 60)
    assert cache.get("A", "a") == (["a"], 60)        # a is now the most recently used
    cache.put("A", "d", ["d"], 60)
    assert len(cache) == 3
    assert cache.get("A", "b") is None                # the least recently used went
    assert [cache.get("A", n) is not None for n in "acd"] == [True, True, True]
    # no TTL, no entry; a long TTL is capped; names are case-insensitive
    cache.put("A", "zero", ["z"], 0)
    assert cache.get("A", "zero") is None
    cache.put("TXT", "Long.Test", ["t"], 10 * MAX_TTL)
    assert cache.get("TXT", "long.test") == (["t"], MAX_TTL)
    assert AnswerCache(clock.seconds, entries=0).get("A", "a") is None


# -- the session budget ----------------------------------------------------------------

class SlowResolver:
    """Lookups that answer only when the test says so (or never)."""

    def __init__(self) -> None:
        self.pending: dict[str, defer.Deferred] = {}
        self.cached: dict[str, list] = {}

    def _lookup(self, name):
        if name in self.cached:
            return defer.succeed(self.cached[name])
        d = defer.Deferred()
        self.pending[name] = d
        return d

    a = aaaa = ptr = txt = mx = a_with_ttl = txt_with_ttl = _lookup


def test_budget_shared_by_parallel_lookups_and_spent_only_while_waiting():
    clock = task.Clock()
    inner = SlowResolver()
    view = SessionResolver(inner, 10, clock)
    first, second = view.ptr("p.test"), view.a_with_ttl("d.test")
    clock.advance(3)
    inner.pending["p.test"].callback(["name.test"])
    assert fired(first) == ["name.test"]
    clock.advance(1)
    inner.pending["d.test"].callback(Answer([], 60))
    assert fired(second) == Answer([], 60)
    assert view.remaining() == 6                     # 4 s waited, in parallel: spent once
    clock.advance(100)                               # nothing waiting: nothing spent
    assert view.remaining() == 6
    inner.cached["c.test"] = ["cached"]
    assert fired(view.txt("c.test")) == ["cached"]   # answered at once
    assert view.remaining() == 6


def test_when_the_budget_runs_out_every_lookup_fails_at_once():
    clock = task.Clock()
    inner = SlowResolver()
    view = SessionResolver(inner, 2, clock, label="127.0.0.2:1234")
    waiting = [view.ptr("p.test"), view.a_with_ttl("d.test")]
    clock.advance(1)
    waiting.append(view.txt("s.test"))
    clock.advance(0.999)
    assert not any(d.called for d in waiting)
    clock.advance(0.001)
    for d, name in zip(waiting, ("p.test", "d.test", "s.test")):
        failure = fired(d)
        assert failure.check(DNSError) and failure.value.temporary
        assert failure.value.reason == BUDGET_USED_UP and failure.value.name == name
    assert view.exhausted and view.remaining() == 0
    later = fired(view.mx("m.test"))                 # asked after: fails without a query
    assert later.value.reason == BUDGET_USED_UP
    assert "m.test" not in inner.pending
    # a late answer to a given-up lookup is dropped quietly
    inner.pending["p.test"].callback(["late.test"])
    assert clock.getDelayedCalls() == []


def test_a_cancelled_lookup_stops_spending_the_budget():
    clock = task.Clock()
    inner = SlowResolver()
    view = SessionResolver(inner, 5, clock)
    d = view.txt("s.test")
    clock.advance(2)
    d.cancel()
    assert fired(d).check(defer.CancelledError)
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert view.remaining() == 3
    assert not inner.pending["s.test"].called        # the query itself was left alone


def test_a_closed_session_leaves_no_timer_and_asks_nothing_more():
    clock = task.Clock()
    inner = SlowResolver()
    view = SessionResolver(inner, 5, clock)
    waiting = view.ptr("p.test")
    clock.advance(1)
    view.close()                                     # the client left
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert not waiting.called                        # not given up: its answer still comes
    inner.pending["p.test"].callback(["late.test"])
    assert fired(waiting) == ["late.test"]
    later = fired(view.txt("s.test"))                # a check still running after the client left
    assert later.check(DNSError) and later.value.reason == SESSION_CLOSED
    assert "s.test" not in inner.pending


def test_a_client_that_leaves_at_once_leaves_no_dns_budget_behind(make_server):
    assert client_address_usable(), "this test needs 127.0.0.2 on the loopback interface"
    with SilentNameserver() as ns:
        srv = make_server(outage_toml(ns, "1s", "5s"),
                          server_toml='trusted_networks = ["127.0.0.1/32"]')
        with socket.create_connection(("127.0.0.1", srv.port), source_address=(CLIENT, 0)):
            deadline = time.monotonic() + 5
            while len(ns.queries()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)                   # the PTR and DNSBL queries are out
        deadline = time.monotonic() + 5
        while f"disconnect from unknown[{CLIENT}]" not in srv.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.5)                            # past the session's budget
        log = srv.log_text()
        assert f"disconnect from unknown[{CLIENT}]" in log
        assert "DNS time budget of 1s used up" not in log
        assert "Traceback" not in log
