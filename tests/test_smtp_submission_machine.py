"""STARTTLS, AUTH and ETRN in the sans-I/O machine, byte for byte."""

from __future__ import annotations

from base64 import b64encode

import pytest

from smtp_driver import Driver
from pymta.smtp import events as E
from pymta.smtp.server import Features, ProtocolLimits
from pymta.verdict import Kind, Verdict

EHLO = b"EHLO c.test\r\n"
SUBMISSION = Features(starttls=True, auth_mechanisms=("PLAIN", "LOGIN"), require_tls=True,
                      require_auth=True)
IMPLICIT = Features(tls_active=True, auth_mechanisms=("PLAIN", "LOGIN"), require_auth=True)


def plain(user: str, password: str, authzid: str = "") -> str:
    return b64encode(f"{authzid}\0{user}\0{password}".encode()).decode()


def ehlo_lines(reply: bytes) -> list[str]:
    return [line[4:] for line in reply.decode().split("\r\n") if line]


def test_starttls_advertised_only_before_tls_and_auth_only_after():
    d = Driver(features=SUBMISSION)
    before = ehlo_lines(d.feed(EHLO))
    assert "STARTTLS" in before and not any(l.startswith("AUTH") for l in before)
    assert d.feed(b"STARTTLS\r\n") == b"220 2.0.0 Ready to start TLS\r\n"
    after = ehlo_lines(d.feed(EHLO))
    assert "STARTTLS" not in after and "AUTH PLAIN LOGIN" in after


def test_starttls_discards_pipelined_plaintext_and_resets_the_session():
    d = Driver(features=Features(starttls=True))
    d.feed(EHLO + b"MAIL FROM:<a@x.test>\r\n")
    out = d.feed(b"RSET\r\nSTARTTLS\r\nNOOP\r\nMAIL FROM:<evil@x.test>\r\n")
    assert out == b"250 2.0.0 Ok\r\n220 2.0.0 Ready to start TLS\r\n"
    assert [type(e) for e in d.events].count(E.MailFrom) == 1
    assert d.conn.helo is None and d.conn.tls_active
    # EHLO must come again: MAIL is a sequence error now
    assert d.feed(b"MAIL FROM:<a@x.test>\r\n").startswith(b"503 5.5.1")


@pytest.mark.parametrize("starttls", [b"STARTTLS\n", b"STARTTLS\r\n"])
@pytest.mark.parametrize("after", [b"NOOP\nMAIL FROM:<evil@x.test>\n", b"MAIL FROM:<evil@x.test>\r\n",
                                   b"\nMAIL FROM:<evil@x.test>\r\n", b"\rMAIL FROM:<evil@x.test>\n"])
def test_starttls_discards_what_follows_its_line_whatever_the_line_ends(starttls, after):
    # under "normalize" a bare LF ends a command line: STARTTLS ending in one
    # still discards everything after it, whatever ends those lines
    d = Driver(ProtocolLimits(bare_newlines="normalize"), features=Features(starttls=True))
    d.feed(EHLO)
    assert d.feed(starttls + after) == b"220 2.0.0 Ready to start TLS\r\n"
    assert d.of(E.MailFrom) == [] and d.conn.tls_active
    assert d.feed(b"MAIL FROM:<a@x.test>\n").startswith(b"503 5.5.1")


def test_starttls_refusals():
    d = Driver(features=Features(starttls=True))
    d.feed(EHLO)
    assert d.feed(b"STARTTLS now\r\n") == b"501 5.5.4 Syntax: STARTTLS\r\n"
    d.feed(b"MAIL FROM:<a@x.test>\r\n")
    assert d.feed(b"STARTTLS\r\n") == b"503 5.5.1 Error: not allowed during a mail transaction\r\n"
    d.feed(b"RSET\r\nSTARTTLS\r\n")
    d.feed(EHLO)
    assert d.feed(b"STARTTLS\r\n") == b"554 5.5.1 Error: TLS already active\r\n"
    no_cert = Driver()
    no_cert.feed(EHLO)
    assert no_cert.feed(b"STARTTLS\r\n") == b"502 5.5.1 Error: command not implemented\r\n"


def test_submission_requires_tls_and_auth_before_mail():
    d = Driver(features=SUBMISSION)
    d.feed(EHLO)
    assert d.feed(b"MAIL FROM:<a@x.test>\r\n") == b"530 5.7.0 Must issue a STARTTLS command first\r\n"
    assert d.feed(f"AUTH PLAIN {plain('a', 'b')}\r\n".encode()) == \
        b"538 5.7.11 Encryption required for requested authentication mechanism\r\n"
    assert d.feed(b"STARTTLS\r\n" + EHLO) == b"220 2.0.0 Ready to start TLS\r\n"  # EHLO discarded
    d.feed(EHLO)
    assert d.feed(b"MAIL FROM:<a@x.test>\r\n") == b"530 5.7.0 Authentication required\r\n"
    assert d.feed(f"AUTH PLAIN {plain('alice', 'pw')}\r\n".encode()) == b"235 2.7.0 Authentication successful\r\n"
    assert d.of(E.Authenticate) == [E.Authenticate("PLAIN", "alice", "pw", "")]
    assert d.conn.auth_user == "alice"
    assert d.feed(b"MAIL FROM:<a@x.test> AUTH=alice+40x.test\r\n") == b"250 2.1.0 Ok\r\n"
    assert d.of(E.MailFrom)[-1].params == {"AUTH": "alice@x.test"}


