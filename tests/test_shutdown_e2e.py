"""Graceful SIGTERM, end to end: twistd in a subprocess, clients on real sockets.

On SIGTERM the server stops taking new mail (new connections get 421
4.3.2), closes idle sessions at once, lets a transaction in flight finish up
to ``[server] shutdown_timeout`` and then exits; a message answered 250 is
delivered after the restart exactly once, a message cut off at the deadline
is never acknowledged and never delivered.
"""

from __future__ import annotations

import re
import signal
import socket
import time

import pytest

from conftest import BACKEND_TOML, ROOT

RCPT = "drain@example.test"
HALF = 5 * 1024 * 1024 // 2
SLOW_FILTER = (BACKEND_TOML + '\n[stages]\ndata = ["slow"]\n\n[plugins.slow]\n'
               'use = "drain_filters:SlowFilter"\n')
PLUGIN_PATH = f'plugin_path = ["{ROOT / "tests" / "plugins"}"]'


class Client:
    """A raw SMTP client: exact control of what is sent when."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.file = self.sock.makefile("rb")

    def reply(self) -> tuple[int, bytes]:
        """The next reply: (code, last line); (0, b"") at EOF."""
        while True:
            try:
                line = self.file.readline()
            except ConnectionResetError:
                line = b""
            if not line:
                return 0, b""
            if line[3:4] != b"-":
                return int(line[:3]), line.rstrip(b"\r\n")

    def command(self, line: bytes) -> tuple[int, bytes]:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def at_eof(self) -> bool:
        return self.file.read() == b""

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def _message(token: str, size: int) -> bytes:
    """About ``size`` bytes of a message whose every line names ``token``."""
    head = f"Subject: {token}\r\nMessage-ID: <{token}@example.test>\r\n\r\n".encode()
    line = (f"{token} " * 12)[:76].encode() + b"\r\n"
    body = line * (size // len(line))
    return head + body + b".a line that starts with a dot\r\n"


def _start_transaction(port: int) -> Client:
    client = Client(port)
    assert client.reply()[0] == 220
    assert client.command(b"EHLO client.example.org")[0] == 250
    assert client.command(b"MAIL FROM:<sender@example.org>")[0] == 250
    assert client.command(f"RCPT TO:<{RCPT}>".encode())[0] == 250
    assert client.command(b"DATA")[0] == 354
    return client


def _wait_for_log(server, pattern: str, timeout: float = 20.0) -> re.Match:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, server.log_text())
        if match:
            return match
        time.sleep(0.05)
    raise AssertionError(f"no log line matching {pattern!r}:\n{server.log_text()[-3000:]}")


def _wait_exit(server, timeout: float) -> float:
    """Seconds until the server process exited (fails after ``timeout``)."""
    start = time.monotonic()
    server.proc.wait(timeout)
    return time.monotonic() - start


def _newcomer_once_stopping(port: int, timeout: float = 20.0) -> tuple[int, bytes]:
    """Connect until the server no longer greets: the first reply that is not
    a 220 banner, (0, b"") if the connection was refused."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client = Client(port)
        except ConnectionRefusedError:
            return 0, b""
        try:
            reply = client.reply()
            if reply[0] != 220:
                assert client.at_eof()
                return reply
            client.command(b"QUIT")
        finally:
            client.close()
        time.sleep(0.02)
    raise AssertionError("the server still greets new clients")


def _queue_files(server) -> list:
    return sorted((server.spool / "queue").glob("*"))


