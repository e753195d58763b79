"""MX routing (RFC 5321 5.1, RFC 7505): the router on its own, and the relay backend
against a loopback DNS server and fake SMTP servers on several loopback addresses."""

from __future__ import annotations

import random
import socket

import pytest
from twisted.internet import defer

from dnsserver import zone_fixture
from fakesmtp import FakeSMTP, run_reactor
from relaykit import relay, spooled, statuses
from pymta.dns.resolver import MX, DNSError
from pymta.relay.hostnames import interleave
from pymta.relay.routing import MXRouter, RoutingFailure, address_literal, order_mx

HAS_IPV6 = socket.has_ipv6


# -- the router with a scripted resolver ---------------------------------------------------

class ScriptedResolver:
    def __init__(self, mx=None, a=None, aaaa=None, fail=None):
        self.answers = {"mx": mx or {}, "a": a or {}, "aaaa": aaaa or {}}
        self.fail = fail or {}

    def _answer(self, kind, name):
        if (kind, name) in self.fail:
            return defer.fail(DNSError(name, kind.upper(), self.fail[(kind, name)]))
        return defer.succeed(self.answers[kind].get(name, []))

    def mx(self, name):
        return self._answer("mx", name)

    def a(self, name):
        return self._answer("a", name)

    def aaaa(self, name):
        return self._answer("aaaa", name)


def route(router, domain):
    out = []
    router.route(domain).addBoth(out.append)
    [result] = out
    if isinstance(result, Exception) or hasattr(result, "value"):
        return getattr(result, "value", result)
    return result


def test_mx_hosts_in_preference_order_random_among_equals():
    records = [MX(20, "c.example"), MX(10, "a1.example"), MX(10, "a2.example"), MX(10, "a3.example"),
               MX(30, "d.example")]
    seen = set()
    for seed in range(30):
        ordered = [r.host for r in order_mx(records, random.Random(seed))]
        assert set(ordered[:3]) == {"a1.example", "a2.example", "a3.example"}
        assert ordered[3:] == ["c.example", "d.example"]
        seen.add(tuple(ordered[:3]))
    assert len(seen) > 1                     # equal preferences are really shuffled


def test_router_hop_and_limits():
    resolver = ScriptedResolver(mx={"example.org": [MX(10, f"mx{n}.example.org") for n in range(8)]})
    hop = route(MXRouter(resolver, port=2525, max_hosts=3), "Example.ORG")
    assert hop.destination == "example.org"
    assert len(hop.hosts) == 3 and all(port == 2525 for _, port in hop.hosts)


def test_null_mx_fails_at_once():
    failure = route(MXRouter(ScriptedResolver(mx={"null.example": [MX(0, "")]})), "null.example")
    assert isinstance(failure, RoutingFailure)
    assert (failure.result.status, failure.result.code, failure.result.enhanced) == \
        ("failed", 556, "5.1.10")


def test_no_mx_falls_back_to_the_address_records():
    resolver = ScriptedResolver(aaaa={"plain.example": ["2001:db8::1"]})
    hop = route(MXRouter(resolver), "plain.example")
    assert hop.hosts == (("plain.example", 25),)
    failure = route(MXRouter(ScriptedResolver()), "nothing.example")
    assert (failure.result.status, failure.result.enhanced) == ("failed", "5.1.2")


def test_dns_trouble_is_temporary():
    resolver = ScriptedResolver(fail={("mx", "flaky.example"): "server failure (SERVFAIL)"})
    failure = route(MXRouter(resolver), "flaky.example")
    assert (failure.result.status, failure.result.enhanced) == ("deferred", "4.4.3")
    resolver = ScriptedResolver(fail={("a", "half.example"): "timeout"})
    failure = route(MXRouter(resolver), "half.example")
    assert failure.result.status == "deferred"


def test_our_own_name_and_less_preferred_hosts_are_dropped():
    resolver = ScriptedResolver(mx={"d.example": [MX(5, "backup-first.example"), MX(10, "me.example"),
                                                  MX(20, "later.example")],
                                    "loop.example": [MX(10, "me.example"), MX(20, "x.example")]})
    router = MXRouter(resolver, local_names=("ME.example",))
    assert route(router, "d.example").hosts == (("backup-first.example", 25),)
    failure = route(router, "loop.example")
    assert (failure.result.status, failure.result.enhanced) == ("failed", "5.4.6")
    assert "loops back to myself" in failure.result.text


def test_address_literals_need_no_dns():
    assert address_literal("[192.0.2.1]") == "192.0.2.1"
    assert address_literal("[IPv6:2001:db8::1]") == "2001:db8::1"
    assert address_literal("example.org") is None
    hop = route(MXRouter(ScriptedResolver()), "[192.0.2.1]")
    assert hop.hosts == (("192.0.2.1", 25),)


def test_addresses_interleave_ipv6_first():
    assert interleave(["::1", "::2"], ["1.1.1.1", "2.2.2.2", "3.3.3.3"]) == \
        ["::1", "1.1.1.1", "::2", "2.2.2.2", "3.3.3.3"]


