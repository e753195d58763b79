"""The spf and authres plugins: policy per result, skips, HELO identity, headers."""

from __future__ import annotations

import io

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from pymta.authresults import (AuthResult, authserv_id_of, format_authentication_results,
                               property_value)
from pymta.config.errors import OptionError
from pymta.config.options import PluginContext
from pymta.policy.authres import AuthenticationResults
from pymta.policy.spf import SPFCheck, SPFPolicy
from pymta.session import Session, Transaction
from pymta.spool.message import parse_headers
from pymta.verdict import DUNNO, Kind
from spfzone import ZoneResolver, fired

ZONE = {
    "pass.example": [("TXT", ["v=spf1 ip4:192.0.2.1 -all"])],
    "fail.example": [("TXT", ["v=spf1 -all exp=why.fail.example"])],
    "why.fail.example": [("TXT", ["%{i} may not send for %{d}"])],
    "ipfail.example": [("TXT", ["v=spf1 -ip4:192.0.2.1 ?all"])],
    "ipfail-all.example": [("TXT", ["v=spf1 -ip4:192.0.2.1 ip4:192.0.2.0/24 -all"])],
    "soft.example": [("TXT", ["v=spf1 ~all"])],
    "neutral.example": [("TXT", ["v=spf1 ?all"])],
    "perm.example": [("TXT", ["v=spf1 moo"])],
    "temp.example": ["TIMEOUT"],
    "helo-ok.example": [("TXT", ["v=spf1 ip4:192.0.2.1 -all"])],
    "helo-bad.example": [("TXT", ["v=spf1 -all"])],
}


def make(options=None, zone=ZONE, resolver=None, reactor=None):
    resolver = resolver or ZoneResolver(zone)
    context = PluginContext("mx.example.org", ("example.org",), "/", reactor or Clock(), resolver)
    return SPFPolicy(dict(options or {}), context), resolver


def session(helo="helo-ok.example", **kw) -> Session:
    return Session(client_ip="192.0.2.1", client_port=4000, helo=helo, **kw)


def mail(policy, s: Session, sender: str):
    """HELO then MAIL FROM as the server would call them; the verdict and the transaction."""
    helo = s.helo or "helo-ok.example"
    assert policy.check_helo(s, helo) is DUNNO
    s.helo = helo
    txn = Transaction(sender=sender)
    verdict = policy.check_sender(s, txn)
    if isinstance(verdict, defer.Deferred):
        verdict = fired(verdict)
    return verdict, txn


@pytest.mark.parametrize("sender, kind, code, enhanced", [
    ("a@pass.example", Kind.DUNNO, None, None),
    ("a@fail.example", Kind.REJECT, 550, "5.7.23"),       # -all: rejected by default
    ("a@ipfail.example", Kind.DUNNO, None, None),         # fail, but the domain publishes ?all
    ("a@ipfail-all.example", Kind.REJECT, 550, "5.7.23"), # fail under a policy with -all
    ("a@soft.example", Kind.DUNNO, None, None),
    ("a@neutral.example", Kind.DUNNO, None, None),
    ("a@nothing.example", Kind.DUNNO, None, None),        # none
    ("a@perm.example", Kind.DUNNO, None, None),
    ("a@temp.example", Kind.DEFER, 451, "4.7.24"),
])
def test_default_policy(sender, kind, code, enhanced):
    policy, _ = make()
    verdict, txn = mail(policy, session(), sender)
    assert (verdict.kind, verdict.code, verdict.enhanced) == (kind, code, enhanced)
    check = txn.notes["spf"]
    assert isinstance(check, SPFCheck) and check.identity == "mailfrom" and check.sender == sender
    assert check.action == {Kind.DUNNO: "accept", Kind.REJECT: "reject", Kind.DEFER: "defer"}[kind]


def test_reject_text_carries_the_explanation_on_a_second_line():
    policy, _ = make()
    verdict, _ = mail(policy, session(), "a@fail.example")
    assert verdict.text == ("SPF: <a@fail.example> is not allowed to send mail from 192.0.2.1\n"
                            "192.0.2.1 may not send for fail.example")


@pytest.mark.parametrize("options, sender, expected", [
    ({"on_fail": "reject"}, "a@ipfail.example", (550, "5.7.23")),
    ({"on_fail": "defer"}, "a@fail.example", (451, "4.7.23")),
    ({"on_fail": "accept"}, "a@fail.example", (None, None)),
    ({"on_softfail": "reject"}, "a@soft.example", (550, "5.7.23")),
    ({"on_neutral": "defer"}, "a@neutral.example", (451, "4.7.23")),
    ({"on_none": "reject"}, "a@nothing.example", (550, "5.7.23")),
    ({"on_permerror": "reject"}, "a@perm.example", (550, "5.7.24")),
    ({"on_temperror": "accept"}, "a@temp.example", (None, None)),
    ({"on_temperror": "reject"}, "a@temp.example", (550, "5.7.24")),
])
def test_configured_actions(options, sender, expected):
    policy, _ = make(options)
    verdict, _ = mail(policy, session(), sender)
    assert (verdict.code, verdict.enhanced) == expected


