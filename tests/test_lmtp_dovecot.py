"""The ``lmtp`` backend against a real, private Dovecot: TCP and UNIX socket, per-recipient
replies (over quota: 452 4.2.2 retried, 552 5.2.2 bounced), connection reuse."""

from __future__ import annotations

import smtplib

import pytest

from conftest import routes_toml, wait_for_log
from dovecotkit import PrivateDovecot

ALICE, BOB = "alice@example.test", "bob@example.test"
BIG = b"x" * 70 + b"\r\n"          # 40 such lines: over bob's 1 KiB quota


def lmtp_toml(target: str) -> str:
    return (f'\n[backends.store]\nuse = "lmtp"\n{target}\nidle_timeout = "2s"\n'
            + routes_toml(("example.test", "store")))


@pytest.fixture
def dovecot():
    kit = PrivateDovecot({ALICE: "alice-pw", BOB: "bob-pw"}, quota_kib={BOB: 1})
    yield kit.start()
    kit.cleanup()


def send(port: int, recipients: list[str], body: bytes, sender: str = "sender@example.test") -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as smtp:
        smtp.sendmail(sender, recipients, body)


def message(subject: str, lines: int = 1) -> bytes:
    return (f"From: sender@example.test\r\nSubject: {subject}\r\n\r\n".encode() + BIG * lines)


def test_delivery_over_tcp_is_read_back_from_the_maildir(make_server, dovecot):
    server = make_server(lmtp_toml(f'host = "127.0.0.1:{dovecot.lmtp_port}"'))
    send(server.port, [ALICE, BOB], message("over tcp"))
    (alice,) = dovecot.wait_for_messages(ALICE)
    (bob,) = dovecot.wait_for_messages(BOB)
    for copy in (alice, bob):
        assert b"Subject: over tcp" in copy
        assert b"Return-Path: <sender@example.test>" in copy   # Dovecot's, from MAIL FROM
        assert b"by mx.example.test" in copy                   # pymta's Received
    line = wait_for_log(server, rf"to=<{ALICE}>, relay=store\[.*\], .*status=sent \(250 2\.0\.0[^)]*")
    assert f"[127.0.0.1]:{dovecot.lmtp_port}]" in line and "Saved" in line


def test_over_quota_is_deferred_for_that_recipient_alone_and_retried(make_server, dovecot):
    server = make_server(lmtp_toml(f'host = "127.0.0.1:{dovecot.lmtp_port}"'))
    send(server.port, [ALICE, BOB], message("quota", lines=40))
    assert len(dovecot.wait_for_messages(ALICE)) == 1
    wait_for_log(server, rf"to=<{BOB}>, relay=store.*status=deferred \(.*452 4\.2\.2.*Quota exceeded")
    assert dovecot.messages(BOB) == []
    # the user makes room (here: a larger quota), the queue is run: bob gets it, alice not again
    dovecot.set_quota(BOB, 100_000)
    with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as smtp:
        smtp.ehlo()
        assert smtp.docmd("ETRN", "example.test")[0] == 250
    assert b"Subject: quota" in dovecot.wait_for_messages(BOB)[0]
    wait_for_log(server, rf"to=<{BOB}>, relay=store.*status=sent")
    assert len(dovecot.messages(ALICE)) == 1


def test_a_permanent_over_quota_reply_bounces_that_recipient(make_server):
    dovecot = PrivateDovecot({ALICE: "alice-pw", BOB: "bob-pw"}, quota_kib={BOB: 1},
                             tempfail_quota=False).start()
    try:
        server = make_server(lmtp_toml(f'host = "127.0.0.1:{dovecot.lmtp_port}"'))
        # alice sends to bob (full) and herself: the bounce comes back to her over LMTP
        send(server.port, [BOB, ALICE], message("full", lines=40), sender=ALICE)
        wait_for_log(server, rf"to=<{BOB}>, relay=store.*status=bounced \(.*552 5\.2\.2")
        copies = dovecot.wait_for_messages(ALICE, count=2)
        bounce = next(c for c in copies if b"Subject: full" not in c.split(b"\n\n")[0])
        assert b"5.2.2" in bounce and BOB.encode() in bounce
        assert dovecot.messages(BOB) == []
    finally:
        dovecot.cleanup()


def test_delivery_over_the_unix_socket_reuses_the_connection(make_server, dovecot):
    server = make_server(lmtp_toml(f'socket = "{dovecot.lmtp_socket}"'))
    for n in range(3):
        send(server.port, [ALICE], message(f"unix {n}"))
        dovecot.wait_for_messages(ALICE, count=n + 1)
    subjects = sorted(c.split(b"Subject: ")[1].split(b"\n")[0].strip() for c in dovecot.messages(ALICE))
    assert subjects == [b"unix 0", b"unix 1", b"unix 2"]
    wait_for_log(server, rf"to=<{ALICE}>, relay=store\[{dovecot.lmtp_socket}\].*status=sent")
    # one LMTP session for the three messages (sent one after another, within idle_timeout)
    assert dovecot.log_text().count("Connect from local") == 1, dovecot.log_text()


def test_an_unreachable_store_defers(make_server, tmp_path):
    server = make_server(lmtp_toml(f'socket = "{tmp_path}/no-such-socket"'))
    send(server.port, [ALICE], message("nowhere"))
    line = wait_for_log(server, rf"to=<{ALICE}>, relay=store.*status=deferred \([^\n]*")
    assert "no-such-socket" in line


# -- options ----------------------------------------------------------------------------

def lmtp_backend(tmp_path, **options):
    from twisted.internet.testing import MemoryReactor

    from pymta.delivery.lmtp import LMTPBackend
    from relaykit import context
    return LMTPBackend(options, context(MemoryReactor(), tmp_path))


@pytest.mark.parametrize("options, problem", [
    ({}, "host: give either host"),
    ({"host": "127.0.0.1:24", "socket": "lmtp"}, "not both"),
    ({"host": "127.0.0.1:99999"}, "host: bad port"),
    ({"socket": "lmtp", "tls_policy": {}}, "tls_policy"),
])
def test_option_errors_name_the_key(tmp_path, options, problem):
    from pymta.plugin_api import OptionError
    with pytest.raises(OptionError, match=problem):
        lmtp_backend(tmp_path, **options)


def test_the_store_is_local_delivery_not_a_relay(tmp_path):
    from pymta.interfaces import IDeliveryBackend, IRemoteDelivery
    backend = lmtp_backend(tmp_path, host="[::1]")
    assert IDeliveryBackend.providedBy(backend) and not IRemoteDelivery.providedBy(backend)
    assert backend.router.hosts == (("::1", 24),)
    assert backend.tls.level == "none"
    assert lmtp_backend(tmp_path, socket="run/lmtp").socket == f"{tmp_path}/run/lmtp"
