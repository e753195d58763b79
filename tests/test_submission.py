"""Submission over real TLS: STARTTLS, implicit TLS, SMTP AUTH, relay for authenticated users."""

from __future__ import annotations

import base64
import os
import re
import signal
import smtplib
import socket
import ssl
import subprocess
import time

import pytest
from argon2 import PasswordHasher

from certs import client_tls, make_cert, pem_fingerprint, fingerprint
from conftest import BACKEND_TOML, free_port, require_program, routes_toml
from smtpwire import Wire

# cheap argon2id parameters: the checker verifies with whatever the hash says
HASHER = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
USERS = {"alice": "correct horse", "bob@example.test": "battery staple"}


@pytest.fixture
def submission(make_server):
    """pymta with an mx (STARTTLS offered), a submission and a submissions listener."""
    srv = make_server("", start=False, server_toml="trusted_networks = []")
    cert, key = make_cert(srv.dir, "server")
    passwd = srv.dir / "passwd"
    passwd.write_text("".join(f"{u}:{HASHER.hash(p)}\n" for u, p in USERS.items()))
    passwd.chmod(0o600)
    srv.sub_port, srv.smtps_port = free_port(), free_port()
    srv.cert, srv.key = cert, key
    srv.config.write_text(srv.config.read_text() + f"""
[[listeners]]
name = "submission"
endpoint = "tcp:{srv.sub_port}:interface=127.0.0.1"
role = "submission"

[[listeners]]
name = "submissions"
endpoint = "tcp:{srv.smtps_port}:interface=127.0.0.1"
role = "submissions"

[tls]
certificate = "{cert}"
key = "{key}"

[limits]
auth_failure_delay = 0.2

[stages]
auth = ["passwords"]

[plugins.passwords]
use = "passwdfile"
file = "passwd"
""" + BACKEND_TOML + routes_toml(("*", "local")))
    return srv.start()


def test_starttls_on_mx_then_delivery_records_tls(submission):
    srv = submission
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.ehlo("c.example")
        assert s.has_extn("starttls") and not s.has_extn("auth")
        assert s.starttls(context=client_tls())[0] == 220
        s.ehlo("c.example")
        assert not s.has_extn("starttls")
        s.sendmail("someone@example.org", ["alice@example.test"], b"Subject: tls\r\n\r\nx\r\n")
    [msg] = srv.delivered("alice@example.test")
    assert b"with ESMTPS id" in msg
    assert re.search(rb"\(using TLSv1\.[23] with cipher \S+\)", msg)
    assert "TLS established with localhost[127.0.0.1]" in srv.log_text()


def test_plaintext_pipelined_after_starttls_is_discarded(submission):
    w = Wire(submission.port)
    w.cmd("EHLO c.example")
    w.send(b"STARTTLS\r\nNOOP\r\nMAIL FROM:<injected@example.org>\r\n")
    assert w.reply() == (220, ["2.0.0 Ready to start TLS"])
    assert w.buf == b""
    tls = client_tls().wrap_socket(w.sock)
    tls.settimeout(1.0)
    with pytest.raises(socket.timeout):
        tls.recv(1000)               # no reply to the injected NOOP or MAIL
    tls.sendall(b"MAIL FROM:<a@example.org>\r\n")
    assert tls.recv(1000).startswith(b"503 5.5.1")   # EHLO again first: state was reset
    tls.sendall(b"EHLO c.example\r\n")
    assert tls.recv(1000).startswith(b"250-")
    tls.close()


def test_submission_requires_tls_then_auth(submission):
    w = Wire(submission.sub_port)
    code, lines = (w.send(b"EHLO c.example\r\n"), w.reply())[1]
    assert "STARTTLS" in lines and not any(l.startswith("AUTH") for l in lines)
    plain = base64.b64encode(b"\0alice\0correct horse").decode()
    assert w.cmd(f"AUTH PLAIN {plain}") == (538, "5.7.11 Encryption required for requested authentication mechanism")
    assert w.cmd("MAIL FROM:<alice@example.test>") == (530, "5.7.0 Must issue a STARTTLS command first")
    with smtplib.SMTP("127.0.0.1", submission.sub_port) as s:
        s.starttls(context=client_tls())
        s.ehlo("c.example")
        assert "PLAIN" in s.esmtp_features["auth"] and "LOGIN" in s.esmtp_features["auth"]
        code, text = s.mail("alice@example.test")
        assert (code, text) == (530, b"5.7.0 Authentication required")


