"""mbox delivery: mboxrd format, locking, truncation on error, concurrent appends."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from zope.interface.verify import verifyObject

from pymta.config.errors import OptionError
from pymta.delivery import mbox as mbox_module
from pymta.delivery.mbox import MboxBackend, mboxrd_escape, mboxrd_unescape_line
from pymta.delivery.result import DEFERRED, DELIVERED, FAILED
from pymta.envelope import Recipient
from pymta.interfaces import IDeliveryBackend
from pymta.spool.message import SpooledMessage
from relaykit import LocalContext, local_backend, spooled

REPO = Path(__file__).resolve().parent.parent
PREPEND = "Received: from client.example.net\r\n\tby mx.example.org; now\r\n"
FROM_LINE = re.compile(rb"^From (\S+) [A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}$")


def make_message(tmp_path: Path, body: bytes, sender: str = "sender@example.net",
                 name: str = "spooled.msg") -> SpooledMessage:
    return spooled(tmp_path, body=body, sender=sender, prepend=(PREPEND,), queue_id="1K0TJEHGTP5CKM06",
                   name=name)


def rcpt(address: str) -> Recipient:
    return Recipient(address, address, "local")


def backend(tmp_path: Path, **options) -> MboxBackend:
    (tmp_path / "mail").mkdir(exist_ok=True)
    return local_backend(MboxBackend, tmp_path, **options)


def read_mbox(path: Path) -> list[tuple[bytes, bytes]]:
    """Split an mboxrd file into (From line, message with quoting undone)."""
    data = path.read_bytes()
    assert data.startswith(b"From ")
    assert data.endswith(b"\n\n")
    messages = []
    for part in re.split(rb"(?<=\n\n)(?=From )", data):
        assert part.endswith(b"\n\n"), "a message is not followed by a blank line"
        first, _, rest = part[:-1].partition(b"\n")
        lines = rest.split(b"\n")[:-1]
        messages.append((first, b"".join(mboxrd_unescape_line(l) + b"\n" for l in lines)))
    return messages


def as_lf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


# -- format ---------------------------------------------------------------------------

def test_mboxrd_quoting_round_trips():
    original = (b"Subject: quoting\r\n\r\nFrom the start\r\n>From once\r\n>>From twice\r\n"
                b"From\r\nFromage\r\n From indented\r\n>>>From thrice")
    escaped = b"".join(mboxrd_escape([original[:25], original[25:40], original[40:]]))
    assert escaped == (b"Subject: quoting\n\n>From the start\n>>From once\n>>>From twice\n"
                       b"From\nFromage\n From indented\n>>>>From thrice\n\n")
    lines = escaped[:-2].split(b"\n")
    assert b"\n".join(mboxrd_unescape_line(l) for l in lines) == as_lf(original)


def test_crlf_split_across_chunks_is_converted():
    assert b"".join(mboxrd_escape([b"a\r", b"\nFrom x\r", b"\n"])) == b"a\n>From x\n\n"


def test_delivery_appends_from_line_headers_body_and_blank_line(tmp_path):
    body = b"Subject: hi\r\n\r\nFrom here\r\n>From there\r\n>>From everywhere\r\nend\r\n"
    [result] = backend(tmp_path).deliver_sync(make_message(tmp_path, body), [rcpt("Alice+ext@example.org")])
    path = tmp_path / "mail" / "example.org" / "alice"
    assert result.status == DELIVERED, result
    assert result.relay == f"mbox:{path}"
    data = path.read_bytes()
    first, _, rest = data.partition(b"\n")
    assert FROM_LINE.match(first).group(1) == b"sender@example.net"
    assert rest == (b"Return-Path: <sender@example.net>\nDelivered-To: Alice+ext@example.org\n"
                    + as_lf(PREPEND.encode())
                    + b"Subject: hi\n\n>From here\n>>From there\n>>>From everywhere\nend\n\n")
    assert b"\r" not in data
    assert [m for _, m in read_mbox(path)] == [
        as_lf(b"Return-Path: <sender@example.net>\r\nDelivered-To: Alice+ext@example.org\r\n"
              + PREPEND.encode() + body)]
    assert not Path(str(path) + ".lock").exists()
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_messages_accumulate_and_null_sender_is_mailer_daemon(tmp_path):
    mbox_backend = backend(tmp_path)
    mbox_backend.deliver_sync(make_message(tmp_path, b"Subject: 1\r\n\r\nno final newline"),
                              [rcpt("bob@example.org")])
    mbox_backend.deliver_sync(make_message(tmp_path, b"Subject: 2\r\n\r\nFrom me\r\n", sender=""),
                              [rcpt("bob+other@example.org")])
    messages = read_mbox(tmp_path / "mail" / "example.org" / "bob")
    assert [FROM_LINE.match(f).group(1) for f, _ in messages] == [b"sender@example.net", b"MAILER-DAEMON"]
    assert messages[0][1].endswith(b"Subject: 1\n\nno final newline\n")
    assert messages[1][1].endswith(b"Subject: 2\n\nFrom me\n")


@pytest.mark.parametrize("address", ["../x@example.org", ".hidden@example.org", "a/b@example.org",
                                     "a\x00b@example.org", "x@../etc"])
def test_unsafe_names_fail_without_writing_anything(tmp_path, address):
    mbox_backend = backend(tmp_path)
    message = make_message(tmp_path, b"x\r\n")
    before = {str(p) for p in tmp_path.rglob("*")}
    [result] = mbox_backend.deliver_sync(message, [rcpt(address)])
    assert (result.status, result.enhanced) == (FAILED, "5.1.3")
    assert {str(p) for p in tmp_path.rglob("*")} == before


def test_provides_the_interface_and_checks_options(tmp_path):
    assert verifyObject(IDeliveryBackend, backend(tmp_path))
    for options, key in [({"base": "mail", "folders": True}, "folders"),
                         ({"base": "mail", "lock_timeout": "soon"}, "lock_timeout"),
                         ({"base": "mail", "lock_timeout": True}, "lock_timeout"),
                         ({"base": "mail", "lock_timeout": -1}, "lock_timeout"),
                         ({"layout": "{local}"}, "base")]:
        with pytest.raises(OptionError) as caught:
            MboxBackend(options, LocalContext(tmp_path))
        assert caught.value.key == key


# -- locking ------------------------------------------------------------------------------

def test_fresh_dotlock_defers_and_is_left_alone(tmp_path):
    mbox_backend = backend(tmp_path, lock_timeout=0.2)
    path = tmp_path / "mail" / "example.org" / "carol"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"From x Thu Jan  1 00:00:00 1970\nold\n\n")
    lock = Path(str(path) + ".lock")
    lock.write_text("12345\n")
    started = time.monotonic()
    [result] = mbox_backend.deliver_sync(make_message(tmp_path, b"new\r\n"), [rcpt("carol@example.org")])
    assert time.monotonic() - started >= 0.2
    assert result.status == DEFERRED
    assert result.enhanced == "4.2.0"
    assert str(lock) in result.text
    assert lock.read_text() == "12345\n"
    assert path.read_bytes() == b"From x Thu Jan  1 00:00:00 1970\nold\n\n"


def test_stale_dotlock_is_broken(tmp_path):
    mbox_backend = backend(tmp_path, lock_timeout=0.2)
    path = tmp_path / "mail" / "example.org" / "dave"
    path.parent.mkdir(parents=True)
    lock = Path(str(path) + ".lock")
    lock.write_text("crashed\n")
    ten_minutes_ago = time.time() - 600
    os.utime(lock, (ten_minutes_ago, ten_minutes_ago))
    [result] = mbox_backend.deliver_sync(make_message(tmp_path, b"new\r\n"), [rcpt("dave@example.org")])
    assert result.status == DELIVERED
    assert not lock.exists()
    assert len(read_mbox(path)) == 1


def test_fcntl_lock_held_by_another_process_defers(tmp_path):
    mbox_backend = backend(tmp_path, lock_timeout=0.3)
    path = tmp_path / "mail" / "example.org" / "erin"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, sys, time
            f = open({str(path)!r}, "ab")
            fcntl.lockf(f, fcntl.LOCK_EX)
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"locked\n"
        [result] = mbox_backend.deliver_sync(make_message(tmp_path, b"x\r\n"), [rcpt("erin@example.org")])
    finally:
        holder.communicate(b"")
    assert result.status == DEFERRED
    assert "fcntl" in result.text
    assert path.read_bytes() == b""
    assert not Path(str(path) + ".lock").exists()      # our dot-lock was released
    [result] = mbox_backend.deliver_sync(make_message(tmp_path, b"x\r\n"), [rcpt("erin@example.org")])
    assert result.status == DELIVERED


def test_write_error_truncates_back_to_the_old_size(tmp_path, monkeypatch):
    mbox_backend = backend(tmp_path)
    path = tmp_path / "mail" / "example.org" / "frank"
    mbox_backend.deliver_sync(make_message(tmp_path, b"first\r\n"), [rcpt("frank@example.org")])
    before = path.read_bytes()
    real_write_all = mbox_module._write_all
    calls = []

    def disk_fills_up(fd, data):
        calls.append(len(data))
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write_all(fd, data)
    monkeypatch.setattr(mbox_module, "_write_all", disk_fills_up)
    big = b"Subject: big\r\n\r\n" + b"x" * 200 + b"\r\n" * 2000 + b"y" * 300_000
    [result] = mbox_backend.deliver_sync(make_message(tmp_path, big), [rcpt("frank@example.org")])
    assert len(calls) == 2 and calls[0] >= 64 * 1024        # half a message had been written
    assert result.status == DEFERRED
    assert result.enhanced == "4.3.1"
    assert path.read_bytes() == before
    assert not Path(str(path) + ".lock").exists()


# -- two processes ------------------------------------------------------------------------

APPENDER = textwrap.dedent("""
    import os, sys, time
    from pymta.delivery.mbox import MboxBackend
    from pymta.envelope import Envelope, Recipient
    from pymta.spool.message import SpooledMessage

    base, marker, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]

    class Context:
        hostname = "mx.example.org"
        reactor = None
        def resolve_path(self, path):
            return path

    backend = MboxBackend({"base": base, "layout": "shared"}, Context())
    while not os.path.exists(go):
        time.sleep(0.001)
    for n in range(count):
        body_path = os.path.join(base, f"body-{marker}-{n}")
        line = f"{marker} {n} ".encode() * 20 + b"\\r\\n"
        with open(body_path, "wb") as f:
            f.write(b"Subject: " + marker.encode() + b"\\r\\n\\r\\n" + line * 10000)
        envelope = Envelope("Q", marker + "@example.net", [], 0.0, size=os.path.getsize(body_path))
        [result] = backend.deliver_sync(SpooledMessage(envelope, body_path),
                                        [Recipient("x@example.org", "x@example.org", "local")])
        assert result.status == "delivered", result
        os.unlink(body_path)
        time.sleep(0.01)   # independent deliveries, not one writer hogging the lock
""")


def test_concurrent_appends_from_two_processes_do_not_interleave(tmp_path):
    script = tmp_path / "appender.py"
    script.write_text(APPENDER)
    base = tmp_path / "mail"
    base.mkdir()
    go = tmp_path / "go"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    children = [subprocess.Popen([sys.executable, str(script), str(base), marker, "10", str(go)], env=env)
                for marker in ("AAAA", "BBBB")]
    time.sleep(0.2)
    go.write_text("")
    for child in children:
        assert child.wait(timeout=60) == 0
    messages = read_mbox(base / "shared")
    assert len(messages) == 20
    seen = {"AAAA": [], "BBBB": []}
    for from_line, message in messages:
        marker = FROM_LINE.match(from_line).group(1).decode().split("@")[0]
        header, _, body = message.partition(b"\n\n")
        lines = body.split(b"\n")[:-1]
        n = int(lines[0].split()[1])
        assert lines == [f"{marker} {n} ".encode() * 20] * 10000, "interleaved or damaged message"
        assert header.endswith(b"Subject: " + marker.encode())
        seen[marker].append(n)
    assert seen == {"AAAA": list(range(10)), "BBBB": list(range(10))}