# -- the relay backend against a loopback DNS server ------------------------------------------

ZONE = {
    "fallback.test": [("MX", (10, "down.fallback.test")), ("MX", (20, "up.fallback.test"))],
    "down.fallback.test": [("A", "127.0.0.2")],            # nothing listens there
    "up.fallback.test": [("A", "127.0.0.1")],
    "busy.test": [("MX", (10, "greylisting.busy.test")), ("MX", (20, "calm.busy.test"))],
    "greylisting.busy.test": [("A", "127.0.0.3")],
    "calm.busy.test": [("A", "127.0.0.1")],
    "nullmx.test": [("MX", (0, ""))],
    "nomx.test": [("A", "127.0.0.1")],
    "servfail.test": [("SERVFAIL", "")],
    "v6.test": [("MX", (10, "mx.v6.test"))],
    "mx.v6.test": [("AAAA", "::1")],
    "self.test": [("MX", (10, "relay.local.test"))],
    "ghost.test": [("MX", (10, "nowhere.ghost.test"))],     # an MX host without addresses
}


dns = zone_fixture(ZONE)


def relay_one(tmp_path, dns, address, setup=None, **options):
    """Deliver one message to ``address`` with the relay backend; (result, servers)."""
    def test(reactor):
        main = FakeSMTP(reactor)
        servers = {"main": main}
        if setup is not None:
            servers.update(setup(reactor, main.port_number))
        backend = relay(reactor, tmp_path, main.port_number, dns.nameserver, **options)
        message = spooled(tmp_path, address)
        d = backend.deliver(message, message.envelope.recipients)
        return d.addCallback(lambda results: (results[0], servers))
    return run_reactor(test)


def test_delivery_goes_to_the_next_mx_when_the_first_refuses_connections(tmp_path, dns):
    result, servers = relay_one(tmp_path, dns, "bob@fallback.test")
    assert result.status == "delivered"
    assert result.relay.startswith("up.fallback.test[127.0.0.1]:")
    assert servers["main"].messages[0].recipients == ["bob@fallback.test"]


def test_delivery_goes_to_the_next_mx_after_a_4xx_greeting(tmp_path, dns):
    def busy_server(reactor, port):
        server = FakeSMTP(reactor, interface="127.0.0.3", port=port)
        server.greeting = b"421 4.7.0 greylisted, come back later\r\n"
        return {"busy": server}

    result, servers = relay_one(tmp_path, dns, "bob@busy.test", setup=busy_server)
    assert result.status == "delivered"
    assert result.relay.startswith("calm.busy.test[127.0.0.1]")
    assert len(servers["busy"].connections) == 1 and servers["busy"].messages == []


def test_null_mx_bounces_without_connecting(tmp_path, dns):
    result, servers = relay_one(tmp_path, dns, "bob@nullmx.test")
    assert (result.status, result.code, result.enhanced) == ("failed", 556, "5.1.10")
    assert servers["main"].connections == []


def test_a_domain_without_mx_gets_mail_at_its_address(tmp_path, dns):
    result, servers = relay_one(tmp_path, dns, "bob@nomx.test")
    assert result.status == "delivered"
    assert result.relay.startswith("nomx.test[127.0.0.1]")


@pytest.mark.parametrize("address, status, enhanced", [
    ("bob@no-such-domain.test", "failed", "5.1.2"),
    ("bob@servfail.test", "deferred", "4.4.3"),
    ("bob@self.test", "failed", "5.4.6"),
    ("bob@ghost.test", "deferred", "4.4.1"),
])
def test_routing_failures(tmp_path, dns, address, status, enhanced):
    result, servers = relay_one(tmp_path, dns, address)
    assert (result.status, result.enhanced) == (status, enhanced), result.summary()
    assert servers["main"].connections == []


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 on this machine")
def test_an_ipv6_only_mx_is_reached(tmp_path, dns):
    def v6_server(reactor, port):
        return {"v6": FakeSMTP(reactor, interface="::1", port=port)}

    result, servers = relay_one(tmp_path, dns, "bob@v6.test", setup=v6_server)
    assert result.status == "delivered", result.summary()
    assert result.relay.startswith("mx.v6.test[::1]:")
    assert len(servers["v6"].messages) == 1


def test_all_recipients_of_a_dead_destination_are_deferred_together(tmp_path, dns):
    def test(reactor):
        main = FakeSMTP(reactor)
        backend = relay(reactor, tmp_path, main.port_number, dns.nameserver)
        messages = [spooled(tmp_path, f"u{n}@ghost.test", "x@nomx.test") for n in range(4)]
        return defer.gatherResults([backend.deliver(m, m.envelope.recipients) for m in messages])

    results = run_reactor(test)
    assert [statuses(r) for r in results] == [["deferred", "delivered"]] * 4
    assert all("host not found" in r[0].text for r in results)
