"""check_host() limits and DNS error handling (RFC 7208 4.6.4, 5, 5.5, 6.2), on a fake zone."""

from __future__ import annotations

from twisted.internet import defer

from pymta.spf import SPFChecker, check_host, identity
from spfzone import ZoneResolver, fired


def run(zone: dict, domain: str = "example.com", ip: str = "192.0.2.1", **kw):
    resolver = ZoneResolver(zone)
    result = fired(check_host(resolver, ip, domain, f"user@{domain}", "helo.example", **kw))
    return result, resolver


def txt(text: str):
    return ("TXT", [text])


def test_ten_lookups_allowed_eleventh_is_permerror():
    zone = {f"i{n}.example.com": [txt(f"v=spf1 include:i{n + 1}.example.com")] for n in range(12)}
    zone["i9.example.com"] = [txt("v=spf1 ip4:192.0.2.1")]          # 10th include passes
    zone["example.com"] = [txt("v=spf1 include:i0.example.com -all")]
    result, _ = run(zone)
    assert (result.result, result.lookups) == ("pass", 10)
    zone["i9.example.com"] = [txt("v=spf1 include:i10.example.com")]
    zone["i10.example.com"] = [txt("v=spf1 ip4:192.0.2.1")]
    result, _ = run(zone)
    assert result.result == "permerror" and "more than 10 DNS-querying terms" in result.problem


def test_lookups_are_counted_as_evaluated_not_as_written():
    terms = " ".join(["a"] * 20)
    result, _ = run({"example.com": [txt(f"v=spf1 ip4:192.0.2.1 {terms}"), ("A", "192.0.2.9")]})
    assert (result.result, result.lookups) == ("pass", 0)


def test_limits_are_configurable():
    zone = {"example.com": [txt("v=spf1 a a a -all"), ("A", "192.0.2.9")]}
    result, _ = run(zone, lookup_limit=2)
    assert result.result == "permerror"


def test_void_lookups():
    zone = {"example.com": [txt("v=spf1 a:n1.example.com a:n2.example.com ?all")]}
    assert run(zone)[0].result == "neutral"
    zone = {"example.com": [txt("v=spf1 a:n1.example.com a:n2.example.com mx:n3.example.com ?all")]}
    result, _ = run(zone)
    assert (result.result, result.void_lookups) == ("permerror", 3)
    assert "void lookups" in result.problem


def test_mx_hosts_without_addresses_are_not_void():
    # an IPv6 client and IPv4-only MX hosts: no AAAA records, but no void lookups either
    zone = {"example.com": [txt("v=spf1 mx ip6:2001:db8::1 -all"),
                            ("MX", [10, "mx1.example.com"]), ("MX", [20, "mx2.example.com"]),
                            ("MX", [30, "mx3.example.com"])]}
    for n in (1, 2, 3):
        zone[f"mx{n}.example.com"] = [("A", f"192.0.2.{n}")]
    result, _ = run(zone, ip="2001:db8::1")
    assert (result.result, result.void_lookups) == ("pass", 0)


def test_mx_record_limit():
    zone = {"example.com": [txt("v=spf1 mx -all")] +
            [("MX", [n, f"mx{n}.example.com"]) for n in range(10)]}
    assert run(zone)[0].result == "fail"
    zone["example.com"].append(("MX", [10, "mx10.example.com"]))
    result, _ = run(zone)
    assert result.result == "permerror" and "11 MX records" in result.problem


def test_ptr_checks_at_most_ten_names_and_skips_errors():
    names = [f"h{n}.other.example" for n in range(10)] + ["mail.example.com"]
    zone = {"example.com": [txt("v=spf1 ptr -all")],
            "1.2.0.192.in-addr.arpa": [("PTR", n) for n in names],
            "mail.example.com": [("A", "192.0.2.1")]}
    assert run(zone)[0].result == "fail"                       # the 11th name is ignored
    zone["1.2.0.192.in-addr.arpa"] = [("PTR", "broken.example.com"), ("PTR", "mail.example.com")]
    zone["broken.example.com"] = ["TIMEOUT"]
    assert run(zone)[0].result == "pass"                       # a failing name is skipped
    zone["1.2.0.192.in-addr.arpa"] = ["TIMEOUT"]
    assert run(zone)[0].result == "fail"                       # a PTR error: no match


