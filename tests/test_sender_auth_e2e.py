"""Sender authentication end to end: a real twistd pymta against a loopback DNS server.

SPF (forged sender refused, legitimate one delivered with Received-SPF and
Authentication-Results, DNS timeout deferred), forged Authentication-Results
removed, DNSBL refusal at connect, and rate limits.  The client connects
from 127.0.0.1, which is not trusted here (``trusted_networks = []``).
"""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from conftest import TWISTD
from dnsserver import zone_fixture
from smtpwire import Wire

ZONE = {
    "legit.test": [("TXT", "v=spf1 ip4:127.0.0.1 -all")],
    "forged.test": [("TXT", "v=spf1 ip4:192.0.2.1 -all")],
    "soft.test": [("TXT", "v=spf1 ip4:192.0.2.1 ~all")],
    "explained.test": [("TXT", "v=spf1 ip4:192.0.2.1 -all exp=why.explained.test")],
    "why.explained.test": [("TXT", "%{i} is not a mail server of %{d}")],
    "slow.test": [("TIMEOUT", None)],
    "client.test": [("TXT", "v=spf1 ip4:127.0.0.1 -all")],
    # DNSBL: 127.0.0.1 is listed in bl.test, with a text; not in clean.test
    "1.0.0.127.bl.test": [("A", "127.0.0.2", 300), ("TXT", "Listed: see https://bl.test/q?127.0.0.1")],
    "1.0.0.127.stuck.test": [("TIMEOUT", None)],
}


dns = zone_fixture(ZONE)


def dns_toml(dns, extra: str = "") -> str:
    return f"""
[dns]
nameservers = ["{dns.nameserver}"]
timeout = "1s"
attempts = 1

[backends.local]
use = "maildir"
base = "mail"
""" + extra


SPF_STAGES = """
[stages]
helo = ["spf"]
mail = ["spf"]
data = ["spf", "authres"]
"""


@pytest.fixture(scope="module")
def spf_server(dns, tmp_path_factory):
    from conftest import PymtaServer
    server = PymtaServer(tmp_path_factory.mktemp("spf"), dns_toml(dns, SPF_STAGES),
                         server_toml="trusted_networks = []")
    server.start()
    yield server
    server.stop()


def send(port: int, sender: str, body: bytes = b"Subject: t\r\n\r\nhello\r\n",
         helo: str = "client.test") -> list[tuple[int, str]]:
    w = Wire(port)
    replies = [w.cmd(f"EHLO {helo}")]
    replies.append(w.cmd(f"MAIL FROM:<{sender}>"))
    if replies[-1][0] == 250:
        replies.append(w.cmd("RCPT TO:<alice@example.test>"))
        replies.append(w.cmd("DATA"))
        replies.append(w.cmd(body + b"."))
    w.cmd("QUIT")
    w.close()
    return replies


def test_forged_sender_rejected_with_spf_code(spf_server):
    replies = send(spf_server.port, "boss@forged.test")
    assert replies[1] == (550, "5.7.23 SPF: <boss@forged.test> is not allowed to send mail from 127.0.0.1")
    assert "result=fail mechanism=-all action=reject" in spf_server.log_text()


def test_explanation_is_a_second_reply_line(spf_server):
    w = Wire(spf_server.port)
    w.cmd("EHLO client.test")
    w.send(b"MAIL FROM:<x@explained.test>\r\n")
    code, lines = w.reply()
    assert code == 550
    assert lines == ["5.7.23 SPF: <x@explained.test> is not allowed to send mail from 127.0.0.1",
                     "5.7.23 127.0.0.1 is not a mail server of explained.test"]


def test_legitimate_sender_delivered_with_headers(spf_server):
    body = (b"Authentication-Results: mx.example.test; spf=pass smtp.mailfrom=boss@forged.test\r\n"
            b"Authentication-Results: elsewhere.example; dkim=pass header.d=legit.test\r\n"
            b"Authentication-Results: (sneaky) MX.Example.Test;\r\n\tdmarc=pass\r\n"
            b"Subject: legit\r\n\r\nhello\r\n")
    before = len(spf_server.delivered("alice@example.test", 0, timeout=0))
    replies = send(spf_server.port, "ceo@legit.test", body)
    assert replies[1] == (250, "2.1.0 Ok")
    assert replies[-1][0] == 250
    messages = spf_server.delivered("alice@example.test", before + 1)
    msg = next(m for m in messages if b"Subject: legit" in m)
    head = msg.partition(b"\r\n\r\n")[0].decode()
    unfolded = head.replace("\r\n ", " ").replace("\r\n\t", "\t")
    fields = unfolded.split("\r\n")
    spf = [f for f in fields if f.startswith("Received-SPF: ")]
    assert spf == ["Received-SPF: pass (mx.example.test: domain of ceo@legit.test designates "
                   "127.0.0.1 as permitted sender) client-ip=127.0.0.1; "
                   'envelope-from="ceo@legit.test"; helo=client.test; receiver=mx.example.test; '
                   'identity=mailfrom; mechanism="ip4:127.0.0.1"']
    ar = [f for f in fields if f.lower().startswith("authentication-results:")]
    assert ar == [
        "Authentication-Results: mx.example.test; spf=pass (sender IP is 127.0.0.1) "
        "smtp.mailfrom=ceo@legit.test; spf=pass (sender IP is 127.0.0.1) smtp.helo=client.test",
        "Authentication-Results: elsewhere.example; dkim=pass header.d=legit.test",
    ]
    # our fields come right after Received:, the body is otherwise as sent
    assert msg.endswith(b"Authentication-Results: elsewhere.example; dkim=pass header.d=legit.test\r\n"
                        b"Subject: legit\r\n\r\nhello\r\n")