def test_auth_success_allows_relay(submission):
    srv = submission
    with smtplib.SMTP("127.0.0.1", srv.sub_port) as s:
        s.starttls(context=client_tls())
        s.ehlo("laptop.example")
        assert s.login("alice", "correct horse")[0] == 235
        s.sendmail("alice@example.test", ["friend@elsewhere.example"], b"Subject: out\r\n\r\nhi\r\n")
    [msg] = srv.delivered("friend@elsewhere.example")
    assert b"with ESMTPSA id" in msg and b"(Authenticated sender: alice)" in msg
    log = srv.log_text()
    assert "sasl_method=PLAIN, sasl_username=alice" in log
    queue = [l for l in log.splitlines() if "from=<alice@example.test>" in l]
    assert queue


def test_auth_failure_denies_relay_and_never_logs_password(submission):
    srv = submission
    with smtplib.SMTP("127.0.0.1", srv.sub_port) as s:
        s.starttls(context=client_tls())
        s.ehlo("laptop.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("alice", "wrong secret")
        assert e.value.smtp_code == 535 and e.value.smtp_error.startswith(b"5.7.8")
        assert s.mail("alice@example.test")[0] == 530
    # an untrusted, unauthenticated session on the mx port cannot relay either
    w = Wire(srv.port)
    w.cmd("EHLO c.example")
    w.cmd("MAIL FROM:<alice@example.test>")
    assert w.cmd("RCPT TO:<friend@elsewhere.example>") == (554, "5.7.1 Relay access denied")
    log = srv.log_text()
    assert "SASL PLAIN authentication failed for user alice" in log and "127.0.0.1" in log
    assert "wrong secret" not in log and "correct horse" not in log


def test_repeated_failures_wait_longer(submission):
    srv = submission
    with smtplib.SMTP("127.0.0.1", srv.sub_port) as s:
        s.starttls(context=client_tls())
        s.ehlo("x.example")
        for _ in range(3):
            with pytest.raises(smtplib.SMTPAuthenticationError):
                s.login("alice", "nope")
    delays = [float(d) for d in re.findall(r"answering in ([0-9.]+)s", srv.log_text())]
    assert delays[:3] == [0.2, 0.4, 0.8]


def test_sasl_protocol_errors(submission):
    w = Wire(submission.smtps_port, read_banner=False)
    w.sock = client_tls().wrap_socket(w.sock)
    assert w.reply()[0] == 220
    code, lines = (w.send(b"EHLO c.example\r\n"), w.reply())[1]
    assert "AUTH PLAIN LOGIN" in lines and "STARTTLS" not in lines
    assert w.cmd("AUTH CRAM-MD5") == (504, "5.5.4 Unrecognized authentication type")
    assert w.cmd("AUTH PLAIN") == (334, "")
    assert w.cmd("*") == (501, "5.0.0 Authentication aborted")
    assert w.cmd("AUTH PLAIN not*base64") == (501, "5.5.2 Cannot decode the authentication response")
    assert w.cmd("AUTH LOGIN") == (334, "VXNlcm5hbWU6")
    assert w.cmd(base64.b64encode(b"bob@example.test").decode()) == (334, "UGFzc3dvcmQ6")
    assert w.cmd(base64.b64encode(b"battery staple").decode()) == (235, "2.7.0 Authentication successful")
    assert w.cmd("AUTH PLAIN AGEAYg==") == (503, "5.5.1 Error: already authenticated")
    assert w.cmd("MAIL FROM:<bob@example.test> AUTH=bob+40example.test")[0] == 250


def test_implicit_tls_submission_with_smtplib(submission):
    srv = submission
    with smtplib.SMTP_SSL("127.0.0.1", srv.smtps_port, context=client_tls()) as s:
        s.ehlo("laptop.example")
        s.login("bob@example.test", "battery staple")
        s.sendmail("bob@example.test", ["carol@example.test"], b"Subject: 465\r\n\r\nhi\r\n")
    [msg] = srv.delivered("carol@example.test")
    assert b"with ESMTPSA id" in msg


def test_tls_below_1_2_refused(submission):
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.minimum_version = ssl.TLSVersion.TLSv1
    old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", submission.smtps_port), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            old.wrap_socket(raw).recv(100)


def test_openssl_s_client_sees_tls_1_2_or_later(submission):
    openssl = require_program("openssl")
    for flag, ok in (("-tls1_2", True), ("-tls1_3", True), ("-tls1_1", False)):
        r = subprocess.run([openssl, "s_client", "-starttls", "smtp", "-connect",
                            f"127.0.0.1:{submission.port}", flag, "-cipher", "DEFAULT:@SECLEVEL=0"],
                           input="QUIT\n", capture_output=True, text=True, timeout=30)
        established = re.search(r"New, (TLSv[\d.]+), Cipher is (\S+)", r.stdout)
        if ok:
            assert established and established.group(1) in ("TLSv1.2", "TLSv1.3"), r.stdout + r.stderr
        else:
            assert established is None and "Cipher is (NONE)" in r.stdout, r.stdout


def _peer_fingerprint(port: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with client_tls().wrap_socket(raw) as tls:
            return fingerprint(tls.getpeercert(binary_form=True))


def test_certificate_reloaded_on_sighup_without_dropping_sessions(submission):
    srv = submission
    assert _peer_fingerprint(srv.smtps_port) == pem_fingerprint(srv.cert)
    session = smtplib.SMTP_SSL("127.0.0.1", srv.smtps_port, context=client_tls())
    session.ehlo("keep.example")
    new_cert, new_key = make_cert(srv.dir, "renewed")
    os.replace(new_cert, srv.cert)
    os.replace(new_key, srv.key)
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload: configuration 2 in force" not in srv.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _peer_fingerprint(srv.smtps_port) == pem_fingerprint(srv.cert)
    assert session.noop()[0] == 250          # the old session is still alive
    session.quit()


def test_broken_certificate_reload_keeps_the_old_one(submission):
    srv = submission
    before = _peer_fingerprint(srv.smtps_port)
    srv.cert.write_text("not a certificate")
    srv.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload: configuration error" not in srv.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    [line] = [l for l in srv.log_text().splitlines() if "reload: configuration error" in l]
    assert f"tls: {srv.cert}: not a PEM certificate" in line and "stays in force" in line
    assert _peer_fingerprint(srv.smtps_port) == before


def test_missing_certificate_is_a_startup_error(make_server):
    srv = make_server(BACKEND_TOML + '\n[tls]\ncertificate = "nope.pem"\nkey = "nope.key"\n', start=False)
    with pytest.raises(RuntimeError) as e:
        srv.start()
    assert "tls.certificate: file" in str(e.value) and "nope.pem does not exist" in str(e.value)


# ----------------------------------------------------------------- swaks
def _swaks(*args: str) -> subprocess.CompletedProcess:
    swaks = require_program("swaks")
    return subprocess.run([swaks, "--helo", "swaks.example", *args], capture_output=True,
                          text=True, timeout=60)


def test_swaks_tls_and_auth(submission):
    srv = submission
    r = _swaks("--server", f"127.0.0.1:{srv.sub_port}", "--tls", "--auth", "LOGIN",
               "--auth-user", "alice", "--auth-password", "correct horse",
               "--from", "alice@example.test", "--to", "dave@elsewhere.example")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "235 2.7.0 Authentication successful" in r.stdout
    r = _swaks("--server", f"127.0.0.1:{srv.smtps_port}", "--tls-on-connect", "--auth", "PLAIN",
               "--auth-user", "bob@example.test", "--auth-password", "battery staple",
               "--from", "bob@example.test", "--to", "erin@elsewhere.example")
    assert r.returncode == 0, r.stdout + r.stderr
    r = _swaks("--server", f"127.0.0.1:{srv.sub_port}", "--tls", "--auth", "PLAIN",
               "--auth-user", "alice", "--auth-password", "bad",
               "--from", "alice@example.test", "--to", "dave@elsewhere.example")
    assert r.returncode != 0 and "535 5.7.8" in r.stdout
    assert len(srv.delivered("dave@elsewhere.example")) == 1
    assert len(srv.delivered("erin@elsewhere.example")) == 1
