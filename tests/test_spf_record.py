"""SPF record selection and parsing (RFC 7208 4.5, 4.6, 5, 6, 12)."""

from __future__ import annotations

import ipaddress

import pytest

from pymta.spf.record import SPFSyntaxError, is_spf_record, parse_domain_spec, parse_record


@pytest.mark.parametrize("text, is_spf", [
    ("v=spf1", True), ("v=spf1 -all", True), ("V=SpF1 ~all", True),
    ("v=spf10", False), ("v=spf1mx", False), ("spf1 -all", False), ("", False),
    ("v=spf2.0/pra -all", False),
])
def test_record_selection(text, is_spf):
    assert is_spf_record(text) is is_spf


def test_full_record():
    record = parse_record("v=spf1  +a mx/24//64 ~ptr:example.org ?ip4:192.0.2.0/24 "
                          "-ip6:2001:db8::/32 exists:%{ir}.bl.example.com include:_spf.example.net "
                          "redirect=_spf.example.com exp=why.%{d} x-unknown=%{l} -all ")
    names = [(m.qualifier, m.name) for m in record.mechanisms]
    assert names == [("+", "a"), ("+", "mx"), ("~", "ptr"), ("?", "ip4"), ("-", "ip6"),
                     ("+", "exists"), ("+", "include"), ("-", "all")]
    a, mx, ptr, ip4, ip6, exists, include, all_ = record.mechanisms
    assert (a.domain, a.ip4_prefix, a.ip6_prefix) == (None, 32, 128)
    assert (mx.ip4_prefix, mx.ip6_prefix) == (24, 64)
    assert str(ptr.domain) == "example.org"
    assert ip4.network == ipaddress.ip_network("192.0.2.0/24")
    assert ip6.network == ipaddress.ip_network("2001:db8::/32")
    assert str(exists.domain) == "%{ir}.bl.example.com"
    assert str(record.redirect) == "_spf.example.com" and str(record.explanation) == "why.%{d}"
    assert record.has_all and all_.result == "fail" and ptr.result == "softfail"
    assert ip4.text == "?ip4:192.0.2.0/24"


def test_host_bits_and_mapped_networks():
    record = parse_record("v=spf1 ip4:192.0.2.77/24 ip6:::ffff:1.2.3.4")
    assert record.mechanisms[0].network == ipaddress.ip_network("192.0.2.0/24")
    assert record.mechanisms[1].network.prefixlen == 128


@pytest.mark.parametrize("record, problem", [
    ("v=spf1 -all moo", "unknown mechanism"),
    ("v=spf1 all.", "'all' takes no argument"),
    ("v=spf1 -all:x", "'all' takes no argument"),
    ("v=spf1 include", "needs ':'"),
    ("v=spf1 include:", "empty domain-spec"),
    ("v=spf1 exists:example.com/24", "invalid domain-spec"),
    ("v=spf1 a:example.com:8080", "invalid domain-spec"),
    ("v=spf1 a:abc.123", "invalid domain-spec"),
    ("v=spf1 a:museum.", "invalid domain-spec"),
    ("v=spf1 a:example.-com", "invalid domain-spec"),
    ("v=spf1 a/33", "larger than 32"),
    ("v=spf1 a//129", "larger than 128"),
    ("v=spf1 a/24/64", "unexpected '/24'"),
    ("v=spf1 ip4:1.2.3.4/032", "invalid CIDR length"),
    ("v=spf1 ip4:1.2.3", "invalid IPv4 address"),
    ("v=spf1 ip4:01.2.3.4", "invalid IPv4 address"),
    ("v=spf1 ip4:1.2.3.4//32", "invalid CIDR length"),
    ("v=spf1 ip6::CAFE::BABE", "invalid IPv6 address"),
    ("v=spf1 ip6:fe80::1%eth0", "invalid IPv6 address"),
    ("v=spf1 ptr/0", "'ptr' takes only"),
    ("v=spf1 redirect:example.com", "unknown mechanism"),
    ("v=spf1 redirect=a.example.com redirect=b.example.com", "more than once"),
    ("v=spf1 exp=a.example.com exp=b.example.com", "more than once"),
    ("v=spf1 exp=", "empty domain-spec"),
    ("v=spf1 1up=foo", "invalid term"),
    ("v=spf1 =all", "invalid term"),
    ("v=spf1 foo=%abc", "modifier"),
    ("v=spf1 a:ctrl.example.com\rptr -all", "invalid character"),
    ("v=spf1 \u0080a -all", "non-ASCII"),
    ("v=spf1 +-all", "invalid term"),
])
def test_syntax_errors_are_permerrors(record, problem):
    with pytest.raises(SPFSyntaxError, match=problem):
        parse_record(record)


@pytest.mark.parametrize("spec", ["example.com", "example.com.", "%{d}", "%{d2}.x", "foo:bar/baz.example.com",
                                  "foo.example.xn--zckzah", "%{ir}.%{v}._spf.%{d2}", "x.%%"])
def test_valid_domain_specs(spec):
    assert str(parse_domain_spec(spec)) == spec


def test_unknown_modifiers_are_accepted_and_ignored():
    record = parse_record("v=spf1 moo.cow-far_out=man:dog/cat default=pass ip4:1.2.3.4 -all")
    assert [m.name for m in record.mechanisms] == ["ip4", "all"]
    assert record.redirect is None and record.explanation is None
