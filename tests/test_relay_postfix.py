"""pymta relays to a real Postfix (a private instance on a loopback port), found by MX lookup
in a loopback DNS server: in plaintext, with opportunistic STARTTLS and with a verified
certificate.  One Postfix, one DNS server and one pymta serve the whole module."""

from __future__ import annotations

import re
import smtplib
import time

import pytest

from certs import make_cert
from conftest import PymtaServer, free_port, relay_toml, wait_for_log
from dnsserver import LoopbackDNS
from postfix import PostfixInstance, require_postfix

DOMAINS = ("plain.postfix.test", "may.postfix.test", "tls.postfix.test")
ZONE = {domain: [("MX", (10, "mx.postfix.test"))] for domain in DOMAINS}
ZONE["mx.postfix.test"] = [("A", "127.0.0.1")]
REFUSED = "nobody-here@plain.postfix.test"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    require_postfix()
    work = tmp_path_factory.mktemp("relay-postfix")
    cert = make_cert(work, "postfix", "mx.postfix.test")
    postfix = PostfixInstance(free_port(), DOMAINS, cert=cert, refuse=(REFUSED,))
    dns = LoopbackDNS(ZONE).start()
    pymta = None
    try:
        postfix.start()
        (work / "pymta").mkdir()
        pymta = PymtaServer(work / "pymta", domains=("local.test",), extra_toml=relay_toml(dns.nameserver, f"""
            [backends.plain]
            use = "relay"
            port = {postfix.port}
            tls = "none"

            [backends.opportunistic]
            use = "relay"
            port = {postfix.port}

            [backends.verified]
            use = "relay"
            port = {postfix.port}
            tls = "verify"
            ca_file = "{cert[0]}"
            """, ("may.postfix.test", "opportunistic"), ("tls.postfix.test", "verified"), ("*", "plain"),
            dns='timeout = "2s"\n')).start()
        yield pymta, postfix
    finally:
        if pymta is not None:
            pymta.stop()
        dns.stop()
        postfix.stop()


def send(pymta: PymtaServer, recipients: list[str], body: bytes, **kw) -> None:
    with smtplib.SMTP("127.0.0.1", pymta.port, timeout=10) as client:
        client.sendmail("alice@local.test", recipients, body, **kw)


HEADERS = (b"From: alice@local.test\r\nTo: someone@postfix.test\r\n"
           b"Date: Sun, 22 Nov 2026 03:00:00 +0000\r\nMessage-ID: <relay-test@local.test>\r\n")
BODY = (HEADERS + b"Subject: relay test\r\n\r\n"
        b"first line\r\n.\r\n..two dots\r\n.leading dot\r\n" + b"x" * 900 + b"\r\nlast line\r\n")


def our_part(delivered: bytes) -> bytes:
    """What pymta sent: from pymta's Received: field on (Postfix puts its own fields first)."""
    return delivered[delivered.index(b"Received: from [127.0.0.1]"):]


def postfix_received(delivered: bytes) -> str:
    header = delivered.split(b"\r\n\r\n" if b"\r\n\r\n" in delivered else b"\n\n", 1)[0]
    fields = re.split(rb"\r?\n(?=\S)", header)
    return next(f.decode() for f in fields if f.startswith(b"Received:") and b"mx.postfix.test" in f)


def test_plaintext_relay_arrives_byte_for_byte(setup):
    pymta, postfix = setup
    send(pymta, ["bob@plain.postfix.test"], BODY)
    [delivered] = postfix.delivered("bob@plain.postfix.test")
    assert our_part(delivered.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")).endswith(BODY)
    received = postfix_received(delivered)
    assert "with ESMTP id" in received and "using TLS" not in received
    wait_for_log(pymta, r"to=<bob@plain\.postfix\.test>, relay=plain\[mx\.postfix\.test\[127\.0\.0\.1\]"
                        r":\d+\], delay=\S+, status=sent \(250 2\.0\.0 Ok: .*queued as \w+\)")


def test_opportunistic_starttls_with_postfix(setup):
    pymta, postfix = setup
    send(pymta, ["carol@may.postfix.test"], BODY)
    [delivered] = postfix.delivered("carol@may.postfix.test")
    received = postfix_received(delivered)
    assert "with ESMTPS id" in received and "using TLS" in received


def test_verified_starttls_with_postfix(setup):
    pymta, postfix = setup
    send(pymta, ["dave@tls.postfix.test"], BODY)
    [delivered] = postfix.delivered("dave@tls.postfix.test")
    assert "using TLS" in postfix_received(delivered)
    assert re.search(r"Trusted TLS connection established from localhost\[127\.0\.0\.1\]|"
                     r"TLS connection established from \S+\[127\.0\.0\.1\]", postfix.log_text())
    wait_for_log(pymta, r"mx\.postfix\.test\[127\.0\.0\.1\]:\d+: TLS connection established: TLSv1\.[23]")


def test_eight_bit_content_passes_unchanged(setup):
    pymta, postfix = setup
    body = HEADERS + "Subject: Grüße\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n" \
           "Content-Transfer-Encoding: 8bit\r\n\r\nFür Jörg: ½ € ✓\r\n".encode()
    send(pymta, ["erin@plain.postfix.test"], body, mail_options=["BODY=8BITMIME"])
    [delivered] = postfix.delivered("erin@plain.postfix.test")
    assert delivered.replace(b"\r\n", b"\n").endswith(body.replace(b"\r\n", b"\n"))


def test_a_refused_recipient_fails_and_the_others_are_delivered(setup):
    pymta, postfix = setup
    send(pymta, [REFUSED, "frank@plain.postfix.test"], BODY)
    assert postfix.delivered("frank@plain.postfix.test")
    line = wait_for_log(pymta, rf"to=<{re.escape(REFUSED)}>.*status=bounced \(.*\)")
    assert "554 5.7.1 host mx.postfix.test[127.0.0.1]" in line
    assert "Recipient address rejected: no such user here (in reply to RCPT TO command)" in line
    # the sender gets one RFC 3464 bounce, naming the remote MTA and its reply
    [bounce] = pymta.delivered("alice@local.test", timeout=15)
    assert bounce.startswith(b"Return-Path: <>\r\n") and b"report-type=delivery-status" in bounce
    assert f"Final-Recipient: rfc822; {REFUSED}".encode() in bounce
    assert b"Action: failed\r\nStatus: 5.7.1\r\nRemote-MTA: dns; mx.postfix.test" in bounce
    assert b"Diagnostic-Code: smtp; 554 5.7.1 <" + REFUSED.encode() in bounce
    assert b"frank@plain.postfix.test" not in bounce.split(b"Content-Description: Undelivered")[0]


def test_several_messages_reuse_connections(setup):
    pymta, postfix = setup
    before = postfix.log_text().count("connect from")
    with smtplib.SMTP("127.0.0.1", pymta.port, timeout=10) as client:
        for n in range(6):
            client.sendmail("alice@local.test", ["gina@plain.postfix.test"],
                            BODY.replace(b"relay test", f"reuse {n}".encode()))
    assert len(postfix.delivered("gina@plain.postfix.test", count=6)) == 6
    time.sleep(0.5)
    connects = postfix.log_text().count("connect from") - before
    assert connects <= 3          # 0 when the previous test's connection was still idle
