"""DMARC (RFC 7489) logic: records, organizational domains, alignment, policy and pct."""

from __future__ import annotations

import pytest
from twisted.internet import defer

from pymta.dkim.author import author_domain
from pymta.dkim.dmarc import (OrganizationalDomain, PolicyLookup, RecordError, aligned,
                              discover_policy, evaluate, parse_record)
from pymta.dns.resolver import DNSError
from pymta.policy.dmarc import dkim_passes, spf_identity
from pymta.plugin_api import AuthResult

ORG = OrganizationalDomain()


def test_organizational_domain_from_the_public_suffix_list():
    assert ORG("mail.example.co.uk") == "example.co.uk"
    assert ORG("a.b.example.org") == "example.org"
    assert ORG("example.org") == "example.org"


def test_record_tags():
    record = parse_record("v=DMARC1; p=Reject; sp=none; pct=50; adkim=s; aspf=r; "
                          "rua=mailto:a@example.org, mailto:b@example.net; unknown=x")
    assert (record.p, record.sp, record.pct, record.adkim, record.aspf) == \
        ("reject", "none", 50, "s", "r")
    assert record.rua == ("mailto:a@example.org", "mailto:b@example.net")
    assert parse_record("v=DMARC1; rua=mailto:a@example.org").p == "none"   # 6.6.3
    assert parse_record("v=DMARC1;p=quarantine;").p == "quarantine"
    # 6.6.3: an invalid sp= spoils the record as an invalid p= does
    record = parse_record("v=DMARC1; p=reject; sp=bogus; rua=mailto:a@example.org")
    assert (record.p, record.sp) == ("none", None)


@pytest.mark.parametrize("text", ["p=reject; v=DMARC1", "v=DMARC1", "v=DMARC1; p=maybe",
                                  "v=DMARC2; p=reject", "v=DMARC1; p reject",
                                  "v=DMARC1; p=reject; sp=bogus"])
def test_unusable_records(text):
    with pytest.raises(RecordError):
        parse_record(text)


def test_alignment_relaxed_and_strict():
    assert aligned("mail.example.org", "example.org", "r", ORG)
    assert aligned("example.org", "news.example.org", "r", ORG)
    assert not aligned("mail.example.org", "example.org", "s", ORG)
    assert aligned("Example.ORG.", "example.org", "s", ORG)
    assert not aligned("example.net", "example.org", "r", ORG)
    assert not aligned("a.co.uk", "b.co.uk", "r", ORG)


def lookup(text: str, domain: str = "example.org") -> PolicyLookup:
    return PolicyLookup(parse_record(text), domain)


def test_pass_by_dkim_or_spf_alignment_and_fail_without():
    policy = lookup("v=DMARC1; p=reject")
    assert evaluate("example.org", policy, ("fail", "x.test"), ["example.org"], ORG).result == "pass"
    assert evaluate("example.org", policy, ("pass", "bounce.example.org"), [], ORG).result == "pass"
    failed = evaluate("example.org", policy, ("pass", "other.test"), ["other.test"], ORG)
    assert (failed.result, failed.policy, failed.disposition) == ("fail", "reject", "reject")
    strict = lookup("v=DMARC1; p=reject; aspf=s; adkim=s")
    assert evaluate("example.org", strict, ("pass", "bounce.example.org"), ["mail.example.org"],
                    ORG).result == "fail"


def test_subdomain_policy_and_pct_sampling():
    org_policy = lookup("v=DMARC1; p=reject; sp=quarantine")
    result = evaluate("news.example.org", org_policy, None, [], ORG)
    assert (result.policy, result.disposition) == ("quarantine", "quarantine")
    sampled = lookup("v=DMARC1; p=reject; pct=20")
    assert evaluate("example.org", sampled, None, [], ORG, sample=lambda: 0.1).disposition == "reject"
    assert evaluate("example.org", sampled, None, [], ORG, sample=lambda: 0.5).disposition == \
        "quarantine"