def test_texts_per_result():
    policy, _ = make({"on_neutral": "reject", "on_none": "reject", "on_permerror": "reject",
                      "on_softfail": "reject"})
    texts = {s: mail(policy, session(), s)[0].text for s in
             ("a@soft.example", "a@neutral.example", "a@nothing.example", "a@perm.example", "a@temp.example")}
    assert texts == {
        "a@soft.example": "SPF: <a@soft.example> is not allowed to send mail from 192.0.2.1 (softfail)",
        "a@neutral.example": "SPF: <a@neutral.example> is neither permitted nor denied to send mail from 192.0.2.1",
        "a@nothing.example": "SPF: nothing.example publishes no SPF record",
        "a@perm.example": "SPF: the SPF record of perm.example is invalid: invalid SPF record at "
                          "perm.example: unknown mechanism 'moo' in 'moo'",
        "a@temp.example": "SPF: temporary error while checking temp.example: DNS error looking up "
                          "the SPF record of temp.example: timeout; try again later",
    }


@pytest.mark.parametrize("kw", [{"trusted": True}, {"auth_user": "alice"}])
def test_trusted_and_authenticated_sessions_are_not_checked(kw):
    policy, resolver = make()
    verdict, txn = mail(policy, session(**kw), "a@fail.example")
    assert verdict is DUNNO and resolver.queries == [] and "spf" not in txn.notes
    assert policy.check_message(session(**kw), txn, None) is DUNNO


def test_helo_identity_checked_once_and_reported():
    policy, resolver = make()
    s = session()
    assert policy.check_helo(s, "helo-ok.example") is DUNNO
    assert resolver.queries == [("TXT", "helo-ok.example")]     # started at HELO
    s.helo = "helo-ok.example"
    txn = Transaction(sender="a@pass.example")
    fired(policy.check_sender(s, txn))
    assert resolver.queries.count(("TXT", "helo-ok.example")) == 1
    results = [r.format() for r in txn.notes["auth_results"]]
    assert results == ["spf=pass (sender IP is 192.0.2.1) smtp.mailfrom=a@pass.example",
                       "spf=pass (sender IP is 192.0.2.1) smtp.helo=helo-ok.example"]


def test_null_sender_uses_the_helo_result():
    policy, resolver = make()
    s = session(helo="helo-bad.example")
    verdict, txn = mail(policy, s, "")
    assert (verdict.code, verdict.text) == (550, "SPF: HELO helo-bad.example is not allowed to send "
                                                 "mail from 192.0.2.1")
    assert txn.notes["spf"].identity == "helo" and txn.notes["spf"].sender == "postmaster@helo-bad.example"
    assert resolver.queries == [("TXT", "helo-bad.example")]


def test_helo_modes():
    policy, resolver = make({"helo": "off"})
    assert mail(policy, session(helo="helo-bad.example"), "a@pass.example")[0] is DUNNO
    assert ("TXT", "helo-bad.example") not in resolver.queries
    policy, _ = make({"helo": "report"})
    assert mail(policy, session(helo="helo-bad.example"), "a@pass.example")[0] is DUNNO
    policy, _ = make({"helo": "enforce"})
    verdict, txn = mail(policy, session(helo="helo-bad.example"), "a@pass.example")
    assert verdict.code == 550 and verdict.text.startswith("SPF: HELO helo-bad.example")
    assert txn.notes["spf"].result.result == "pass" and txn.notes["spf"].action == "reject"


def test_slow_dns_is_a_temperror_after_the_timeout():
    class Silent(ZoneResolver):
        def _answer(self, name, rtype, convert):
            return defer.Deferred()            # never answers

    clock = Clock()
    policy, _ = make({"timeout": "5s", "helo": "off"}, resolver=Silent({}), reactor=clock)
    s = session()
    s.helo = "helo-ok.example"
    d = policy.check_sender(s, Transaction(sender="a@pass.example"))
    results = []
    d.addCallback(results.append)
    clock.advance(4.9)
    assert results == []
    clock.advance(0.2)
    assert (results[0].code, results[0].enhanced) == (451, "4.7.24")
    assert "no answer within 5 seconds" in results[0].text


def test_received_spf_header():
    policy, _ = make()
    s = session()
    _, txn = mail(policy, s, "a@fail.example")
    verdict = policy.check_message(s, txn, None)
    assert verdict.kind is Kind.DUNNO
    [(name, value)] = verdict.headers
    assert name == "Received-SPF"
    assert all(len(line) <= 78 for line in f"{name}: {value}".split("\r\n"))
    [(_, unfolded)] = parse_headers(io.BytesIO(f"{name}: {value}\r\n\r\n".encode()))
    assert unfolded == ("fail (mx.example.org: domain of a@fail.example does not designate 192.0.2.1 "
                        "as permitted sender) client-ip=192.0.2.1; envelope-from=\"a@fail.example\"; "
                        "helo=helo-ok.example; receiver=mx.example.org; identity=mailfrom; mechanism=-all")
    _, txn = mail(policy, s, "a@perm.example")
    [(_, value)] = policy.check_message(s, txn, None).headers
    value = value.replace("\r\n", "")
    assert value.startswith("permerror (mx.example.org: permanent error in processing domain of a@perm.example)")
    assert value.endswith("problem=\"invalid SPF record at perm.example: unknown mechanism 'moo' in 'moo'\"")
    policy, _ = make({"received_spf": False})
    _, txn = mail(policy, s, "a@pass.example")
    assert policy.check_message(s, txn, None) is DUNNO