def test_dns_errors_are_temperrors():
    assert run({"example.com": ["TIMEOUT"]})[0].result == "temperror"
    zone = {"example.com": [txt("v=spf1 a:slow.example.com -all")], "slow.example.com": ["TIMEOUT"]}
    result, _ = run(zone)
    assert result.result == "temperror"
    assert result.problem == "DNS error looking up the A of slow.example.com: timeout"
    zone = {"example.com": [txt("v=spf1 include:slow.example.com -all")], "slow.example.com": ["TIMEOUT"]}
    assert run(zone)[0].result == "temperror"


def test_exp_is_looked_up_only_on_fail_and_outside_the_limits():
    zone = {"example.com": [txt("v=spf1 a:n1.example.com a:n2.example.com exp=why.example.com -all")],
            "why.example.com": [txt("Not from %{i}")]}
    result, resolver = run(zone)
    assert (result.result, result.explanation, result.void_lookups) == ("fail", "Not from 192.0.2.1", 2)
    assert result.minus_all and result.mechanism == "-all" and result.domain == "example.com"
    zone["example.com"] = [txt("v=spf1 exp=why.example.com ip4:192.0.2.1 -all")]
    result, resolver = run(zone)
    assert result.result == "pass" and ("TXT", "why.example.com") not in resolver.queries
    zone["example.com"] = [txt("v=spf1 exp=why.example.com -ip4:192.0.2.1 ~all")]
    result, _ = run(zone)
    assert result.result == "fail" and not result.minus_all and result.explanation == "Not from 192.0.2.1"
    zone["example.com"] = [txt("v=spf1 -ip4:192.0.2.1 -all")]
    result, _ = run(zone)
    assert result.mechanism == "-ip4:192.0.2.1" and result.minus_all
    zone["example.com"] = [txt("v=spf1 redirect=other.example.com -all")]  # all: redirect ignored
    assert run(zone)[0].minus_all
    zone["example.com"] = [txt("v=spf1 ?all redirect=other.example.com")]
    zone["other.example.com"] = [txt("v=spf1 -all")]
    assert run(zone)[0].result == "neutral"
    zone["example.com"] = [txt("v=spf1 ip4:10.0.0.1 redirect=other.example.com")]
    result, _ = run(zone)
    assert result.minus_all and result.domain == "other.example.com"
    zone["why.example.com"] = ["TIMEOUT"]
    assert run(zone)[0].explanation is None                    # a DNS error drops the explanation


def test_none_results():
    assert run({})[0].result == "none"
    assert run({"example.com": [txt("not spf")]})[0].result == "none"
    result, resolver = run({}, domain="localhost")
    assert result.result == "none" and resolver.queries == []   # not a FQDN: no query
    assert run({}, ip="not-an-ip")[0].result == "none"


def test_include_and_redirect_of_nothing_are_permerrors():
    zone = {"example.com": [txt("v=spf1 include:nothing.example.com -all")]}
    assert run(zone)[0].result == "permerror"
    zone = {"example.com": [txt("v=spf1 redirect=nothing.example.com")]}
    assert run(zone)[0].result == "permerror"


def test_unqueryable_targets_do_not_match():
    long_label = "x" * 64
    zone = {"example.com": [txt(f"v=spf1 a:{long_label}.example.com exists:a..example.com -all")]}
    result, resolver = run(zone)
    assert result.result == "fail" and resolver.queries == [("TXT", "example.com")]


def test_identity():
    assert identity("a@example.com", "helo.example") == ("a@example.com", "example.com")
    assert identity("", "helo.example") == ("postmaster@helo.example", "helo.example")
    assert identity("@example.com", "h") == ("postmaster@example.com", "example.com")


def test_asynchronous_lookups_resume_when_answered():
    class SlowResolver(ZoneResolver):
        def __init__(self, zone):
            super().__init__(zone)
            self.pending: list[tuple[defer.Deferred, defer.Deferred]] = []

        def _answer(self, name, rtype, convert):
            inner = super()._answer(name, rtype, convert)
            outer = defer.Deferred()
            self.pending.append((inner, outer))
            return outer

    resolver = SlowResolver({"example.com": [txt("v=spf1 a -all"), ("A", "192.0.2.1")]})
    d = SPFChecker(resolver).check_host("192.0.2.1", "example.com", "u@example.com", "h.example")
    results = []
    d.addCallback(results.append)
    steps = 0
    while resolver.pending:
        inner, outer = resolver.pending.pop(0)
        assert not results
        inner.chainDeferred(outer)
        steps += 1
    assert steps == 2 and results[0].result == "pass"