def _delivered_once_after_restart(server, token: str, body: bytes) -> None:
    server.start()
    messages = server.delivered(RCPT, 1, timeout=30)
    deadline = time.monotonic() + 20
    while _queue_files(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _queue_files(server) == []                   # nothing more to deliver
    messages = server.delivered(RCPT, 0, timeout=0)
    assert len(messages) == 1, f"{len(messages)} deliveries"
    stored = messages[0]
    content = stored[stored.index(f"Subject: {token}".encode()):]
    assert content == body.replace(b"\r\n.a line", b"\r\na line")   # dot-unstuffed


@pytest.mark.parametrize("disk_work", ["process", "threads"])
def test_sigterm_mid_transfer_lets_the_message_finish_and_it_is_delivered_once(make_server, disk_work):
    server = make_server(server_toml='shutdown_timeout = "60s"', spool_toml=f'disk_work = "{disk_work}"')
    token = "drain-5mib"
    body = _message(token, 2 * HALF)
    client = _start_transaction(server.port)
    client.sock.sendall(body[:HALF])

    server.proc.send_signal(signal.SIGTERM)
    newcomer = _newcomer_once_stopping(server.port)
    assert server.proc.poll() is None

    try:
        client.sock.sendall(body[HALF:] + b".\r\n")
    except OSError:
        pass                                          # the server hung up (before the fix)
    code, text = client.reply()
    assert code == 250, text
    # while draining, the port stays open only to say 421
    assert newcomer == (421, b"421 4.3.2 mx.example.test Service shutting down")
    queue_id = re.search(rb"queued as (\S+)", text).group(1).decode()
    _wait_for_log(server, r"stopping: \d session\(s\) open; transactions in flight get up to 60s")
    # the transaction is over: the session is closed with 421 at once
    assert client.reply() == (421, b"421 4.3.2 mx.example.test Service shutting down")
    assert client.at_eof()
    client.close()

    assert _wait_exit(server, 20) < 20
    log = server.log_text()
    assert "stopping: every session closed, every commit landed" in log
    assert f"{queue_id}: scheduler stopping; delivery waits for the next start" in log
    assert [p.name for p in _queue_files(server)] == [f"{queue_id}.msg"]
    assert not server.delivered(RCPT, 0, timeout=0)

    _delivered_once_after_restart(server, token, body)


def test_sigterm_closes_an_idle_session_at_once_and_exits_well_before_the_deadline(make_server):
    server = make_server()                            # shutdown_timeout: the default 30 s
    idle = Client(server.port)
    assert idle.reply()[0] == 220
    assert idle.command(b"EHLO client.example.org")[0] == 250
    greeted_only = Client(server.port)
    assert greeted_only.reply()[0] == 220

    server.proc.send_signal(signal.SIGTERM)
    for client in (idle, greeted_only):
        assert client.reply() == (421, b"421 4.3.2 mx.example.test Service shutting down")
        assert client.at_eof()
        client.close()
    assert _wait_exit(server, 15) < 15               # the deadline (30 s) is not waited for
    assert "shutdown_timeout reached" not in server.log_text()


def test_at_the_deadline_a_stalled_message_gets_421_and_is_never_delivered(make_server):
    server = make_server(server_toml='shutdown_timeout = "1s"')
    token = "drain-stalled"
    body = _message(token, 2 * HALF)
    client = _start_transaction(server.port)
    client.sock.sendall(body[:HALF])                  # ... and stalls

    server.proc.send_signal(signal.SIGTERM)
    assert client.reply() == (421, b"421 4.3.2 mx.example.test Service shutting down")
    _wait_for_log(server, r"stopping: shutdown_timeout reached: closing 1 session\(s\) with 421")
    # the rest of the message and its end reach a closed connection: never acknowledged
    try:
        client.sock.sendall(body[HALF:] + b".\r\n")
        assert client.reply() == (0, b"")
    except OSError:
        pass
    client.close()
    assert _wait_exit(server, 20) < 20
    assert _queue_files(server) == []

    server.start()
    time.sleep(1)                                     # the restart recovered the spool: nothing in it
    assert _queue_files(server) == []
    assert not server.delivered(RCPT, 0, timeout=0)


def test_a_second_sigterm_ends_the_drain_at_once(make_server):
    server = make_server(server_toml='shutdown_timeout = "5m"')
    client = _start_transaction(server.port)
    client.sock.sendall(_message("drain-second", 10000)[:5000])

    server.proc.send_signal(signal.SIGTERM)
    _wait_for_log(server, r"stopping: 1 session\(s\) open")
    assert server.proc.poll() is None
    server.proc.send_signal(signal.SIGTERM)
    assert client.reply() == (421, b"421 4.3.2 mx.example.test Service shutting down")
    _wait_for_log(server, r"stopping: signal SIGTERM again: closing 1 session\(s\) with 421")
    client.close()
    assert _wait_exit(server, 20) < 20
    assert _queue_files(server) == []


def test_a_message_waiting_for_its_filter_gets_its_250_during_the_drain(make_server):
    server = make_server(SLOW_FILTER, server_toml=PLUGIN_PATH)
    token = "drain-filtered"
    body = _message(token, 20000).replace(f"Subject: {token}".encode(), b"Subject: slow2500", 1)
    client = _start_transaction(server.port)
    client.sock.sendall(body + b".\r\n")
    time.sleep(0.5)                                   # the filter holds the answer for 2.5 s
    server.proc.send_signal(signal.SIGTERM)
    code, text = client.reply()
    assert code == 250, text
    assert client.reply()[0] == 421 and client.at_eof()
    client.close()
    queue_id = re.search(rb"queued as (\S+)", text).group(1).decode()
    assert _wait_exit(server, 20) < 20
    log = server.log_text()
    # the stop began while the answer was pending
    assert log.index("stopping: 1 session(s) open") < log.index(f"{queue_id}: client=")
    server.start()
    [stored] = server.delivered(RCPT, 1, timeout=30)
    assert b"Subject: slow2500" in stored


def test_at_the_deadline_a_message_still_in_its_filter_gets_421_and_is_not_kept(make_server):
    server = make_server(SLOW_FILTER, server_toml=PLUGIN_PATH + '\nshutdown_timeout = "1s"')
    body = _message("drain-filter-late", 20000).replace(b"Subject: drain-filter-late", b"Subject: slow20000", 1)
    client = _start_transaction(server.port)
    client.sock.sendall(body + b".\r\n")
    time.sleep(0.5)
    server.proc.send_signal(signal.SIGTERM)
    assert client.reply() == (421, b"421 4.3.2 mx.example.test Service shutting down")
    client.close()
    assert _wait_exit(server, 20) < 20
    assert _queue_files(server) == []
    server.start()
    time.sleep(1)
    assert _queue_files(server) == []
    assert not server.delivered(RCPT, 0, timeout=0)