def test_softfail_accepted_and_marked(spf_server):
    before = len(spf_server.delivered("alice@example.test", 0, timeout=0))
    replies = send(spf_server.port, "a@soft.test", b"Subject: soft\r\n\r\nx\r\n")
    assert replies[1] == (250, "2.1.0 Ok") and replies[-1][0] == 250
    msg = next(m for m in spf_server.delivered("alice@example.test", before + 1) if b"Subject: soft" in m)
    msg = msg.replace(b"\r\n ", b" ")
    assert b"Received-SPF: softfail (mx.example.test: domain of transitioning a@soft.test" in msg
    assert b"spf=softfail (sender IP is 127.0.0.1) smtp.mailfrom=a@soft.test" in msg


def test_null_sender_checks_the_helo_identity(spf_server):
    assert send(spf_server.port, "", helo="client.test")[1] == (250, "2.1.0 Ok")


def test_dns_timeout_defers_not_rejects(spf_server):
    started = time.monotonic()
    replies = send(spf_server.port, "who@slow.test")
    code, text = replies[1]
    assert (code, text.split(" ")[0]) == (451, "4.7.24")
    assert text.startswith("4.7.24 SPF: temporary error while checking slow.test: "
                           "DNS error looking up the SPF record of slow.test: timeout")
    assert time.monotonic() - started < 10


# -- DNSBL ----------------------------------------------------------------------

def start_any_banner(server, timeout: float = 20.0):
    """Start a PymtaServer whose banner may be a refusal (its start() waits for 220)."""
    logf = open(server.log, "ab")
    server.proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "pymta", "--config", str(server.config)],
                                   cwd=server.dir, stdout=logf, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"pymta exited:\n{server.log_text()}")
        try:
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"pymta did not start:\n{server.log_text()}")


def test_dnsbl_listed_client_refused_at_connect(dns, make_server):
    srv = make_server(dns_toml(dns, """
[stages]
connect = ["dnsbl"]

[plugins.dnsbl]
zones = ["clean.test", "bl.test"]
"""), start=False, server_toml="trusted_networks = []")
    start_any_banner(srv)
    for _ in range(2):           # the second answer comes from the cache
        w = Wire(srv.port)
        assert w.banner == (554, ["5.7.1 Service unavailable; client host [127.0.0.1] blocked using "
                                  "bl.test; Listed: see https://bl.test/q?127.0.0.1"])
        assert w.closed_by_server()
    queries = [q for q in dns.queries() if q[0] == "1.0.0.127.bl.test"]
    assert queries.count(("1.0.0.127.bl.test", "A")) == 1
    assert "dnsbl: 127.0.0.1 is listed in bl.test (127.0.0.2)" in srv.log_text()


def test_dnsbl_timeout_lets_the_client_in(dns, make_server):
    srv = make_server(dns_toml(dns, """
[stages]
connect = ["dnsbl"]

[plugins.dnsbl]
zones = ["stuck.test"]
"""), server_toml="trusted_networks = []")
    w = Wire(srv.port)
    assert w.banner[0] == 220
    w.cmd("QUIT")
    assert "dnsbl: lookup of 1.0.0.127.stuck.test failed (timeout); not refusing the client" \
        in srv.log_text()


# -- rate limits ------------------------------------------------------------------

def test_rate_limits(dns, make_server):
    srv = make_server(dns_toml(dns, """
[stages]
connect = ["ratelimit"]
mail = ["ratelimit"]
rcpt = ["ratelimit", "localdomain"]

[plugins.ratelimit]
window = "1h"
connections_per_ip = 3
messages_per_ip = 2
recipients_per_ip = 3
"""), server_toml="trusted_networks = []")
    # make_server's start-up probe was connection 1
    w = Wire(srv.port)                                              # connection 2
    assert w.banner[0] == 220
    w.cmd("EHLO client.test")
    assert w.cmd("MAIL FROM:<a@legit.test>") == (250, "2.1.0 Ok")   # message 1
    for rcpt in ("a", "b", "c"):
        assert w.cmd(f"RCPT TO:<{rcpt}@example.test>")[0] == 250
    assert w.cmd("RCPT TO:<d@example.test>") == (
        451, "4.5.3 Too many recipients from [127.0.0.1] (at most 3 per 1h); try again later")
    assert w.cmd("RSET")[0] == 250
    assert w.cmd("MAIL FROM:<a@legit.test>") == (250, "2.1.0 Ok")   # message 2
    assert w.cmd("RSET")[0] == 250
    assert w.cmd("MAIL FROM:<a@legit.test>") == (
        451, "4.7.1 Too many messages from [127.0.0.1] (at most 2 per 1h); try again later")
    w.cmd("QUIT")
    assert Wire(srv.port).banner[0] == 220                          # connection 3
    refused = Wire(srv.port)                                        # connection 4
    assert refused.banner == (421, ["4.7.0 Too many connections from [127.0.0.1] "
                                    "(at most 3 per 1h); try again later"])
    assert refused.closed_by_server()
