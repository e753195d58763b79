"""PROXY protocol listeners behind a real HAProxy (send-proxy and send-proxy-v2).

HAProxy connects to pymta from 127.0.0.1, which is pymta's only trusted
network and its only proxy network.  The test clients connect to HAProxy
from other loopback addresses (127.0.0.2, 127.0.0.3): pymta must treat them
as those clients (relay control, DNSBL, limits, log lines, Received), not
as the trusted proxy.
"""

from __future__ import annotations

import re
import smtplib
import socket
import ssl
import time

import pytest
from argon2 import PasswordHasher

from certs import make_cert
from conftest import BACKEND_TOML, free_port, routes_toml
from dnsserver import LoopbackDNS
from haproxykit import PrivateHAProxy
from smtpwire import Wire
from pymta.smtp.proxy import v1_header, v2_header

HASHER = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
BODY = b"Subject: proxied\r\n\r\nhi\r\n"
CLIENT, LISTED = "127.0.0.2", "127.0.0.3"    # a client, and one in the block list


def _address_usable(address: str) -> bool:
    try:
        with socket.socket() as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def wait_for(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def connect_from(source: str, port: int) -> socket.socket:
    s = socket.socket()
    s.settimeout(10)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return data
        data += chunk


@pytest.fixture
def stack(make_server, tmp_path):
    """DNS (127.0.0.3 listed in bl.test) + pymta with proxied listeners + HAProxy in front."""
    for address in (CLIENT, LISTED):
        assert _address_usable(address), f"this test needs {address} on the loopback interface"
    with LoopbackDNS({"3.0.0.127.bl.test": [("A", "127.0.0.2")]}) as dns:
        srv = make_server("", start=False, server_toml='trusted_networks = ["127.0.0.1/32"]')
        cert, key = make_cert(srv.dir, "server")
        passwd = srv.dir / "passwd"
        passwd.write_text(f"bob@example.test:{HASHER.hash('battery staple')}\n")
        passwd.chmod(0o600)
        srv.proxied_port, srv.smtps_port = free_port(), free_port()
        srv.config.write_text(srv.config.read_text() + f"""
[[listeners]]
name = "proxied"
endpoint = "tcp:{srv.proxied_port}:interface=127.0.0.1"
role = "mx"
proxy_protocol = true
proxy_networks = ["127.0.0.1/32"]
proxy_timeout = "1s"

[[listeners]]
name = "smtps"
endpoint = "tcp:{srv.smtps_port}:interface=127.0.0.1"
role = "submissions"
proxy_protocol = true
proxy_networks = ["127.0.0.1/32"]

[tls]
certificate = "{cert}"
key = "{key}"

[limits]
pregreet_wait = "0.2s"

[dns]
nameservers = ["127.0.0.1:{dns.port}"]
timeout = "1s"
attempts = 1

[stages]
auth = ["passwords"]
connect = ["dnsbl"]
rcpt = ["localdomain"]

[plugins.passwords]
use = "passwdfile"
file = "passwd"

[plugins.dnsbl]
zones = ["bl.test"]
""" + BACKEND_TOML + routes_toml(("*", "local")))
        srv.start()
        haproxy = PrivateHAProxy(tmp_path / "haproxy", {
            "v1": f"127.0.0.1:{srv.proxied_port} send-proxy",
            "v2": f"127.0.0.1:{srv.proxied_port} send-proxy-v2",
            "smtps": f"127.0.0.1:{srv.smtps_port} send-proxy-v2",
        })
        with haproxy:
            srv.haproxy, srv.dns = haproxy, dns
            yield srv


def log_has(srv, pattern: str, timeout: float = 10.0) -> bool:
    return wait_for(lambda: re.search(pattern, srv.log_text()) is not None, timeout)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_original_client_is_the_session_address(stack, version):
    srv, port = stack, stack.haproxy.ports[version]
    # the proxy is trusted (it may relay); a client behind it is not
    with smtplib.SMTP("127.0.0.1", port, source_address=(CLIENT, 0)) as s:
        s.ehlo("client.example")
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt("x@elsewhere.example") == (554, b"5.7.1 Relay access denied")
        assert s.rcpt(f"{version}@example.test")[0] == 250
        assert s.data(BODY)[0] == 250
    [msg] = srv.delivered(f"{version}@example.test")
    received = msg.split(b"\r\n\r\n")[0]
    assert b"(unknown [127.0.0.2])" in received and b"[127.0.0.1]" not in received
    # the client the proxy itself is may relay
    with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.1", 0)) as s:
        s.sendmail("a@example.org", [f"{version}@elsewhere.example"], BODY)
    assert len(srv.delivered(f"{version}@elsewhere.example")) == 1
    assert log_has(srv, r"connect from unknown\[127\.0\.0\.2\]:\d+")
    assert log_has(srv, r"client=unknown\[127\.0\.0\.2\]")
    assert log_has(srv, r"NOQUEUE: reject: RCPT from unknown\[127\.0\.0\.2\]:\d+: 554 5\.7\.1 Relay access denied")
    # and the name lookup was for the client, not for the proxy
    assert ("2.0.0.127.in-addr.arpa", "PTR") in srv.dns.queries()


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_dnsbl_checks_the_original_client(stack, version):
    srv, port = stack, stack.haproxy.ports[version]
    s = connect_from(LISTED, port)
    with s:
        answer = read_all(s)
    assert answer.startswith(b"554 5.7.1 Service unavailable; client host [127.0.0.3] blocked using bl.test")
    assert ("3.0.0.127.bl.test", "A") in srv.dns.queries()
    assert log_has(srv, r"dnsbl: 127\.0\.0\.3 is listed in bl\.test")
    assert log_has(srv, r"NOQUEUE: reject: CONNECT from unknown\[127\.0\.0\.3\]")


def test_implicit_tls_listener_reads_the_header_before_the_handshake(stack):
    srv, port = stack, stack.haproxy.ports["smtps"]
    tls = ssl.create_default_context()
    tls.check_hostname, tls.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP_SSL("127.0.0.1", port, context=tls, source_address=(CLIENT, 0)) as s:
        s.ehlo("laptop.example")
        s.login("bob@example.test", "battery staple")
        s.sendmail("bob@example.test", ["carol@far.example"], BODY)
    [msg] = srv.delivered("carol@far.example")
    assert b"(unknown [127.0.0.2])" in msg and b"with ESMTPSA" in msg
    assert log_has(srv, r"TLS established with unknown\[127\.0\.0\.2\]")
    assert log_has(srv, r"unknown\[127\.0\.0\.2\]:\d+: sasl_method=PLAIN, sasl_username=bob@example\.test")


def test_no_header_closes_without_a_banner(stack):
    srv = stack
    # from the proxy's address, but nothing sent: closed after proxy_timeout
    with connect_from("127.0.0.1", srv.proxied_port) as s:
        local_port = s.getsockname()[1]
        assert read_all(s) == b""
    assert log_has(srv, rf"proxy protocol: no header from \[127\.0\.0\.1\]:{local_port} on listener "
                        r"proxied within 1s")
    # plain SMTP without a header: not a header, closed at once
    with connect_from("127.0.0.1", srv.proxied_port) as s:
        local_port = s.getsockname()[1]
        s.sendall(b"EHLO client.example\r\n")
        assert read_all(s) == b""
    assert log_has(srv, rf"proxy protocol: bad header from \[127\.0\.0\.1\]:{local_port} on listener "
                        r"proxied: not a PROXY protocol header")
    # a header that is too long without its CRLF
    with connect_from("127.0.0.1", srv.proxied_port) as s:
        s.sendall(b"PROXY TCP4 " + b"1" * 120 + b"\r\n")
        assert read_all(s) == b""
    assert log_has(srv, r"bad header from .* v1 header without CRLF in its first 107 bytes")
    # none of these became a session
    assert f"connect from unknown[127.0.0.1]:{local_port}" not in srv.log_text()


def test_peer_outside_proxy_networks_closed_without_banner(stack):
    srv = stack
    for header in (v1_header(("127.0.0.1", 1234)), v2_header(("127.0.0.1", 1234))):
        with connect_from(CLIENT, srv.proxied_port) as s:
            local_port = s.getsockname()[1]
            try:
                s.sendall(header + b"EHLO client.example\r\n")
            except OSError:
                pass                # already closed: fine
            try:
                assert read_all(s) == b""
            except ConnectionResetError:
                pass
        assert log_has(srv, rf"proxy protocol: refusing \[127\.0\.0\.2\]:{local_port} on listener "
                            r"proxied: not in proxy_networks")
    # the forged header named a trusted address: no session ever started for it
    assert "connect from unknown[127.0.0.1]:1234" not in srv.log_text()


def test_local_command_and_unknown_use_the_proxys_own_address(stack):
    srv = stack
    for header in (v2_header(None), v1_header(None)):
        w = Wire(srv.proxied_port, read_banner=False)
        w.send(header)
        assert w.reply()[0] == 220
        assert w.cmd("EHLO health.check")[0] == 250
        assert w.cmd("MAIL FROM:<a@example.org>")[0] == 250
        # the proxy's own address is trusted: it may relay
        assert w.cmd("RCPT TO:<x@elsewhere.example>")[0] == 250
        w.cmd("QUIT")
        w.close()


def test_bytes_after_the_header_before_the_banner_are_a_pregreet(stack):
    srv = stack
    w = Wire(srv.proxied_port, read_banner=False)
    w.send(v2_header((CLIENT, 40000)) + b"EHLO early.example\r\n")
    code, lines = w.reply()
    assert (code, lines[0]) == (554, "5.5.1 Error: SMTP protocol synchronization (talked before greeting)")
    assert w.closed_by_server()
    assert log_has(srv, r"pregreet from unknown\[127\.0\.0\.2\]:40000")


def test_haproxy_endpoint_is_refused_at_start(make_server):
    srv = make_server("", start=False)
    srv.config.write_text(srv.config.read_text() + f"""
[[listeners]]
name = "lb"
endpoint = "haproxy:tcp:{free_port()}:interface=127.0.0.1"
""")
    import subprocess
    from conftest import TWISTD
    r = subprocess.run([TWISTD, "-n", "--pidfile=", "pymta", "--config", str(srv.config)],
                       cwd=srv.dir, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "listeners[1].endpoint" in r.stderr + r.stdout and "proxy_protocol = true" in r.stderr + r.stdout


@pytest.fixture
def limited(make_server):
    """pymta with one connection per client address, a proxied listener, no pregreet wait."""
    srv = make_server("", start=False, server_toml='trusted_networks = ["127.0.0.1/32"]')
    srv.proxied_port = free_port()
    srv.config.write_text(srv.config.read_text() + f"""
[[listeners]]
name = "proxied"
endpoint = "tcp:{srv.proxied_port}:interface=127.0.0.1"
proxy_protocol = true
proxy_networks = ["127.0.0.1/32"]

[limits]
max_connections_per_ip = 1

[dns]
reverse_lookup = false
""" + BACKEND_TOML)
    return srv.start()


def test_connection_limit_per_ip_counts_the_original_client(limited):
    srv = limited
    # HAProxy is not needed to show the counting: a header from the proxy's address is enough
    first = Wire(srv.proxied_port, read_banner=False)
    first.send(v1_header((CLIENT, 1111)))
    assert first.reply()[0] == 220
    # another client behind the same proxy gets in
    second = Wire(srv.proxied_port, read_banner=False)
    second.send(v1_header((LISTED, 2222)))
    assert second.reply()[0] == 220
    # the same client again does not
    third = Wire(srv.proxied_port, read_banner=False)
    third.send(v1_header((CLIENT, 3333)))
    code, lines = third.reply()
    assert (code, lines[0]) == (421, "4.7.0 mx.example.test Error: too many connections from 127.0.0.2")
    for w in (first, second, third):
        w.close()


def test_data_after_the_header_in_the_same_read_reaches_smtp(limited):
    srv = limited
    w = Wire(srv.proxied_port, read_banner=False)
    # no pregreet trap here: the pipelined EHLO waits for the banner and is answered
    w.send(v2_header((CLIENT, 4444)) + b"EHLO fast.example\r\n")
    assert w.reply()[0] == 220
    assert w.reply()[0] == 250
    assert w.cmd("QUIT")[0] == 221
    assert wait_for(lambda: "connect from unknown[127.0.0.2]:4444" in srv.log_text())


@pytest.mark.parametrize("make_header", [v1_header, v2_header])
def test_an_ipv6_client_behind_an_ipv4_proxy(limited, make_header):
    srv = limited
    w = Wire(srv.proxied_port, read_banner=False)
    w.send(make_header(("2001:db8::7", 5555), ("2001:db8::25", 25)))
    assert w.reply()[0] == 220
    assert w.cmd("EHLO v6.example")[0] == 250
    assert w.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert w.cmd("RCPT TO:<x@elsewhere.example>") == (554, "5.7.1 Relay access denied")
    assert w.cmd("RCPT TO:<six@example.test>")[0] == 250
    assert w.cmd("DATA")[0] == 354
    w.send(BODY + b".\r\n")
    assert w.reply()[0] == 250
    w.cmd("QUIT")
    w.close()
    [msg] = srv.delivered("six@example.test")
    assert b"(unknown [IPv6:2001:db8::7])" in msg.split(b"\r\n\r\n")[0]
    assert wait_for(lambda: "connect from unknown[2001:db8::7]:5555" in srv.log_text())


def test_during_a_graceful_stop_a_proxied_newcomer_gets_421_under_its_own_address(limited):
    import signal
    srv = limited
    # a transaction in flight keeps the drain (and the listeners) going
    busy = Wire(srv.proxied_port, read_banner=False)
    busy.send(v1_header((LISTED, 1000)))
    assert busy.reply()[0] == 220
    assert busy.cmd("EHLO busy.example")[0] == 250
    assert busy.cmd("MAIL FROM:<a@example.org>")[0] == 250
    assert busy.cmd("RCPT TO:<busy@example.test>")[0] == 250
    assert busy.cmd("DATA")[0] == 354
    # accepted before the stop, its header only after it
    early = socket.create_connection(("127.0.0.1", srv.proxied_port), timeout=10)
    time.sleep(0.2)
    srv.proc.send_signal(signal.SIGTERM)
    assert wait_for(lambda: "stopping:" in srv.log_text())
    early.sendall(v2_header((CLIENT, 2000)))
    assert read_all(early).startswith(b"421 4.3.2 ")
    late = socket.create_connection(("127.0.0.1", srv.proxied_port), timeout=10)
    late.sendall(v1_header((CLIENT, 3000)))
    assert read_all(late).startswith(b"421 4.3.2 ")
    busy.send(BODY + b".\r\n")
    assert busy.reply()[0] == 250                      # the transaction in flight finishes
    assert busy.reply()[0] == 421
    srv.proc.wait(20)
    log = srv.log_text()
    assert log.count(f"stopping: refusing {CLIENT}: service shutting down") == 2
    assert "Traceback" not in log
