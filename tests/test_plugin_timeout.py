"""Plugin timeouts, plugin header checks and the end-of-DATA reject log, over loopback.

A site plugin whose Deferred never fires (tests/plugins/hanging_plugins.py)
must cost the client one 451 4.3.0, not the session; a late answer must not
touch the session; a plugin's bad header field is refused, never written.
"""

from __future__ import annotations

import smtplib
import time

import pytest

from conftest import BACKEND_TOML, ROOT, free_port
from smtpwire import Wire

PLUGIN_PATH = f'plugin_path = ["{ROOT / "tests" / "plugins"}"]'
HANG = """
[limits]
plugin_timeout = "0.5s"

[stages]
mail = ["hang"]
rcpt = ["hang", "localdomain"]
data = ["hang"]

[plugins.hang]
use = "hanging_plugins:Hang"
"""
TIMED_OUT = (451, b"4.3.0 Error: plugin timeout; try again later")


@pytest.fixture
def hanging(make_server):
    return make_server(BACKEND_TOML + HANG, server_toml=PLUGIN_PATH)


def message(subject: str) -> bytes:
    return f"Subject: {subject}\r\nMessage-ID: <{subject}@example.org>\r\n\r\nbody\r\n".encode()


def wait_for(srv, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in srv.log_text() and time.monotonic() < deadline:
        time.sleep(0.05)
    return srv.log_text()


def test_rcpt_plugin_that_never_answers_gets_451_and_the_session_goes_on(hanging):
    with smtplib.SMTP("127.0.0.1", hanging.port, timeout=10) as s:
        s.ehlo("client.example")
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt("hang@example.test") == TIMED_OUT
        assert s.rcpt("kim@example.test")[0] == 250           # the next command works
        assert s.data(message("fine"))[0] == 250
    [msg] = hanging.delivered("kim@example.test")
    assert b"Subject: fine" in msg
    log = hanging.log_text()
    assert "plugin hang (hanging_plugins:Hang) timed out after 0.5s in rcpt (check_recipient)" in log
    assert ("NOQUEUE: reject: RCPT from localhost[127.0.0.1]:" in log
            and "451 4.3.0 Error: plugin timeout; try again later; from=<a@example.org> "
                "to=<hang@example.test> proto=ESMTP helo=<client.example>" in log)
    assert "Traceback" not in log


def test_mail_and_data_plugins_that_never_answer_get_451(hanging):
    with smtplib.SMTP("127.0.0.1", hanging.port, timeout=10) as s:
        s.ehlo("client.example")
        assert s.mail("hang@example.org") == TIMED_OUT
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt("lee@example.test")[0] == 250
        assert s.data(message("hang")) == TIMED_OUT
        # the transaction is over; a new one goes through
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt("lee@example.test")[0] == 250
        assert s.data(message("second"))[0] == 250
    [msg] = hanging.delivered("lee@example.test")
    assert b"Subject: second" in msg
    log = hanging.log_text()
    assert "timed out after 0.5s in mail (check_sender)" in log
    assert "timed out after 0.5s in data (check_message)" in log
    assert ("NOQUEUE: reject: DATA from localhost[127.0.0.1]:" in log and
            "451 4.3.0 Error: plugin timeout; try again later; from=<a@example.org> "
            "to=<lee@example.test> proto=ESMTP helo=<client.example>" in log)


def test_an_answer_after_the_timeout_is_ignored(hanging):
    with smtplib.SMTP("127.0.0.1", hanging.port, timeout=10) as s:
        s.ehlo("client.example")
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt("late@example.test") == TIMED_OUT
        assert s.rcpt("max@example.test")[0] == 250
        time.sleep(1.5)                       # the late "550 late recipient" fires meanwhile
        assert s.noop()[0] == 250
        assert s.rcpt("nina@example.test")[0] == 250
        assert s.data(message("after-late"))[0] == 250
        # and in the data stage: the late 554 arrives while the next transaction runs
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt("max@example.test")[0] == 250
        assert s.data(message("late")) == TIMED_OUT
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt("max@example.test")[0] == 250
        time.sleep(1.5)
        assert s.data(message("after-late-data"))[0] == 250
    delivered = hanging.delivered("max@example.test", count=2)
    assert [b"after-late" in m for m in delivered] == [True, True]
    assert len(hanging.delivered("nina@example.test")) == 1
    log = hanging.log_text()
    assert "late recipient" not in log and "late message" not in log
    assert "Unhandled" not in log and "Traceback" not in log and "AlreadyCalled" not in log


def test_connect_and_helo_plugins_that_never_answer(make_server):
    srv = make_server(BACKEND_TOML + """
[limits]
plugin_timeout = "0.5s"

[stages]
connect = ["hang"]
helo = ["hang"]

[plugins.hang]
use = "hanging_plugins:HangOnConnect"
""", server_toml=PLUGIN_PATH)
    refused = Wire(srv.port)                     # the 2nd connection: the connect stage hangs
    assert refused.banner == (451, ["4.3.0 Error: plugin timeout; try again later"])
    assert refused.closed_by_server()
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as s:      # the 3rd is let in
        assert s.helo("hang.example") == TIMED_OUT
        assert s.ehlo("client.example")[0] == 250
        assert s.mail("a@example.org")[0] == 250
        assert s.rcpt("uma@example.test")[0] == 250
        assert s.data(message("after-helo"))[0] == 250
    gone = Wire(srv.port, read_banner=False)     # the 4th leaves while its plugin thinks
    gone.sock.close()
    log = wait_for(srv, "timed out after 0.5s in connect", timeout=5)
    time.sleep(1.0)
    log = srv.log_text()
    assert log.count("timed out after 0.5s in connect (check_connect)") == 2
    assert "timed out after 0.5s in helo (check_helo)" in log
    assert "NOQUEUE: reject: CONNECT from localhost[127.0.0.1]:" in log
    assert "NOQUEUE: reject: HELO from localhost[127.0.0.1]:" in log and "helo=<hang.example>" in log
    assert "Traceback" not in log and "Unhandled" not in log
    assert len(srv.delivered("uma@example.test")) == 1
    assert Wire(srv.port).banner[0] == 220       # the 5th: still serving


def test_auth_checker_that_never_answers_gets_454(make_server):
    auth_port = free_port()
    srv = make_server(BACKEND_TOML + f"""
[[listeners]]
name = "auth"
endpoint = "tcp:{auth_port}:interface=127.0.0.1"
role = "mx"
auth = true
auth_plaintext = true

[limits]
plugin_timeout = "0.5s"
auth_failure_delay = 0

[stages]
auth = ["hang"]

[plugins.hang]
use = "hanging_plugins:HangingChecker"
""", server_toml=PLUGIN_PATH)
    with smtplib.SMTP("127.0.0.1", auth_port, timeout=10) as s:
        s.ehlo("laptop.example")
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:
            s.login("hang", "secret")
        assert (e.value.smtp_code, e.value.smtp_error[:5]) == (454, b"4.7.0")
        with pytest.raises(smtplib.SMTPAuthenticationError) as e:   # the session goes on
            s.login("nobody", "x")
        assert e.value.smtp_code == 535
        assert s.noop()[0] == 250
    log = srv.log_text()
    assert "plugin hang (hanging_plugins:HangingChecker) timed out after 0.5s in auth " \
        "(requestAvatarId)" in log
    assert "Traceback" not in log


def test_pipelined_commands_wait_behind_a_hanging_plugin_and_stay_in_order(hanging):
    w = Wire(hanging.port)
    w.send(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<hang@example.test>\r\n"
           b"RCPT TO:<olga@example.test>\r\nDATA\r\n")
    assert [code for code, _ in w.replies(5)] == [250, 250, 451, 250, 354]
    assert w.cmd(b"Subject: p\r\n\r\nx\r\n.")[0] == 250
    assert len(hanging.delivered("olga@example.test")) == 1


@pytest.mark.parametrize("subject, field", [("bad-lf", "'X-Bad'"), ("bad-name", "'X Bad'"),
                                            ("bad-long", "'X-Bad'")])
def test_a_bad_header_field_from_a_plugin_is_refused_and_never_written(hanging, subject, field):
    with smtplib.SMTP("127.0.0.1", hanging.port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail("a@example.org")
        s.rcpt("pia@example.test")
        assert s.data(message(subject)) == (451, b"4.3.5 Server configuration problem; try again later")
        assert s.noop()[0] == 250
    log = hanging.log_text()
    line = next(l for l in log.splitlines() if "bad header change" in l)
    assert "plugin hang (hanging_plugins:Hang)" in line and field in line
    assert "NOQUEUE: reject: DATA from localhost[127.0.0.1]:" in log and "451 4.3.5" in log
    time.sleep(0.3)
    assert not list((hanging.spool / "queue").glob("*.msg"))
    assert hanging.delivered("pia@example.test", timeout=0.3) == []
    assert b"Injected" not in b"".join(p.read_bytes() for p in hanging.spool.rglob("*") if p.is_file())


# ------------------------------------------------------- end-of-DATA reject log
def test_bare_newline_rejection_is_logged(make_server):
    server = make_server(BACKEND_TOML + '\n[limits]\nbare_newlines = "reject"\n')
    w = Wire(server.port)
    w.cmd("EHLO c.example")
    w.cmd("MAIL FROM:<a@example.org>")
    w.cmd("RCPT TO:<quinn@example.test>")
    assert w.cmd("DATA")[0] == 354
    code, text = w.cmd(b"Subject: x\r\n\r\nbare\nline\r\n.")
    assert (code, text[:6]) == (550, "5.6.11")
    log = wait_for(server, "NOQUEUE: reject: DATA")
    assert ("NOQUEUE: reject: DATA from localhost[127.0.0.1]:" in log and
            ": 550 5.6.11 Error: message contains bare <CR> or <LF>; lines must end with <CR><LF>; "
            "from=<a@example.org> to=<quinn@example.test> proto=ESMTP helo=<c.example>" in log)
    # BDAT: the same rule, logged under its command; two recipients: nrcpt, no to=
    w.cmd("MAIL FROM:<b@example.org>")
    w.cmd("RCPT TO:<quinn@example.test>")
    w.cmd("RCPT TO:<rae@example.test>")
    body = b"Subject: y\r\n\r\nbare\rcr\r\n"
    code, text = w.cmd(b"BDAT %d LAST\r\n" % len(body) + body[:-2])
    assert (code, text[:6]) == (550, "5.6.11")
    log = wait_for(server, "NOQUEUE: reject: BDAT")
    assert ("NOQUEUE: reject: BDAT from localhost[127.0.0.1]:" in log and
            "; from=<b@example.org> nrcpt=2 proto=ESMTP helo=<c.example>" in log)


def test_line_too_long_and_size_rejections_are_logged(make_server):
    srv = make_server(BACKEND_TOML + "\n[limits]\nmax_message_size = 3000\n")
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail("a@example.org")
        s.rcpt("sam@example.test")
        assert s.data(b"Subject: long\r\n\r\n" + b"x" * 1200 + b"\r\n")[:1] == (550,)
        s.mail("a@example.org")
        s.rcpt("sam@example.test")
        assert s.data(b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 50)[0] == 552
    log = wait_for(srv, "552 5.3.4")
    rejects = [l for l in log.splitlines() if "NOQUEUE: reject: DATA" in l]
    assert len(rejects) == 2
    assert ": 550 5.6.0 Error: message has lines longer than 998 octets" in rejects[0]
    assert " 552 5.3.4 " in rejects[1] and "to=<sam@example.test>" in rejects[1]


def test_data_stage_plugin_rejection_is_logged_once(make_server):
    srv = make_server(BACKEND_TOML + '\n[stages]\ndata = ["content"]\n\n[plugins.content]\n'
                      'use = "test_policies:RejectSubject"\n', server_toml=PLUGIN_PATH)
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as s:
        s.ehlo("client.example")
        s.mail("a@example.org")
        s.rcpt("tom@example.test")
        assert s.data(b"Subject: x\r\n\r\nREJECT-ME\r\n") == (554, b"5.7.1 content refused by test")
    log = wait_for(srv, "NOQUEUE: reject: DATA")
    rejects = [l for l in log.splitlines() if "NOQUEUE: reject: DATA" in l]
    assert len(rejects) == 1
    assert rejects[0].endswith("NOQUEUE: reject: DATA from localhost[127.0.0.1]:"
                               + rejects[0].split("localhost[127.0.0.1]:")[1].split(":")[0]
                               + ": 554 5.7.1 content refused by test; from=<a@example.org> "
                               "to=<tom@example.test> proto=ESMTP helo=<client.example>")
