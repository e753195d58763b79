"""Queue files removed behind a running server's back (an admin ``rm``): one warning, forgotten.

A real server (twistd) relays to a smarthost: a closed port (the message is
deferred and retried every half second) or a scripted next hop in this
process that holds the transaction at RCPT while the test removes the file.
"""

from __future__ import annotations

import re
import smtplib
import socketserver
import threading
import time

import pytest

from conftest import BACKEND_TOML, free_port, routes_toml

WARNING = "{qid}: queue file removed behind the server's back; message forgotten"

RELAY_TOML = """
[queue]
retry_initial = 0.5
retry_max = 0.5
""" + BACKEND_TOML + """
[backends.out]
use = "smarthost"
host = "127.0.0.1:{port}"
tls = "none"
dead_destination_time = 0
""" + routes_toml(("example.test", "local"), ("*", "out"))


def send(srv, to: str) -> str:
    """Send one message; its queue id from the 250 reply."""
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.ehlo()
        s.mail("alice@example.test")
        s.rcpt(to)
        code, text = s.data(b"Subject: test\r\n\r\nhello\r\n")
    assert code == 250, text
    return re.search(rb"queued as (\w+)", text)[1].decode()


def wait_for(predicate, what: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def check_forgotten(srv, qid: str) -> None:
    """One warning, nothing after it about the message, no traceback; another message goes through."""
    warning = WARNING.format(qid=qid)
    wait_for(lambda: warning in srv.log_text(), "the warning")
    time.sleep(2.0)                                    # four retry intervals
    log = srv.log_text()
    assert log.count(warning) == 1, log
    assert "#warn] " + warning in log
    after = log[log.index(warning) + len(warning):]
    assert f"{qid}:" not in after, after              # no attempt, no update, no bounce
    for problem in ("Traceback", "FileNotFoundError", "spool update failed", "scheduler error"):
        assert problem not in log, log
    assert not list((srv.spool / "queue").glob(f"{qid}.*"))
    assert not srv.maildir("bob@example.test").exists()
    other = send(srv, "bob@example.test")
    assert len(srv.delivered("bob@example.test", timeout=20)) == 1
    srv.stop()
    log = srv.log_text()
    assert f"{other}: removed" in log
    assert f"{qid}:" not in log[log.index(warning) + len(warning):]   # not even at shutdown


@pytest.mark.parametrize("which", [(".msg", ".env"), (".msg",)])
def test_deferred_message_removed_is_forgotten(make_server, which):
    srv = make_server(RELAY_TOML.replace("{port}", str(free_port())))
    qid = send(srv, "x@remote.example")
    queue = srv.spool / "queue"
    # deferred once, its state updated (ID.env written): waiting for the retry
    wait_for(lambda: (queue / f"{qid}.env").exists(), "the first deferral")
    for suffix in which:
        (queue / f"{qid}{suffix}").unlink()
    check_forgotten(srv, qid)


class HeldNextHop(socketserver.ThreadingTCPServer):
    """An SMTP next hop that holds each RCPT until ``release`` is set, then answers ``rcpt_reply``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, rcpt_reply: bytes) -> None:
        super().__init__(("127.0.0.1", 0), _HeldHandler)
        self.rcpt_reply = rcpt_reply
        self.at_rcpt = threading.Event()
        self.release = threading.Event()
        self.transactions = 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return self.server_address[1]


class _HeldHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        server: HeldNextHop = self.server
        self.wfile.write(b"220 hop.example ESMTP\r\n")
        while True:
            line = self.rfile.readline()
            if not line:
                return
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                self.wfile.write(b"250 hop.example\r\n")
            elif verb == b"MAIL":
                server.transactions += 1
                self.wfile.write(b"250 2.1.0 ok\r\n")
            elif verb == b"RCPT":
                server.at_rcpt.set()
                server.release.wait(30)
                self.wfile.write(server.rcpt_reply + b"\r\n")
            elif verb == b"DATA":
                self.wfile.write(b"354 go ahead\r\n")
                while self.rfile.readline() not in (b".\r\n", b""):
                    pass
                self.wfile.write(b"250 2.0.0 taken\r\n")
            elif verb == b"QUIT":
                self.wfile.write(b"221 2.0.0 bye\r\n")
                return
            else:
                self.wfile.write(b"250 2.0.0 ok\r\n")


@pytest.mark.parametrize("rcpt_reply", [b"451 4.2.0 try later", b"550 5.1.1 no such user",
                                        b"250 2.1.5 ok"])
def test_message_removed_during_its_delivery_attempt_is_forgotten(make_server, rcpt_reply):
    """The file goes while the next hop holds RCPT; then it defers, refuses, or asks for the content."""
    hop = HeldNextHop(rcpt_reply)
    try:
        srv = make_server(RELAY_TOML.replace("{port}", str(hop.port)))
        qid = send(srv, "x@remote.example")
        assert hop.at_rcpt.wait(20), "the server did not reach RCPT"
        for path in (srv.spool / "queue").glob(f"{qid}.*"):
            path.unlink()
        hop.release.set()
        check_forgotten(srv, qid)
        assert hop.transactions == 1                  # never retried
    finally:
        hop.release.set()
        hop.shutdown()
        hop.server_close()