def test_plain_exchanges_and_errors():
    d = Driver(features=IMPLICIT, policy={E.Authenticate: lambda ev: None if ev.password == "pw"
                                          else Verdict.reject("Authentication credentials invalid", 535, "5.7.8")})
    d.feed(EHLO)
    assert d.feed(b"AUTH PLAIN\r\n") == b"334 \r\n"
    assert d.feed(plain("alice", "bad").encode() + b"\r\n") == b"535 5.7.8 Authentication credentials invalid\r\n"
    assert d.feed(b"AUTH PLAIN\r\n*\r\n") == b"334 \r\n501 5.0.0 Authentication aborted\r\n"
    assert d.feed(b"AUTH PLAIN !!!\r\n") == b"501 5.5.2 Cannot decode the authentication response\r\n"
    assert d.feed(b"AUTH PLAIN " + b64encode(b"no-nuls") + b"\r\n") == \
        b"501 5.5.2 Invalid PLAIN response (RFC 4616)\r\n"
    assert d.feed(b"AUTH GSSAPI\r\n") == b"504 5.5.4 Unrecognized authentication type\r\n"
    assert d.feed(b"AUTH PLAIN =\r\n") == b"501 5.5.2 Invalid PLAIN response (RFC 4616)\r\n"
    assert d.feed(f"AUTH PLAIN {plain('alice', 'pw', 'admin')}\r\n".encode()) == \
        b"235 2.7.0 Authentication successful\r\n"
    assert d.of(E.Authenticate)[-1].authzid == "admin"   # the caller decides on authzid
    assert d.feed(b"AUTH LOGIN\r\n") == b"503 5.5.1 Error: already authenticated\r\n"


def test_login_exchange_and_long_response_line():
    d = Driver(features=IMPLICIT)
    d.feed(EHLO)
    assert d.feed(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
    assert d.feed(b64encode(b"bob") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert d.feed(b64encode(b"x" * 5000) + b"\r\n") == b"235 2.7.0 Authentication successful\r\n"
    assert d.of(E.Authenticate) == [E.Authenticate("LOGIN", "bob", "x" * 5000, "")]
    e = Driver(features=IMPLICIT)
    e.feed(EHLO)
    assert e.feed(b"AUTH LOGIN " + b64encode(b"carol") + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
    assert e.feed(b"A" * 20000 + b"\r\nNOOP\r\n") == b"500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n"


def test_auth_defer_and_disconnect():
    d = Driver(features=IMPLICIT, policy={E.Authenticate: [Verdict(Kind.DEFER),
                                                           Verdict.disconnect("bye")]})
    d.feed(EHLO)
    assert d.feed(f"AUTH PLAIN {plain('a', 'b')}\r\n".encode()) == b"454 4.7.0 Temporary authentication failure\r\n"
    assert d.feed(f"AUTH PLAIN {plain('a', 'b')}\r\n".encode()) == b"421 4.7.0 bye\r\n"
    assert d.closed


def test_auth_not_offered_without_mechanisms_or_before_ehlo():
    d = Driver()
    assert d.feed(b"AUTH PLAIN x\r\n") == b"503 5.5.1 Error: send HELO/EHLO first\r\n"
    d.feed(EHLO)
    assert d.feed(b"AUTH PLAIN x\r\n") == b"502 5.5.1 Error: command not implemented\r\n"


def test_etrn():
    d = Driver(features=Features(etrn=True), policy={
        E.Etrn: lambda ev: Verdict.accept(f"Queuing started for {ev.node}")})
    assert "ETRN" in ehlo_lines(d.feed(EHLO))
    assert d.feed(b"ETRN example.org\r\n") == b"250 2.0.0 Queuing started for example.org\r\n"
    assert d.feed(b"ETRN @Example.ORG\r\n") == b"250 2.0.0 Queuing started for @example.org\r\n"
    assert d.feed(b"ETRN #queue\r\n") == b"458 4.5.0 Error: named queues are not supported\r\n"
    assert d.feed(b"ETRN not_a_domain!\r\n") == b"501 5.5.4 Syntax: ETRN domain\r\n"
    refused = Driver(features=Features(etrn=True), policy={
        E.Etrn: Verdict(Kind.DEFER, 459, "4.7.1", "Error: ETRN not allowed from this client")})
    refused.feed(EHLO)
    assert refused.feed(b"ETRN example.org\r\n") == b"459 4.7.1 Error: ETRN not allowed from this client\r\n"
    plain_server = Driver()
    plain_server.feed(EHLO)
    assert plain_server.feed(b"ETRN example.org\r\n") == b"502 5.5.1 Error: command not implemented\r\n"