def test_option_errors():
    with pytest.raises(OptionError, match="expected one of"):
        make({"on_fail": "bounce"})
    with pytest.raises(OptionError, match="expected one of"):
        make({"on_softfail": "reject_if_minus_all"})
    with pytest.raises(OptionError, match="unknown key"):
        make({"on_fial": "reject"})


# -- authres ----------------------------------------------------------------------

class View:
    def __init__(self, raw: bytes):
        self.raw = raw

    def headers(self):
        return parse_headers(io.BytesIO(self.raw))


def authres(options=None):
    return AuthenticationResults(dict(options or {}),
                                 PluginContext("mx.example.org", (), "/", None, None))


@pytest.mark.parametrize("value, expected", [
    ("mx.example.org; spf=pass", "mx.example.org"),
    ("  (comment (nested)) MX.Example.Org 1; none", "MX.Example.Org"),
    ('"quoted.example"; none', "quoted.example"),
    ("mx.example.org(c);spf=pass", "mx.example.org"),
    ("", None),
])
def test_authserv_id_of(value, expected):
    assert authserv_id_of(value) == expected


def test_authres_writes_ours_and_drops_forged_ones():
    plugin = authres()
    raw = (b"Authentication-Results: mx.example.org; spf=pass\r\n"
           b"Subject: x\r\n"
           b"authentication-results: other.example; dkim=pass\r\n"
           b"Authentication-Results: (x) MX.EXAMPLE.ORG;\r\n dmarc=pass\r\n"
           b"\r\nbody\r\n")
    s, txn = session(), Transaction(sender="a@b.example")
    txn.notes["auth_results"] = [AuthResult("spf", "pass", (("smtp.mailfrom", "a@b.example"),))]
    verdict = plugin.check_message(s, txn, View(raw))
    assert verdict.kind is Kind.DUNNO and verdict.drop_headers == (0, 3)
    assert verdict.headers == (("Authentication-Results", "mx.example.org; spf=pass smtp.mailfrom=a@b.example"),)
    verdict = authres({"remove_forged": False}).check_message(s, Transaction(sender=""), View(raw))
    assert verdict.drop_headers == () and verdict.headers[0][1] == "mx.example.org; none"


def test_authres_reports_smtp_auth_and_other_id():
    plugin = authres({"authserv_id": "auth.example.org"})
    s = session(auth_user="alice")
    verdict = plugin.check_message(s, Transaction(sender="a@b.example"),
                                   View(b"Authentication-Results: mx.example.org; x=y\r\n\r\n"))
    assert verdict.drop_headers == ()
    assert verdict.headers[0][1] == "auth.example.org; auth=pass smtp.auth=alice"
    with pytest.raises(OptionError, match="authserv_id"):
        authres({"authserv_id": "bad id"})


def test_result_formatting_and_folding():
    assert property_value("a@example.org") == "a@example.org"
    assert property_value("a b@example.org") == '"a b"@example.org'
    assert property_value("x;y") == '"x;y"'
    long = [AuthResult("spf", "pass", (("smtp.mailfrom", f"user{n}@example.org"),), "sender IP is 192.0.2.1")
            for n in range(3)]
    value = format_authentication_results("mx.example.org", long)
    lines = f"Authentication-Results: {value}".split("\r\n")
    assert len(lines) == 4 and all(len(line) <= 78 for line in lines)
    assert AuthResult("spf", "fail", comment="a (b) \\ c").format() == "spf=fail (a \\(b\\) \\\\ c)"


def test_a_check_cancelled_by_the_plugin_timeout_is_no_error_in_the_log():
    from twisted.logger import globalLogPublisher
    from pymta.config.model import PluginInstance
    from pymta.server.chain import PLUGIN_TIMEOUT, StageDeadline, run_chain

    class Silent(ZoneResolver):
        def _answer(self, name, rtype, convert):
            return defer.Deferred()            # never answers

    clock = Clock()
    policy, _ = make({"timeout": "20s"}, resolver=Silent({}), reactor=clock)
    plugins = (PluginInstance("spf", "spf", policy),)
    s = session()
    assert policy.check_helo(s, "helo-ok.example") is DUNNO
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        d = run_chain(plugins, "check_sender", s, Transaction(sender="a@pass.example"),
                      stage="mail", deadline=StageDeadline(clock, 2))
        clock.advance(2)
        assert fired(d) is PLUGIN_TIMEOUT
        clock.advance(30)                       # the checks' own timeouts pass too
    finally:
        globalLogPublisher.removeObserver(events.append)
    failures = [e for e in events if "log_failure" in e]
    assert failures == [], [e.get("log_format") for e in failures]
