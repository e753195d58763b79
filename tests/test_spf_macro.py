"""SPF macro strings (RFC 7208 7): the examples of section 7.4 and the syntax rules."""

from __future__ import annotations

import pytest

from pymta.spf import SPFChecker
from pymta.spf.macro import MacroSyntaxError, parse_macro_string
from spfzone import ZoneResolver, fired

VALUES = {"s": "strong-bad@email.example.com", "l": "strong-bad", "o": "email.example.com",
          "d": "email.example.com", "i": "192.0.2.3", "v": "in-addr", "h": "mx.example.org",
          "p": "mx.example.org", "c": "192.0.2.3", "r": "receiver.example", "t": "1234"}


@pytest.mark.parametrize("macro, expansion", [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
    ("%{p2}.trusted-domains.example.net", "example.org.trusted-domains.example.net"),
    ("%%%_%-", "% %20"),
    ("%{d999}", "email.example.com"),
    ("%{l+-}.x", "strong.bad.x"),
])
def test_rfc7208_section_7_4_examples(macro, expansion):
    assert parse_macro_string(macro).expand(VALUES) == expansion


def test_upper_case_letter_url_escapes():
    values = dict(VALUES, l="~jack&jill=up-a_b3.c/x")
    assert parse_macro_string("%{L}").expand(values) == "~jack%26jill%3Dup-a_b3.c%2Fx"
    assert parse_macro_string("%{l}").expand(values) == "~jack&jill=up-a_b3.c/x"


def test_explanation_letters_and_spaces():
    text = parse_macro_string("%{c} via %{r} at %{t}", explanation=True)
    assert text.expand(VALUES) == "192.0.2.3 via receiver.example at 1234"
    for letter in "crt":
        with pytest.raises(MacroSyntaxError, match="not allowed in a domain-spec"):
            parse_macro_string(f"%{{{letter}}}.example.com")
    with pytest.raises(MacroSyntaxError, match="invalid character ' '"):
        parse_macro_string("a b")


@pytest.mark.parametrize("bad", ["%", "%x", "%(ir)", "%{", "%{ir", "%{a}", "%{d0}", "%{d2x}",
                                 "%{}", "a\x00b", "caf\u00e9", "%{d2r!}"])
def test_syntax_errors(bad):
    with pytest.raises(MacroSyntaxError):
        parse_macro_string(bad)


def test_end_of_string_tracking():
    assert parse_macro_string("%{d}").ends_with_expand
    assert parse_macro_string("x.%%").ends_with_expand
    spec = parse_macro_string("%{d}.example.com")
    assert not spec.ends_with_expand and spec.tail == ".example.com"
    assert spec.letters == {"d"}


def _exp_of(ip: str, exp_text: str) -> str:
    zone = {"e.example.com": [("TXT", ["v=spf1 -all exp=msg.example.com"])],
            "msg.example.com": [("TXT", [exp_text])]}
    checker = SPFChecker(ZoneResolver(zone), receiver="mx.example.org", clock=lambda: 1234.9)
    return fired(checker.check_host(ip, "e.example.com", "a@e.example.com", "h.example")).explanation


def test_ipv6_i_and_c_macros():
    # RFC 7208 7.4: lower-case nibbles for the usual (lower-case) address text
    assert _exp_of("2001:db8::cb01", "%{ir}.%{v}._spf.%{d2} %{c}") == \
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com 2001:db8::cb01"
    assert _exp_of("::ffff:192.0.2.3", "%{i} %{v} %{c}") == "192.0.2.3 in-addr 192.0.2.3"
    assert _exp_of("192.0.2.3", "%{r} %{t} %{h} %{s} %{o}") == \
        "mx.example.org 1234 h.example a@e.example.com e.example.com"
