"""pymta relays to a second pymta, found by MX lookup; the queue survives a restart with its
retry times, and ETRN from a trusted client starts the delivery at once."""

from __future__ import annotations

import smtplib
import textwrap
import time

from pymta.spool.queuefile import load_queue_file

from conftest import BACKEND_TOML, PymtaServer, free_port, relay_toml, wait_for_log
from dnsserver import LoopbackDNS

ZONE = {"remote.test": [("MX", (10, "mx.remote.test"))], "mx.remote.test": [("A", "127.0.0.1")]}


def test_relay_to_a_second_pymta_with_restart_and_etrn(tmp_path):
    with LoopbackDNS(ZONE) as dns:
        receiver_port = free_port()
        (tmp_path / "receiver").mkdir()
        (tmp_path / "sender").mkdir()
        receiver = PymtaServer(tmp_path / "receiver", domains=("remote.test",), port=receiver_port,
                               extra_toml=BACKEND_TOML)
        sender = PymtaServer(tmp_path / "sender", domains=("local.test",),
                             extra_toml=relay_toml(dns.nameserver, f"""
            [backends.out]
            use = "relay"
            port = {receiver_port}
            """, ("*", "out")))
        try:
            sender.start()
            body = b"Subject: across\r\n\r\n.\r\nmiddle\r\n..\r\nend\r\n"
            with smtplib.SMTP("127.0.0.1", sender.port, timeout=10) as client:
                client.sendmail("alice@local.test", ["bob@remote.test"], body)
            # the receiver is down: deferred, with the next attempt on disk
            line = wait_for_log(sender, r"to=<bob@remote\.test>, relay=out, .*status=deferred \(.*\)")
            assert "Connection refused" in line and "451 4.4.1" in line
            [message_file] = (sender.spool / "queue").glob("*.msg")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:     # the update is written just after the log line
                envelope, _ = load_queue_file(str(message_file.parent), message_file.stem)
                next_attempt = envelope.recipients[0].next_attempt
                if next_attempt:
                    break
                time.sleep(0.05)
            assert next_attempt > time.time() + 200            # retry_initial: 5 minutes

            sender.stop()
            sender.start()                                      # the queue is rebuilt
            wait_for_log(sender, r"scheduler: 1 message\(s\) in the spool")
            receiver.start()
            time.sleep(1.0)
            assert receiver.delivered("bob@remote.test", timeout=0) == []   # not due yet

            with smtplib.SMTP("127.0.0.1", sender.port, timeout=10) as client:
                client.ehlo()
                assert client.has_extn("etrn")
                code, text = client.docmd("ETRN", "remote.test")
                assert code == 250, text
            [delivered] = receiver.delivered("bob@remote.test", timeout=15)
            assert delivered.endswith(body)
            assert b"by mx.example.test (pymta) with ESMTP" in delivered
            wait_for_log(sender, r"to=<bob@remote\.test>, relay=out\[mx\.remote\.test\[127\.0\.0\.1\]"
                                 r":\d+\], .*status=sent \(250 2\.0\.0 Ok: queued as \w+\)")
            wait_for_log(sender, r"\w+: removed")
            assert list((sender.spool / "queue").glob("*")) == []
        finally:
            sender.stop()
            receiver.stop()


def test_relay_to_pymta_over_verified_starttls(tmp_path):
    from certs import make_cert

    cert, key = make_cert(tmp_path, "receiver", "mx.remote.test")
    with LoopbackDNS(ZONE) as dns:
        (tmp_path / "receiver").mkdir()
        (tmp_path / "sender").mkdir()
        receiver = PymtaServer(tmp_path / "receiver", domains=("remote.test",),
                               extra_toml=textwrap.dedent(f"""
            [tls]
            certificate = "{cert}"
            key = "{key}"
            """) + BACKEND_TOML)
        sender = PymtaServer(tmp_path / "sender", domains=("local.test",),
                             extra_toml=relay_toml(dns.nameserver, f"""
            [backends.out]
            use = "relay"
            port = {receiver.port}
            tls = "verify"
            ca_file = "{cert}"
            """, ("*", "out")))
        try:
            receiver.start()
            sender.start()
            with smtplib.SMTP("127.0.0.1", sender.port, timeout=10) as client:
                client.sendmail("alice@local.test", ["carol@remote.test"], b"Subject: tls\r\n\r\nhi\r\n")
            [delivered] = receiver.delivered("carol@remote.test", timeout=15)
            received = delivered.split(b"Received:")[1]
            assert b"with ESMTPS" in received and b"using TLS" in received
            wait_for_log(sender, r"to=<carol@remote\.test>, .*status=sent")
        finally:
            sender.stop()
            receiver.stop()