def test_no_policy_temperror_permerror():
    assert evaluate("example.org", PolicyLookup(None), None, [], ORG).result == "none"
    assert evaluate("example.org", PolicyLookup(None, problem="x", temporary=True), None, [],
                    ORG).result == "temperror"
    assert evaluate("example.org", PolicyLookup(None, problem="more than one DMARC record"),
                    None, [], ORG).result == "permerror"


class FakeResolver:
    def __init__(self, zone):
        self.zone, self.asked = zone, []

    def txt(self, name):
        self.asked.append(name)
        answer = self.zone.get(name, [])
        return defer.fail(answer) if isinstance(answer, Exception) else defer.succeed(answer)


def discovered(zone, author):
    resolver = FakeResolver(zone)
    out = []
    discover_policy(resolver, author, ORG).addCallback(out.append)
    return out[0], resolver.asked


def test_discovery_falls_back_to_the_organizational_domain():
    zone = {"_dmarc.example.org": ["v=spf1 -all", "v=DMARC1; p=reject"]}
    found, asked = discovered(zone, "a.b.example.org")
    assert (found.record.p, found.domain) == ("reject", "example.org")
    assert asked == ["_dmarc.a.b.example.org", "_dmarc.example.org"]
    found, asked = discovered({"_dmarc.example.org": ["v=DMARC1; p=none", "v=DMARC1; p=reject"]},
                              "example.org")
    assert found.record is None and found.problem == "more than one DMARC record"
    # 6.6.3: several records (or an invalid one) at the author domain end the discovery there
    zone = {"_dmarc.a.example.org": ["v=DMARC1; p=none", "v=DMARC1; p=none"],
            "_dmarc.b.example.org": ["v=DMARC1; p=maybe"], "_dmarc.example.org": ["v=DMARC1; p=reject"]}
    for author in ("a.example.org", "b.example.org"):
        found, asked = discovered(zone, author)
        assert found.record is None and asked == [f"_dmarc.{author}"]
    # 6.6.3: what does not start with v=DMARC1 is not a DMARC record: on to the organizational domain
    zone["_dmarc.c.example.org"] = ["v=DMARC10; p=none", "v=dmarc1; p=none"]
    found, _ = discovered(zone, "c.example.org")
    assert (found.record.p, found.domain) == ("reject", "example.org")
    found, _ = discovered({"_dmarc.example.org": DNSError("_dmarc.example.org", "TXT", "timeout")},
                          "example.org")
    assert found.temporary and found.problem == "timeout"


def test_what_other_checks_recorded_is_read():
    recorded = [AuthResult("spf", "pass", (("smtp.mailfrom", "bounce@mail.example.org"),)),
                AuthResult("spf", "none", (("smtp.helo", "mx.example.net"),)),
                AuthResult("dkim", "pass", (("header.d", "example.org"), ("header.s", "s1"))),
                AuthResult("dkim", "fail", (("header.d", "evil.test"),))]
    assert spf_identity(recorded) == ("pass", "mail.example.org")
    assert spf_identity(recorded[1:]) == ("none", "mx.example.net")       # null sender: HELO
    assert dkim_passes(recorded) == ["example.org"]


@pytest.mark.parametrize("headers, domain, problem", [
    ([("From", "Alice <alice@Example.ORG>")], "example.org", None),
    ([("To", "x@y.test")], None, "no From header field"),
    ([("From", "a@x.test"), ("From", "b@y.test")], None, "2 From header fields"),
    ([("From", "a@x.test, b@y.test")], None, "several addresses in From"),
])
def test_author_domain(headers, domain, problem):
    author = author_domain(headers)
    assert (author.domain, author.problem) == (domain, problem)


def test_every_domain_of_several_from_addresses_is_listed_for_dmarc():
    assert author_domain([("From", "a@x.test, B <b@Y.test>, c@x.test")]).domains == \
        ("x.test", "y.test")
    assert author_domain([("From", "a@x.test"), ("From", "b@y.test")]).domains == \
        ("x.test", "y.test")
    assert author_domain([("From", "a@x.test")]).domains == ()
    assert author_domain([("From", "a@x.test"), ("From", "undisclosed")]).domains == ("x.test",)
    assert author_domain([("From", "nobody")]).problem == "From address without a domain: 'nobody'"
