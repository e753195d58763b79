"""A recipient that fails permanently produces a bounce to the sender, through the real server."""

from __future__ import annotations

import json
import re
import smtplib
import time

from conftest import BACKEND_TOML, ROOT, routes_toml

PLUGIN_PATH = f'plugin_path = ["{ROOT / "tests" / "plugins"}"]'
REFUSE_TOML = BACKEND_TOML + '\n[backends.refuse]\nuse = "test_policies:RefuseAll"\n'


def test_permanent_failure_bounces_to_sender(make_server):
    srv = make_server(REFUSE_TOML + routes_toml(("nobody@example.test", "refuse"), ("example.test", "local")),
                      server_toml=PLUGIN_PATH)
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("alice@example.test", ["nobody@example.test"],
                   b"Subject: doomed\r\nMessage-ID: <doomed@example.test>\r\n\r\nhello\r\n")
    [bounce] = srv.delivered("alice@example.test", timeout=20)
    assert bounce.startswith(b"Return-Path: <>\r\n")
    assert b"multipart/report" in bounce and b"report-type=delivery-status" in bounce
    assert b"Final-Recipient: rfc822; nobody@example.test" in bounce
    assert b"Action: failed" in bounce and b"Status: 5." in bounce
    assert b"Subject: doomed" in bounce          # the original is returned


def test_a_failed_postmaster_notification_is_held_in_the_queue_across_a_restart(make_server):
    """A double bounce the postmaster's route refuses: kept in the queue, held; never discarded."""
    srv = make_server('''
[queue]
retry_initial = 0.5
retry_max = 0.5
lifetime = 2
''' + REFUSE_TOML + routes_toml(("nobody@example.test", "refuse"), ("postmaster@example.test", "refuse"),
                                ("example.test", "local")), server_toml=PLUGIN_PATH)
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("", ["nobody@example.test"], b"Subject: doomed\r\n\r\nhello\r\n")
    queue = srv.spool / "queue"
    held = re.compile(r"(\w+): held: undeliverable postmaster notification: "
                      r"<postmaster@example\.test>: 550 5\.1\.1 no such user here \(test backend\); "
                      r"kept in the queue, neither retried nor expired, until an administrator "
                      r"releases or removes it")
    deadline = time.monotonic() + 20
    while not held.search(srv.log_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    log = srv.log_text()
    [copy_id] = held.findall(log)
    assert "discarded" not in log
    time.sleep(3)                      # past the lifetime, six retry intervals
    srv.stop()
    assert sorted(p.name for p in queue.iterdir()) == [f"{copy_id}.env", f"{copy_id}.msg"]
    envelope = json.loads((queue / f"{copy_id}.env").read_bytes())
    assert envelope["held"].startswith("undeliverable postmaster notification")
    assert envelope["notification"] == "postmaster"
    srv.start()                        # recovery keeps it held: no attempt
    deadline = time.monotonic() + 20
    while f"{copy_id}: held (" not in srv.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(2)
    srv.stop()
    log = srv.log_text()
    assert f"{copy_id}: held (undeliverable postmaster notification: " in log
    assert log.count(f"{copy_id}: to=<postmaster@example.test>") == 1      # one attempt, ever
    assert "Traceback" not in log
    assert sorted(p.name for p in queue.iterdir()) == [f"{copy_id}.env", f"{copy_id}.msg"]
