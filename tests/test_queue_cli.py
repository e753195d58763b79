"""``pymta queue`` against a real server (twistd) over its control socket.

Messages are put in each state by real next hops: *deferred* by a
smarthost that answers RCPT with 451 (or a closed port), *active* by one
that holds the transaction at RCPT until the test lets it answer, *held*
by ``pymta queue hold``.  Every verb is run as the admin runs it: the
``pymta`` command in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import BACKEND_TOML, routes_toml
from test_queue_rm_e2e import HeldNextHop, wait_for

PYMTA = str(Path(sys.executable).parent / "pymta")


def config_toml(deferring_port: int, holding_port: int, out: str = "out") -> str:
    """Local mail for example.test; hold.example through the holding hop; the rest through
    the deferring one (backend ``out``).  Retries wait an hour: a deferred message stays so."""
    return f"""
[queue]
retry_initial = "1h"
retry_max = "2h"
""" + BACKEND_TOML + f"""
[backends.{out}]
use = "smarthost"
host = "127.0.0.1:{deferring_port}"
tls = "none"
dead_destination_time = 0

[backends.holding]
use = "smarthost"
host = "127.0.0.1:{holding_port}"
tls = "none"
dead_destination_time = 0
""" + routes_toml(("example.test", "local"), ("hold.example", "holding"), ("*", out))


@pytest.fixture
def hops():
    """(the deferring next hop: 451 at RCPT, the holding one: waits at RCPT)."""
    deferring = HeldNextHop(b"451 4.3.0 try again later")
    deferring.release.set()
    holding = HeldNextHop(b"451 4.3.0 try again later")
    yield deferring, holding
    for hop in (deferring, holding):
        hop.release.set()
        hop.shutdown()
        hop.server_close()


@pytest.fixture
def srv(make_server, hops):
    deferring, holding = hops
    return make_server(config_toml(deferring.port, holding.port))


def queue(srv, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([PYMTA, "queue", *args, "--config", str(srv.config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == expect, (result, srv.log_text()[-3000:])
    return result


def listing(srv, *filters: str) -> dict:
    return json.loads(queue(srv, "list", "--json", *filters).stdout)


def ids(srv, *filters: str) -> list[str]:
    return [m["id"] for m in listing(srv, *filters)["messages"]]


def send(srv, to: str, sender: str = "alice@example.test", body: str = "hello") -> str:
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.ehlo()
        s.mail(sender)
        s.rcpt(to)
        code, text = s.data(f"Subject: test for {to}\r\n\r\n{body}\r\n".encode())
    assert code == 250, text
    return re.search(rb"queued as (\w+)", text)[1].decode()


def message(srv, qid: str) -> dict | None:
    return next((m for m in listing(srv)["messages"] if m["id"] == qid), None)


def deferred(srv, to: str, **kw) -> str:
    """A message deferred once by the deferring hop."""
    qid = send(srv, to, **kw)
    wait_for(lambda: (message(srv, qid) or {}).get("state") == "deferred", f"{qid} deferred")
    return qid


def active(srv, holding, to: str = "z@hold.example", **kw) -> str:
    qid = send(srv, to, **kw)
    assert holding.at_rcpt.wait(20), "the server did not reach RCPT"
    return qid


# -- list and show ---------------------------------------------------------------------------

def test_list_shows_every_state_and_filters(srv, hops):
    deferring, holding = hops
    late = deferred(srv, "x@remote.example")
    kept = deferred(srv, "y@remote.example")
    queue(srv, "hold", kept)
    busy = active(srv, holding, sender="bob@example.test")

    text = queue(srv, "list").stdout
    assert re.search(rf"^{late} +\d+  [-\d]+ [:\d]+  deferred  <alice@example.test>$", text, re.M), text
    assert re.search(rf"^{kept} .* held +<alice@example.test>$", text, re.M), text
    assert re.search(rf"^{busy} .* active +<bob@example.test>$", text, re.M), text
    assert "    x@remote.example  deferred, 1 attempt, next try 20" in text
    assert "        (451 4.3.0 host 127.0.0.1[127.0.0.1]:" in text and "said: try again later" in text
    assert "    z@hold.example  active" in text
    assert f"    held: held by uid {os.getuid()} (pymta queue hold)" in text
    assert re.search(r"^-- 3 messages \(1 held, 1 active, 1 deferred\), \d+ bytes, oldest \d+s$",
                     text, re.M), text

    data = listing(srv)
    assert data["summary"]["messages"] == 3 and data["summary"]["held"] == 1
    rows = {m["id"]: m for m in data["messages"]}
    rcpt = rows[late]["recipients"][0]
    assert rcpt["state"] == "deferred" and rcpt["attempts"] == 1 and rcpt["route"] == "out"
    assert rcpt["next_try"] > time.time() + 3000 and rcpt["last_result"].startswith("451 4.3.0")
    assert rows[kept]["held"].startswith("held by uid")

    assert ids(srv, "--held") == [kept]
    assert ids(srv, "--deferred") == [late]
    assert ids(srv, "--domain", "hold.example") == [busy]
    assert ids(srv, "--domain", "@example") == [late, kept, busy]    # its subdomains
    assert ids(srv, "--domain", "example") == []
    assert ids(srv, "--rcpt", "X@remote.example") == [late]
    assert ids(srv, "--sender", "bob@example.test") == [busy]
    assert ids(srv, "--sender", "alice@example.test", "--domain", "remote.example") == [late, kept]
    assert queue(srv, "list", "--sender", "nobody@example.test").stdout == "-- queue empty\n"


def test_show_envelope_header_and_body(srv):
    qid = deferred(srv, "x@remote.example", body="the body line")
    out = queue(srv, "show", qid).stdout
    assert f"{qid} " in out and "x@remote.example  deferred" in out
    assert "\nclient: localhost[127.0.0.1], helo=<" in out and ">, protocol=ESMTP\n" in out
    assert "Received: from " in out and "Subject: test for x@remote.example" in out
    assert "the body line" not in out
    out = queue(srv, "show", qid, "--body").stdout
    assert out.rstrip().endswith("the body line")


# -- hold, release, flush, requeue ---------------------------------------------------------------

def test_hold_is_kept_across_a_restart_until_released(srv, hops):
    deferring, _ = hops
    qid = deferred(srv, "x@remote.example")
    assert deferring.transactions == 1
    assert queue(srv, "hold", qid).stdout == "held 1 message\n"
    assert f"{qid}: held by uid {os.getuid()} (pymta queue hold)" in srv.log_text()
    queue(srv, "flush", "--all")
    out = queue(srv, "flush", qid, expect=0).stdout
    assert out == f"flushed 0 messages\n{qid}: not flushed: held; release it first\n"
    srv.stop()
    srv.start()
    assert message(srv, qid)["state"] == "held"
    queue(srv, "flush", "--all")
    time.sleep(0.5)
    assert deferring.transactions == 1                     # never tried while held
    assert queue(srv, "hold", qid).stdout == f"held 0 messages\n{qid}: not held: already held\n"

    assert queue(srv, "release", qid).stdout == "released 1 message\n"
    assert f"{qid}: released by uid {os.getuid()} (pymta queue release)" in srv.log_text()
    assert message(srv, qid)["state"] == "deferred"
    deferring.rcpt_reply = b"250 2.1.5 ok"
    assert queue(srv, "flush", qid).stdout == "flushed 1 message\n"
    wait_for(lambda: message(srv, qid) is None, "the delivery")
    assert deferring.transactions == 2
    assert queue(srv, "release", qid, expect=1).stderr == f"pymta: no message {qid} in the queue\n"


def test_hold_release_requeue_by_filter(srv):
    one = deferred(srv, "x@remote.example")
    two = deferred(srv, "y@other.example")
    assert queue(srv, "hold", "--domain", "other.example").stdout == "held 1 message\n"
    assert ids(srv, "--held") == [two]
    assert queue(srv, "hold", "--all").stdout == f"held 1 message\n{two}: not held: already held\n"
    assert queue(srv, "release", "--held").stdout == "released 2 messages\n"
    assert ids(srv, "--held") == []
    assert queue(srv, "requeue", "--deferred").stdout == "requeued 2 messages\n"
    assert sorted(ids(srv)) == sorted([one, two])
    err = queue(srv, "hold", expect=1).stderr
    assert err.startswith("pymta queue: name the messages: an ID, --all, or a filter")
    err = queue(srv, "hold", one, "--all", expect=1).stderr
    assert err == "pymta queue: give message ids, or --all, or filters; not several of them\n"


def test_flush_by_domain(srv, hops):
    deferring, _ = hops
    one = deferred(srv, "x@remote.example")
    two = deferred(srv, "y@other.example")
    deferring.rcpt_reply = b"250 2.1.5 ok"
    queue(srv, "flush", "--domain", "other.example")
    wait_for(lambda: ids(srv) == [one], "the delivery of the other.example message")
    assert f"flush of other.example by uid {os.getuid()} (pymta queue flush): 1 message(s) due now" \
        in srv.log_text()
    assert queue(srv, "flush", expect=1).stderr == \
        "pymta queue: give one of: message ids, --domain D, --all\n"
    queue(srv, "flush", "--all")
    wait_for(lambda: ids(srv) == [], "the delivery of the rest")
    assert two != one


def test_requeue_resets_the_backoff_and_routes_again(make_server, hops, tmp_path):
    """A message routed to a backend the new config no longer has goes out by the new route."""
    deferring, holding = hops
    closed = HeldNextHop(b"451 4.3.0 no")            # reuse a free port: then close it
    port = closed.port
    closed.shutdown()
    closed.server_close()
    srv = make_server(config_toml(port, holding.port))
    qid = deferred(srv, "x@remote.example")
    queue(srv, "flush", qid)
    wait_for(lambda: message(srv, qid)["recipients"][0]["attempts"] == 2, "a second attempt")
    srv.stop()
    deferring.rcpt_reply = b"250 2.1.5 ok"
    srv.config.write_text(srv.config.read_text().replace(
        config_toml(port, holding.port), config_toml(deferring.port, holding.port, out="relay2")))
    srv.start()
    row = message(srv, qid)["recipients"][0]
    assert row["route"] == "out" and row["attempts"] == 2        # waits for its retry
    assert queue(srv, "requeue", qid).stdout == "requeued 1 message\n"
    wait_for(lambda: message(srv, qid) is None, "the delivery by the new route")
    assert deferring.transactions == 1
    log = srv.log_text()
    assert f"{qid}: requeued by uid {os.getuid()} (pymta queue requeue)" in log
    assert re.search(rf"{qid}: to=<x@remote.example>, relay=relay2\[.*status=sent", log), log


# -- delete and bounce --------------------------------------------------------------------------

def test_delete(srv):
    one = deferred(srv, "x@remote.example")
    two = deferred(srv, "y@remote.example")
    queue(srv, "hold", two)
    assert queue(srv, "delete", one).stdout == "deleted 1 message\n"
    assert f"{one}: deleted by uid {os.getuid()} (pymta queue delete)" in srv.log_text()
    assert not list((srv.spool / "queue").glob(f"{one}.*"))
    assert queue(srv, "delete", "--all", expect=1).stderr == \
        "pymta queue: delete --all removes every message in the queue: add --yes\n"
    assert ids(srv) == [two]
    assert queue(srv, "delete", "--all", "--yes").stdout == "deleted 1 message\n"   # held too
    assert ids(srv) == []
    assert not list((srv.spool / "queue").iterdir())
    log = srv.log_text()
    assert "non-delivery" not in log and "Traceback" not in log


@pytest.mark.parametrize("reply", [b"250 2.1.5 ok", b"451 4.3.0 later", b"550 5.1.1 no such user"])
def test_delete_during_its_delivery(srv, hops, reply):
    """Deleted while the next hop holds RCPT: the attempt ends, its result is dropped, the
    message is removed once: no retry, no bounce, not back after a restart."""
    _, holding = hops
    holding.rcpt_reply = reply
    qid = active(srv, holding)
    out = queue(srv, "delete", qid).stdout
    assert out == f"deleted 1 message\n{qid}: deleted (removed when the delivery in flight ends)\n"
    assert qid not in ids(srv)
    holding.release.set()
    wait_for(lambda: f"{qid}: removed" in srv.log_text(), "the removal")
    wait_for(lambda: not list((srv.spool / "queue").glob(f"{qid}.*")), "the files to go")
    queue(srv, "flush", "--all")
    srv.stop()
    log = srv.log_text()
    assert log.count(f"{qid}: removed") == 1
    for problem in ("non-delivery", "behind the server's back", "Traceback", "failed"):
        assert problem not in log, log
    # the attempt is logged as it happened (the next hop may have the message), and
    # nothing follows from it: no update, no bounce, no retry
    assert log.count(f"{qid}: to=<z@hold.example>") == 1
    assert "notification" not in log
    assert holding.transactions == 1
    srv.start()
    assert ids(srv) == []


@pytest.mark.parametrize("reply", [b"451 4.3.0 later", b"250 2.1.5 ok"])
def test_hold_during_its_delivery(srv, hops, reply):
    """Held while the next hop holds RCPT: the attempt is recorded; deferred, it stays held."""
    _, holding = hops
    holding.rcpt_reply = reply
    qid = active(srv, holding)
    assert queue(srv, "hold", qid).stdout == \
        f"held 1 message\n{qid}: held (the delivery in flight finishes)\n"
    assert message(srv, qid)["state"] == "held"
    holding.release.set()
    if reply.startswith(b"250"):             # delivered: nothing left to hold
        wait_for(lambda: message(srv, qid) is None, "the removal")
        assert f"{qid}: removed" in srv.log_text()
        return
    wait_for(lambda: message(srv, qid)["recipients"][0]["attempts"] == 1, "the attempt recorded")
    row = message(srv, qid)
    assert row["state"] == "held" and row["recipients"][0]["state"] == "deferred"
    queue(srv, "flush", "--all")
    srv.stop()
    srv.start()
    assert message(srv, qid)["state"] == "held"
    time.sleep(0.5)
    assert holding.transactions == 1
    assert "Traceback" not in srv.log_text()


def test_bounce_returns_the_message_to_its_sender(srv):
    qid = deferred(srv, "x@remote.example", sender="alice@example.test")
    out = queue(srv, "bounce", qid, "--reason", "spam run, not delivered")
    assert out.stdout == "bounced 1 message\n"
    dsn = srv.delivered("alice@example.test")
    assert len(dsn) == 1
    text = dsn[0].decode()
    assert "Action: failed" in text and "Final-Recipient: rfc822; x@remote.example" in text
    assert "550 5.0.0 spam run, not delivered" in text
    wait_for(lambda: ids(srv) == [], "the removal")
    log = srv.log_text()
    assert f"{qid}: bounced by uid {os.getuid()} (pymta queue bounce)" in log
    assert f"{qid}: to=<x@remote.example>, relay=none, " in log


def test_bounce_during_its_delivery(srv, hops):
    """Bounced while the next hop holds RCPT: the recipient fails when that attempt defers."""
    _, holding = hops
    qid = active(srv, holding)
    other = deferred(srv, "x@remote.example")
    assert queue(srv, "bounce", qid).stdout == \
        f"bounced 1 message\n{qid}: bounced (recipients in flight fail when their attempt ends)\n"
    assert queue(srv, "flush", "--all").stdout == "flushed 1 message\n"     # not the one in flight
    holding.release.set()
    text = srv.delivered("alice@example.test")[0].decode()
    assert "Final-Recipient: rfc822; z@hold.example" in text
    assert "550 5.0.0 returned to the sender by the mail administrator" in text
    wait_for(lambda: ids(srv) == [other], "the removal")
    assert holding.transactions == 1


# -- bad input -------------------------------------------------------------------------------------

def test_unknown_id(srv):
    for verb in ("show", "hold", "release", "delete", "requeue", "bounce", "flush"):
        result = queue(srv, verb, "1K0TJKT10CTYC13Z", expect=1)
        assert result.stderr == "pymta: no message 1K0TJKT10CTYC13Z in the queue\n", verb
        assert result.stdout == ""


def test_server_not_running_offline_list_and_show(srv):
    qid = deferred(srv, "x@remote.example", body="offline body")
    held = deferred(srv, "y@remote.example")
    queue(srv, "hold", held)
    socket_path = srv.spool / "control.sock"
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o660
    assert socket_path.stat().st_uid == os.getuid()
    srv.stop()
    assert not socket_path.exists()
    result = queue(srv, "hold", qid, expect=1)
    assert result.stderr == ("pymta queue: the server is not running (nothing listens on the "
                             f"control socket {socket_path})\n")
    result = queue(srv, "list")
    assert result.stderr == ("pymta queue: the server is not running (nothing listens on the "
                             f"control socket {socket_path}); reading the spool {srv.spool} "
                             "directly\n")
    assert re.search(rf"^{qid} .* deferred  <alice@example.test>$", result.stdout, re.M)
    assert re.search(rf"^{held} .* held +<alice@example.test>$", result.stdout, re.M)
    assert "-- 2 messages (1 held, 1 deferred)" in result.stdout
    assert ids(srv, "--held") == [held]
    assert queue(srv, "show", qid, "--body").stdout.rstrip().endswith("offline body")
    assert queue(srv, "show", "NOPE", expect=1).stderr.endswith(
        "pymta: no message NOPE in the queue\n")


def test_stale_socket_after_kill9_is_replaced(srv):
    qid = deferred(srv, "x@remote.example")
    srv.kill9()
    assert (srv.spool / "control.sock").exists()
    srv.start()
    assert ids(srv) == [qid]
    assert "Traceback" not in srv.log_text()


def test_socket_option_and_missing_socket(srv, tmp_path):
    result = subprocess.run([PYMTA, "queue", "list", "--socket", str(srv.spool / "control.sock")],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "-- queue empty\n", result
    missing = tmp_path / "nothing.sock"
    result = subprocess.run([PYMTA, "queue", "delete", "--all", "--yes", "--socket", str(missing)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr == ("pymta queue: the server is not running (nothing listens on the "
                             f"control socket {missing})\n")


def test_a_server_that_does_not_answer(tmp_path):
    """A socket that takes the connection and says nothing: one line, not a hang."""
    path = tmp_path / "mute.sock"
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(path))
    mute.listen(5)
    code = ("import sys; from pymta.control import client; client.ANSWER_TIMEOUT = 1; "
            "from pymta.admin import main; sys.exit(main())")
    try:
        result = subprocess.run([sys.executable, "-c", code, "queue", "hold", "--all",
                                 "--socket", str(path)], capture_output=True, text=True,
                                timeout=60, cwd=tmp_path)
    finally:
        mute.close()
    assert result.returncode == 1
    assert result.stderr == (f"pymta queue: the server did not answer on the control socket "
                             f"{path} within 1 s\n")


def test_offline_listing_skips_what_it_cannot_read_as_a_message(tmp_path):
    """A spool being written or damaged: partial files in tmp/, a message file without its
    trailer (a lone commit cut short by a crash), an envelope of another shape (a later
    version's field after a rollback): skipped, as the server's recovery quarantines them."""
    from pymta.control import offline
    from pymta.envelope import Envelope, Recipient
    from pymta.spool.queuefile import encode_envelope, queue_file_content, trailer
    from pymta.spool.queueid import new_queue_id
    queue_dir, tmp_dir = tmp_path / "queue", tmp_path / "tmp"
    queue_dir.mkdir()
    tmp_dir.mkdir()

    def envelope() -> Envelope:
        return Envelope(new_queue_id(), "a@example.test",
                        [Recipient("b@example.test", "b@example.test", "local")], time.time())
    good = envelope()
    (queue_dir / f"{good.queue_id}.msg").write_bytes(queue_file_content(b"hello\r\n", good))
    (tmp_dir / f"{envelope().queue_id}.msg").write_bytes(b"Subject: half")
    cut_short = envelope()
    (queue_dir / f"{cut_short.queue_id}.msg").write_bytes(
        queue_file_content(b"hello\r\n", cut_short)[:-20])
    later = envelope()
    data = json.dumps({**json.loads(encode_envelope(later)), "a_later_field": 1}).encode()
    (queue_dir / f"{later.queue_id}.msg").write_bytes(b"hello\r\n" + data + trailer(data))
    no_recipients = envelope()
    data = json.dumps({k: v for k, v in json.loads(encode_envelope(no_recipients)).items()
                       if k != "recipients"}).encode()
    (queue_dir / f"{no_recipients.queue_id}.msg").write_bytes(b"hello\r\n" + data + trailer(data))
    assert [e.queue_id for e, busy in offline.entries(str(tmp_path))] == [good.queue_id]
