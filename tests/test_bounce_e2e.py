"""A recipient that fails permanently produces a bounce to the sender, through the real server."""

from __future__ import annotations

import smtplib

from conftest import ROOT

PLUGIN_PATH = f'plugin_path = ["{ROOT / "tests" / "plugins"}"]'


def test_permanent_failure_bounces_to_sender(make_server):
    srv = make_server('''
[backends.local]
use = "maildir"
base = "mail"

[backends.refuse]
use = "test_policies:RefuseAll"

[[routes]]
match = "nobody@example.test"
backend = "refuse"

[[routes]]
match = "example.test"
backend = "local"
''', server_toml=PLUGIN_PATH)
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("alice@example.test", ["nobody@example.test"],
                   b"Subject: doomed\r\nMessage-ID: <doomed@example.test>\r\n\r\nhello\r\n")
    [bounce] = srv.delivered("alice@example.test", timeout=20)
    assert bounce.startswith(b"Return-Path: <>\r\n")
    assert b"multipart/report" in bounce and b"report-type=delivery-status" in bounce
    assert b"Final-Recipient: rfc822; nobody@example.test" in bounce
    assert b"Action: failed" in bounce and b"Status: 5." in bounce
    assert b"Subject: doomed" in bounce          # the original is returned
