"""The dnsbl plugin: query names, listing codes, reply text, TTL cache, failures."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from pymta.config.errors import OptionError
from pymta.config.options import PluginContext
from pymta.dns.resolver import Answer, DNSError
from pymta.policy.dnsbl import DNSBL, reverse_query_name
from pymta.session import Session
from pymta.verdict import DUNNO, Kind
from dnsserver import LoopbackDNS
from spfzone import fired

ROOT = Path(__file__).resolve().parent.parent


class FakeResolver:
    """a_with_ttl / txt_with_ttl from a dict {name: (values, ttl) | "error"}; counts queries."""

    def __init__(self, a=None, txt=None):
        self.records = {"A": a or {}, "TXT": txt or {}}
        self.queries: list[tuple[str, str]] = []

    def _answer(self, rtype, name):
        self.queries.append((rtype, name))
        entry = self.records[rtype].get(name, ([], 60))
        if entry == "error":
            return defer.fail(DNSError(name, rtype, "timeout"))
        return defer.succeed(Answer(list(entry[0]), entry[1]))

    def a_with_ttl(self, name):
        return self._answer("A", name)

    def txt_with_ttl(self, name):
        return self._answer("TXT", name)


def make(options, resolver, clock=None):
    clock = clock or Clock()
    context = PluginContext("mx.example.org", (), "/", clock, resolver)
    return DNSBL(options, context), clock


def check(plugin, ip="192.0.2.7", **kw):
    result = plugin.check_connect(Session(client_ip=ip, client_port=1, **kw))
    return fired(result) if isinstance(result, defer.Deferred) else result


def test_reverse_query_names():
    assert reverse_query_name("192.0.2.7", "bl.example") == "7.2.0.192.bl.example"
    assert reverse_query_name("::ffff:192.0.2.7", "bl.example") == "7.2.0.192.bl.example"
    assert reverse_query_name("2001:db8::1", "bl.example") == \
        "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.example"


def test_listed_client_refused_with_the_list_text():
    resolver = FakeResolver(a={"7.2.0.192.bl.example": (["127.0.0.2"], 300)},
                            txt={"7.2.0.192.bl.example": (["See https://bl.example/7\x00"], 300)})
    plugin, _ = make({"zones": ["clean.example", "bl.example"]}, resolver)
    verdict = check(plugin)
    assert (verdict.kind, verdict.code, verdict.enhanced) == (Kind.REJECT, 554, "5.7.1")
    assert verdict.text == ("Service unavailable; client host [192.0.2.7] blocked using bl.example; "
                            "See https://bl.example/7")
    assert check(plugin, "192.0.2.8") is DUNNO


def test_first_listing_zone_in_config_order_wins_and_text_is_optional():
    resolver = FakeResolver(a={"7.2.0.192.one.example": (["127.0.0.4"], 60),
                               "7.2.0.192.two.example": (["127.0.0.2"], 60)})
    plugin, _ = make({"zones": ["two.example", "one.example"]}, resolver)
    assert check(plugin).text == "Service unavailable; client host [192.0.2.7] blocked using two.example"


def test_listing_codes():
    answers = {"7.2.0.192.bl.example": (["127.0.0.3"], 60),
               "8.2.0.192.bl.example": (["127.255.255.254"], 60),
               "9.2.0.192.bl.example": (["10.0.0.1"], 60)}
    plugin, _ = make({"zones": ["bl.example"]}, FakeResolver(a=answers))
    assert check(plugin).kind is Kind.REJECT
    assert check(plugin, "192.0.2.8") is DUNNO          # 127.255.255.0/24: a list error code
    assert check(plugin, "192.0.2.9") is DUNNO          # not a 127/8 answer
    plugin, _ = make({"zones": [{"zone": "bl.example", "codes": ["127.0.0.2", "127.255.255.254"]}]},
                     FakeResolver(a=answers))
    assert check(plugin) is DUNNO
    assert check(plugin, "192.0.2.8").kind is Kind.REJECT


def test_answers_cached_for_their_ttl():
    resolver = FakeResolver(a={"7.2.0.192.bl.example": (["127.0.0.2"], 100)},
                            txt={"7.2.0.192.bl.example": (["listed"], 50)})
    plugin, clock = make({"zones": ["bl.example"]}, resolver)
    assert check(plugin).kind is Kind.REJECT
    assert check(plugin, "192.0.2.8") is DUNNO          # not listed, negative TTL 60
    count = len(resolver.queries)
    clock.advance(49)
    assert check(plugin).kind is Kind.REJECT and check(plugin, "192.0.2.8") is DUNNO
    assert len(resolver.queries) == count               # both from the cache
    clock.advance(2)                                    # the TXT's 50 s have passed
    assert check(plugin).text.endswith("; listed")
    assert resolver.queries[count:] == [("A", "7.2.0.192.bl.example"), ("TXT", "7.2.0.192.bl.example")]
    clock.advance(10)
    check(plugin, "192.0.2.8")
    assert resolver.queries[-1] == ("A", "8.2.0.192.bl.example")


def test_cache_ttl_cap_and_size_bound():
    resolver = FakeResolver(a={"7.2.0.192.bl.example": (["127.0.0.2"], 86400)})
    plugin, clock = make({"zones": ["bl.example"], "max_cache_ttl": "10s", "cache_entries": 2}, resolver)
    check(plugin)
    clock.advance(11)
    check(plugin)
    assert resolver.queries.count(("A", "7.2.0.192.bl.example")) == 2
    for n in range(10):
        check(plugin, f"198.51.100.{n}")
    assert len(plugin._cache) == 2


def test_dns_failure_never_refuses_and_is_not_cached():
    resolver = FakeResolver(a={"7.2.0.192.bl.example": "error"})
    plugin, _ = make({"zones": ["bl.example"]}, resolver)
    assert check(plugin) is DUNNO
    assert check(plugin) is DUNNO
    assert resolver.queries.count(("A", "7.2.0.192.bl.example")) == 2
    # a listing whose TXT lookup fails is still a listing, without text
    resolver = FakeResolver(a={"7.2.0.192.bl.example": (["127.0.0.2"], 60)},
                            txt={"7.2.0.192.bl.example": "error"})
    plugin, _ = make({"zones": ["bl.example"]}, resolver)
    assert check(plugin).text == "Service unavailable; client host [192.0.2.7] blocked using bl.example"


def test_trusted_and_non_ip_clients_skipped():
    resolver = FakeResolver(a={"7.2.0.192.bl.example": (["127.0.0.2"], 60)})
    plugin, _ = make({"zones": ["bl.example"]}, resolver)
    assert check(plugin, trusted=True) is DUNNO
    assert check(plugin, "unknown") is DUNNO
    assert resolver.queries == []


@pytest.mark.parametrize("options, key, problem", [
    ({}, "zones", "required option missing"),
    ({"zones": []}, "zones", "non-empty array"),
    ({"zones": ["ok.example", 5]}, "zones[1]", "expected a zone name or a table"),
    ({"zones": ["[1.2.3.4]"]}, "zones[0]", "address literal"),
    ({"zones": [{"zone": "x.example", "codes": ["300.0.0.1"]}]}, "zones[0].codes[0]", "not an IPv4"),
    ({"zones": [{"zone": "x.example", "code": ["127.0.0.2"]}]}, "zones[0].code", "did you mean 'codes'"),
    ({"zones": ["x.example"], "cache_entries": 0}, "cache_entries", "at least 1"),
])
def test_option_errors(options, key, problem):
    with pytest.raises(OptionError) as info:
        make(options, FakeResolver())
    assert info.value.key == key and problem in info.value.problem


def test_resolver_ttls_against_loopback_dns():
    zone = {"2.0.0.127.bl.test": [("A", "127.0.0.2", 123), ("TXT", "why", 45)]}
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(ROOT)!r})
        from twisted.internet import defer, task
        from pymta.dns.resolver import DNSResolver

        async def main(reactor):
            r = DNSResolver([sys.argv[1]], timeout=2, attempts=1, reactor=reactor)
            listed = await r.a_with_ttl("2.0.0.127.bl.test")
            text = await r.txt_with_ttl("2.0.0.127.bl.test")
            absent = await r.a_with_ttl("3.0.0.127.bl.test")
            plain = await r.a("2.0.0.127.bl.test")
            try:
                await r.a("x" * 64 + ".bl.test")
                bad = "no error"
            except Exception as e:
                bad = [type(e).__name__, e.temporary]
            print(json.dumps([listed.values, listed.ttl, text.values, text.ttl,
                              absent.values, absent.ttl, plain, bad]))

        task.react(lambda reactor: defer.Deferred.fromCoroutine(main(reactor)))
    """)
    with LoopbackDNS(zone) as dns:
        out = subprocess.run([sys.executable, "-c", script, dns.nameserver], capture_output=True,
                             text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [["127.0.0.2"], 123, ["why"], 45, [], 300, ["127.0.0.2"],
                                      ["DNSError", False]]


def test_prefetch_starts_the_lookups_at_connect_through_the_sessions_resolver():
    shared = FakeResolver()
    session_dns = FakeResolver(a={"7.2.0.192.bl.example": (["127.0.0.2"], 60)})
    plugin, _clock = make({"zones": ["bl.example"]}, shared)
    session = Session(client_ip="192.0.2.7", client_port=1, dns=session_dns)
    plugin.prefetch_connect(session)
    assert session_dns.queries == [("A", "7.2.0.192.bl.example"), ("TXT", "7.2.0.192.bl.example")]
    verdict = fired(plugin.check_connect(session))      # what was started, not asked again
    assert verdict.kind is Kind.REJECT and verdict.code == 554
    assert len(session_dns.queries) == 2 and shared.queries == []
    assert "dnsbl" not in session.notes
