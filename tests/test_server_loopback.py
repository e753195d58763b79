"""The server over real loopback sockets: smtplib, raw bytes, and swaks."""

from __future__ import annotations

import smtplib
import subprocess
import time

import pytest

from pymta.spool.queuefile import load_queue_file

from conftest import BACKEND_TOML, ROOT, require_program, routes_toml, wait_for_log
from smtpwire import Wire

PLUGIN_PATH = f'plugin_path = ["{ROOT / "tests" / "plugins"}"]'


def test_smtplib_delivery_with_trace_headers(server):
    body = b"Subject: hello\r\nMessage-ID: <1@example.test>\r\n\r\nline one\r\n.leading dot\r\n"
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        code, ehlo = s.ehlo("client.example")
        assert code == 250
        for ext in (b"PIPELINING", b"SIZE", b"8BITMIME", b"ENHANCEDSTATUSCODES",
                    b"SMTPUTF8", b"CHUNKING", b"DSN"):
            assert ext in ehlo
        assert s.sendmail("sender@example.org", ["alice@example.test"], body) == {}
    [msg] = server.delivered("alice@example.test")
    head, _, rest = msg.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"Return-Path: <sender@example.org>"
    assert lines[1] == b"Delivered-To: alice@example.test"
    assert lines[2].startswith(b"Received: from client.example (localhost [127.0.0.1])")
    assert b"by mx.example.test (pymta) with ESMTP id " in head
    assert b"for <alice@example.test>;" in head
    assert msg.endswith(b"Subject: hello\r\nMessage-ID: <1@example.test>\r\n\r\nline one\r\n.leading dot\r\n")
    # the file is in the mailbox a moment before the delivery's line is in the log
    wait_for_log(server, r"to=<alice@example\.test>.*status=sent")
    log = server.log_text()
    assert "client=localhost[127.0.0.1]" in log and "from=<sender@example.org>" in log


def test_every_reply_has_enhanced_code_and_sequence_errors(server):
    w = Wire(server.port)
    assert w.banner[0] == 220
    assert w.cmd("MAIL FROM:<a@example.org>") == (503, "5.5.1 Error: send HELO/EHLO first")
    assert w.cmd("EHLO c.example")[0] == 250
    assert w.cmd("RCPT TO:<alice@example.test>") == (503, "5.5.1 Error: need MAIL command")
    assert w.cmd("DATA") == (503, "5.5.1 Error: need MAIL command")
    assert w.cmd("FROB") == (500, "5.5.2 Error: command not recognized")
    assert w.cmd("MAIL FROM:a@example.org")[0] == 501
    assert w.cmd("MAIL FROM:<>") == (250, "2.1.0 Ok")
    assert w.cmd("MAIL FROM:<>") == (503, "5.5.1 Error: nested MAIL command")
    assert w.cmd("DATA") == (554, "5.5.1 Error: no valid recipients")
    assert w.cmd("VRFY alice")[0] == 252
    assert w.cmd("HELP")[0] == 214
    assert w.cmd("NOOP") == (250, "2.0.0 Ok")
    assert w.cmd("RSET") == (250, "2.0.0 Ok")
    assert w.cmd("QUIT") == (221, "2.0.0 Bye")
    assert w.closed_by_server()


def test_postmaster_and_null_sender(server):
    w = Wire(server.port)
    w.cmd("EHLO c.example")
    assert w.cmd("MAIL FROM:<>")[0] == 250
    assert w.cmd("RCPT TO:<Postmaster>")[0] == 250
    assert w.cmd("RCPT TO:<postmaster@example.test>")[0] == 250
    assert w.cmd("DATA")[0] == 354
    code, text = w.cmd(b"Subject: bounce\r\n\r\nx\r\n.")
    assert code == 250 and text.startswith("2.0.0 Ok: queued as ")
    [msg] = server.delivered("postmaster@example.test")
    assert msg.startswith(b"Return-Path: <>\r\nDelivered-To: postmaster@example.test\r\n")


def test_relay_denied_for_untrusted_client(make_server):
    srv = make_server(server_toml="trusted_networks = []")
    w = Wire(srv.port)
    w.cmd("EHLO c.example")
    w.cmd("MAIL FROM:<a@example.org>")
    assert w.cmd("RCPT TO:<victim@elsewhere.example>") == (554, "5.7.1 Relay access denied")
    assert w.cmd("RCPT TO:<bob@example.test>")[0] == 250
    assert "NOQUEUE: reject: RCPT from localhost[127.0.0.1]" in srv.log_text()


def test_unsafe_mailbox_names_refused(server):
    w = Wire(server.port)
    w.cmd("EHLO c.example")
    w.cmd("MAIL FROM:<a@example.org>")
    # syntactically valid (quoted) local parts that are unsafe as mailbox names
    for bad in ('".."@example.test', '".hidden"@example.test', '"a/b"@example.test',
                '"../../etc"@example.test'):
        code, text = w.cmd(f"RCPT TO:<{bad}>")
        assert code == 550 and text.startswith("5.1."), (bad, code, text)
    # and dot-strings that are not even valid syntax
    assert w.cmd("RCPT TO:<.hidden@example.test>")[0] == 501
    assert not any((server.mail).glob("**/..*"))


def test_size_declared_and_actual(make_server):
    srv = make_server(BACKEND_TOML + "\n[limits]\nmax_message_size = 2000\n")
    w = Wire(srv.port)
    code, lines = (w.send(b"EHLO c.example\r\n"), w.reply())[1]
    assert "SIZE 2000" in lines
    assert w.cmd("MAIL FROM:<a@example.org> SIZE=2001")[0] == 552
    assert w.cmd("MAIL FROM:<a@example.org> SIZE=1000") == (250, "2.1.0 Ok")
    w.cmd("RCPT TO:<alice@example.test>")
    assert w.cmd("DATA")[0] == 354
    w.send(b"x" * 70 + b"\r\n")
    for _ in range(40):
        w.send(b"y" * 70 + b"\r\n")
    code, text = w.cmd(b".")
    assert (code, text[:5]) == (552, "5.3.4")
    assert w.cmd("NOOP")[0] == 250          # still in sync
    time.sleep(0.3)
    assert not (srv.maildir("alice@example.test") / "new").exists() or \
        not list((srv.maildir("alice@example.test") / "new").iterdir())


def test_8bitmime_and_smtputf8(server):
    body = "Subject: grüße\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nÄÖÜ ß\r\n".encode()
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        s.ehlo()
        assert s.sendmail("a@example.org", ["carol@example.test"], body,
                          mail_options=["BODY=8BITMIME"]) == {}
        assert s.sendmail("jörg@example.org", ["jörg@example.test"], body,
                          mail_options=["SMTPUTF8", "BODY=8BITMIME"]) == {}
    [msg] = server.delivered("carol@example.test")
    assert msg.endswith(body)
    [utf] = server.delivered("jörg@example.test")
    assert utf.endswith(body)
    assert "Return-Path: <jörg@example.org>".encode() in utf
    assert b"with UTF8SMTP id" in utf


def test_non_ascii_address_needs_smtputf8(server):
    w = Wire(server.port)
    w.cmd("EHLO c.example")
    assert w.cmd("MAIL FROM:<jörg@example.org>") == \
        (553, "5.6.7 Error: non-ASCII address requires the SMTPUTF8 parameter on MAIL")


def test_bdat_chunks_exact_bytes(server):
    part1 = b"Subject: chunked\r\n\r\nfirst part\r\n.not stuffed\r\n"
    part2 = b"second part\r\n"
    w = Wire(server.port)
    w.cmd("EHLO c.example")
    w.cmd("MAIL FROM:<a@example.org>")
    w.cmd("RCPT TO:<dave@example.test>")
    w.send(b"BDAT %d\r\n" % len(part1) + part1 + b"BDAT %d LAST\r\n" % len(part2) + part2)
    assert w.reply() == (250, [f"2.0.0 Ok: {len(part1)} octets received"])
    code, lines = w.reply()
    assert code == 250 and lines[0].startswith("2.0.0 Ok: queued as")
    [msg] = server.delivered("dave@example.test")
    assert msg.endswith(part1 + part2)


def test_dsn_parameters_are_stored(make_server):
    srv = make_server('[backends.hold]\nuse = "test_policies:DeferAll"\n', server_toml=PLUGIN_PATH)
    w = Wire(srv.port)
    w.cmd("EHLO c.example")
    assert w.cmd("MAIL FROM:<a@example.org> RET=HDRS ENVID=abc+2Bdef")[0] == 250
    assert w.cmd("RCPT TO:<erin@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;erin+40example.test")[0] == 250
    assert w.cmd("RCPT TO:<frank@example.test> NOTIFY=NEVER")[0] == 250
    w.cmd("DATA")
    code, text = w.cmd(b"Subject: dsn\r\n\r\nx\r\n.")
    queue_id = text.rsplit(" ", 1)[1]
    env = load_queue_file(str(srv.spool / "queue"), queue_id)[0].to_json()
    assert env["ret"] == "HDRS" and env["envid"] == "abc+def"
    erin, frank = env["recipients"]
    assert erin["notify"] == ["SUCCESS", "FAILURE"] and erin["orcpt"] == "rfc822;erin@example.test"
    assert frank["notify"] == ["NEVER"] and frank["orcpt"] is None


def test_pipelined_replies_stay_in_order_with_async_plugins(make_server):
    srv = make_server(BACKEND_TOML + '\n[stages]\nrcpt = ["slow"]\n\n[plugins.slow]\n'
                      'use = "test_policies:SlowRecipients"\n', server_toml=PLUGIN_PATH)
    w = Wire(srv.port)
    w.send(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\n"
           b"RCPT TO:<slow300-a@example.test>\r\nRCPT TO:<no1@example.test>\r\n"
           b"RCPT TO:<slow100-b@example.test>\r\nRCPT TO:<no-slow@example.test>\r\n"
           b"RCPT TO:<c@example.test>\r\nDATA\r\n")
    codes = [w.reply()[0] for _ in range(8)]
    assert codes == [250, 250, 250, 550, 250, 550, 250, 354]
    w.send(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n")
    assert w.reply()[0] == 250
    assert w.reply()[0] == 221
    assert len(srv.delivered("slow300-a@example.test")) == 1
    assert len(srv.delivered("c@example.test")) == 1


SMUGGLING = [b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r\n\x00.\r\n"]


REJECT_TOML = BACKEND_TOML + '\n[limits]\nbare_newlines = "reject"\n'


@pytest.mark.parametrize("ending", SMUGGLING, ids=[repr(e) for e in SMUGGLING])
def test_smuggling_never_yields_two_messages_in_reject_mode(make_server, ending):
    srv = make_server(REJECT_TOML)
    w = Wire(srv.port)
    w.send(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<gina@example.test>\r\nDATA\r\n")
    assert [w.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    w.send(b"Subject: first\r\n\r\nfirst" + ending +
           b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.test>\r\nDATA\r\n"
           b"Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n")
    code, lines = w.reply()
    assert w.nothing_more(0.5)            # exactly one reply: no second transaction ran
    assert w.cmd("NOOP")[0] == 250
    # a NUL is refused like a bare line end: a next hop that drops NULs
    # would read CRLF NUL "." CRLF as the end of data
    assert (code, lines[0][:6]) == ((550, "5.6.0 ") if b"\x00" in ending else (550, "5.6.11"))
    time.sleep(0.3)
    assert srv.delivered("gina@example.test", timeout=0.2) == []
    assert srv.delivered("victim@example.test", timeout=0.2) == []


@pytest.mark.parametrize("ending", SMUGGLING, ids=[repr(e) for e in SMUGGLING])
def test_smuggling_normalize_mode_one_message(server, ending):
    # normalize is the default: one message that carries the would-be commands as text
    w = Wire(server.port)
    w.send(b"EHLO c.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<gina@example.test>\r\nDATA\r\n")
    [w.reply() for _ in range(4)]
    w.send(b"Subject: first\r\n\r\nfirst" + ending +
           b"MAIL FROM:<evil@example.org>\r\nRCPT TO:<victim@example.test>\r\n.\r\n")
    code, lines = w.reply()
    assert code == 250
    assert w.nothing_more(0.5)
    [msg] = server.delivered("gina@example.test")
    # the lone dot next to a bare line end is dropped; the NUL is removed and
    # leaves the content line "."
    kept = b".\r\n" if b"\x00" in ending else b""
    assert msg.endswith(b"first\r\n" + kept + b"MAIL FROM:<evil@example.org>\r\n"
                        b"RCPT TO:<victim@example.test>\r\n")
    assert server.delivered("victim@example.test", timeout=0.2) == []


def lf_session(port: int, recipient: str, content: bytes) -> tuple[int, str]:
    """A script-like client: CRLF commands, message content as given, CRLF . CRLF at the end."""
    w = Wire(port)
    w.send(b"EHLO script.example\r\nMAIL FROM:<a@example.org>\r\n"
           b"RCPT TO:<" + recipient.encode() + b">\r\nDATA\r\n")
    assert [w.reply()[0] for _ in range(4)] == [250, 250, 250, 354]
    w.send(content + b"\r\n.\r\n")
    code, lines = w.reply()
    w.cmd("QUIT")
    return code, " ".join(lines)


def test_lf_only_content_is_stored_as_the_same_file_as_crlf_content(server):
    text = (b"Subject: lf\n\nline one\n..dot-stuffed line\n.leading dot\n\x00nul\n"
            b"last line")
    assert lf_session(server.port, "lf@example.test", text)[0] == 250
    crlf = text.replace(b"\n", b"\r\n").replace(b"\x00", b"")
    assert lf_session(server.port, "crlf@example.test", crlf)[0] == 250
    [lf_msg] = server.delivered("lf@example.test")
    [crlf_msg] = server.delivered("crlf@example.test")
    # the content after the trace fields is byte for byte the same, CRLF only
    lf_content = lf_msg[lf_msg.index(b"Subject: lf"):]
    assert lf_content == crlf_msg[crlf_msg.index(b"Subject: lf"):]
    assert lf_content == b"Subject: lf\r\n\r\nline one\r\n.dot-stuffed line\r\nleading dot\r\nnul\r\nlast line\r\n"


def test_lf_only_content_and_nul_refused_in_reject_mode(make_server):
    srv = make_server(REJECT_TOML)
    code, text = lf_session(srv.port, "lf@example.test", b"Subject: lf\n\nbody")
    assert (code, text[:6]) == (550, "5.6.11")
    code, text = lf_session(srv.port, "nul@example.test", b"Subject: nul\r\n\r\nA\x00B")
    assert (code, text) == (550, "5.6.0 Error: message contains NUL characters")
    time.sleep(0.3)
    assert srv.delivered("lf@example.test", timeout=0.2) == []
    assert srv.delivered("nul@example.test", timeout=0.2) == []


def test_long_lines_refused_without_losing_sync(server):
    w = Wire(server.port)
    w.cmd("EHLO c.example")
    assert w.cmd("NOOP " + "x" * 600) == (500, "5.5.2 Error: line too long")
    w.send(b"NOOP " + b"y" * 100_000 + b"\r\n")
    assert w.reply() == (500, ["5.5.2 Error: line too long"])
    assert w.cmd("NOOP") == (250, "2.0.0 Ok")
    w.cmd("MAIL FROM:<a@example.org>")
    w.cmd("RCPT TO:<hank@example.test>")
    w.cmd("DATA")
    w.send(b"Subject: long\r\n\r\n" + b"z" * 1200 + b"\r\n")
    code, text = w.cmd(b".")
    assert code == 550 and text.startswith("5.6.0")
    assert w.cmd("NOOP") == (250, "2.0.0 Ok")


def test_bare_lf_in_command_refused_in_reject_mode(make_server):
    srv = make_server(REJECT_TOML)
    w = Wire(srv.port)
    w.send(b"EHLO c.example\nNOOP\r\n")
    assert w.reply()[0] == 500
    assert w.reply()[0] == 250


def test_a_script_sending_lf_only_lines_is_served(server):
    # commands and content end in LF; only the end of data is CRLF . CRLF
    w = Wire(server.port)
    w.send(b"EHLO script.example\nMAIL FROM:<a@example.org>\nRCPT TO:<lf@example.test>\nDATA\n"
           b"Subject: script\n\nfrom a script\n..\r\n.\r\nQUIT\n")
    assert [w.reply()[0] for _ in range(6)] == [250, 250, 250, 354, 250, 221]
    [msg] = server.delivered("lf@example.test")
    assert msg.endswith(b"\r\nSubject: script\r\n\r\nfrom a script\r\n.\r\n")


def test_recipient_limit(make_server):
    srv = make_server(BACKEND_TOML + "\n[limits]\nmax_recipients = 2\n")
    w = Wire(srv.port)
    w.cmd("EHLO c.example")
    w.cmd("MAIL FROM:<a@example.org>")
    assert w.cmd("RCPT TO:<r1@example.test>")[0] == 250
    assert w.cmd("RCPT TO:<r2@example.test>")[0] == 250
    assert w.cmd("RCPT TO:<r3@example.test>") == (452, "4.5.3 Error: too many recipients")
    w.cmd("DATA")
    assert w.cmd(b"Subject: x\r\n\r\ny\r\n.")[0] == 250
    assert len(srv.delivered("r2@example.test")) == 1


def test_connection_limits(make_server):
    srv = make_server(BACKEND_TOML + "\n[limits]\nmax_connections_per_ip = 2\n")
    a, b = Wire(srv.port), Wire(srv.port)
    c = Wire(srv.port, read_banner=False)
    code, lines = c.reply()
    assert code == 421 and lines[0].startswith("4.7.0")
    assert c.closed_by_server()
    a.cmd("QUIT")
    a.closed_by_server()
    # the slot is free once the server has seen the close: poll, a busy machine may lag
    deadline = time.monotonic() + 5
    while True:
        d = Wire(srv.port)
        if d.banner[0] == 220 or time.monotonic() > deadline:
            break
        d.sock.close()
        time.sleep(0.05)
    assert d.banner[0] == 220
    b.close()


def test_idle_timeout(make_server):
    srv = make_server(BACKEND_TOML + "\n[limits]\nidle_timeout = 1\n")
    w = Wire(srv.port)
    w.cmd("EHLO c.example")
    w.sock.settimeout(5)
    code, lines = w.reply()
    assert code == 421 and lines[0].startswith("4.4.2")
    assert w.closed_by_server()


def test_error_limit(make_server):
    srv = make_server(BACKEND_TOML + "\n[limits]\nmax_errors = 3\n")
    w = Wire(srv.port)
    w.send(b"A\r\nB\r\nC\r\nD\r\n")
    assert [w.reply()[0] for _ in range(4)] == [500, 500, 500, 421]
    assert w.closed_by_server()


def test_pregreet_refused(make_server):
    srv = make_server(BACKEND_TOML + "\n[limits]\npregreet_wait = 0.5\n")
    w = Wire(srv.port, read_banner=False)
    w.send(b"EHLO eager.example\r\n")
    code, lines = w.reply()
    assert (code, lines[0][:5]) == (554, "5.5.1")
    assert w.closed_by_server()
    polite = Wire(srv.port)
    assert polite.banner[0] == 220
    assert "pregreet" in srv.log_text()


def test_message_filter_rejects_and_tags(make_server):
    srv = make_server(BACKEND_TOML + '\n[stages]\ndata = ["content"]\n\n[plugins.content]\n'
                      'use = "test_policies:RejectSubject"\n', server_toml=PLUGIN_PATH)
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("a@example.org", ["ivy@example.test"], b"Subject: x\r\n\r\nREJECT-ME\r\n")
        assert e.value.smtp_code == 554
        s.sendmail("a@example.org", ["ivy@example.test"], b"Subject: y\r\n\r\nfine\r\n")
    [msg] = srv.delivered("ivy@example.test")
    assert b"\r\nX-Test-Filter: passed\r\n" in msg and b"fine" in msg


def test_helo_session_is_plain_smtp(server):
    w = Wire(server.port)
    assert w.cmd("HELO old.example") == (250, "mx.example.test")
    assert w.cmd("MAIL FROM:<a@example.org> SIZE=10")[0] == 555
    w.cmd("MAIL FROM:<a@example.org>")
    w.cmd("RCPT TO:<jay@example.test>")
    w.cmd("DATA")
    assert w.cmd(b"Subject: x\r\n\r\ny\r\n.")[0] == 250
    [msg] = server.delivered("jay@example.test")
    assert b"with SMTP id" in msg


def test_mbox_route(make_server):
    srv = make_server(BACKEND_TOML + """
[backends.boxes]
use = "mbox"
base = "mboxes"
""" + routes_toml(("mbox.example.test", "boxes"), ("*", "local")), domains=("example.test", "mbox.example.test"))
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("a@example.org", ["kim@mbox.example.test"], b"Subject: m\r\n\r\nFrom here\r\n>From there\r\n")
    path = srv.dir / "mboxes" / "mbox.example.test" / "kim"
    deadline = time.monotonic() + 10
    # the file exists (locked) before the message is appended: wait for the whole of it
    while not (path.exists() and b">>From there\n" in path.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.05)
    data = path.read_bytes()
    assert data.startswith(b"From a@example.org ")
    assert b"\n>From here\n>>From there\n" in data
    assert b"\r\n" not in data


# ----------------------------------------------------------------- swaks
def run_swaks(port: int, *args: str) -> subprocess.CompletedProcess:
    swaks = require_program("swaks")
    return subprocess.run([swaks, "--server", f"127.0.0.1:{port}", "--helo", "swaks.example",
                           "--from", "sender@example.org", *args],
                          capture_output=True, text=True, timeout=60)


def test_swaks_basic_and_pipelining(server):
    r = run_swaks(server.port, "--to", "lee@example.test", "--header", "Subject: via swaks")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "250 2.0.0 Ok: queued as" in r.stdout
    r = run_swaks(server.port, "--pipeline", "--to", "lee@example.test,postmaster@example.test")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "PIPELINING" in r.stdout
    assert len(server.delivered("lee@example.test", 2)) == 2
    [msg] = server.delivered("postmaster@example.test")
    assert b"swaks" in msg


def test_swaks_relay_denied(make_server):
    srv = make_server(server_toml="trusted_networks = []")
    r = run_swaks(srv.port, "--to", "someone@elsewhere.example")
    assert r.returncode != 0
    assert "554 5.7.1 Relay access denied" in r.stdout


def test_swaks_helo_protocol_and_dot_body(server):
    r = run_swaks(server.port, "--protocol", "SMTP", "--to", "max@example.test",
                  "--body", "line\n.\n..two dots\nend")
    assert r.returncode == 0, r.stdout + r.stderr
    [msg] = server.delivered("max@example.test")
    assert b"\r\nline\r\n.\r\n..two dots\r\nend\r\n" in msg


# -- where the file work runs ([spool] disk_work) -------------------------------------------

def children_of(pid: int) -> set[int]:
    found = set()
    for stat in __import__("pathlib").Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def gone(pids: set[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(__import__("os").path.exists(f"/proc/{p}") for p in pids):
            return True
        time.sleep(0.05)
    return False


def send_one(port: int, to: str) -> None:
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.sendmail("a@example.net", [to], b"Subject: where\r\n\r\nbody\r\n")


@pytest.mark.parametrize("disk_work", ["process", "threads"])
def test_disk_work_in_a_child_process_or_in_threads(make_server, disk_work):
    srv = make_server(spool_toml=f'disk_work = "{disk_work}"')
    send_one(srv.port, "alice@example.test")
    [message] = srv.delivered("alice@example.test")
    assert message.endswith(b"Subject: where\r\n\r\nbody\r\n")
    # the worker (and multiprocessing's resource tracker), or no child at all
    assert bool(children_of(srv.proc.pid)) is (disk_work == "process")
    assert "Traceback" not in srv.log_text()


@pytest.mark.parametrize("stop", ["stop", "kill9"])
def test_the_disk_worker_ends_with_the_server(make_server, stop):
    srv = make_server()
    send_one(srv.port, "bob@example.test")
    assert srv.delivered("bob@example.test")
    children = children_of(srv.proc.pid)
    assert children
    getattr(srv, stop)()
    assert gone(children), f"disk worker {children} outlived the server ({stop})"


class RawSink:
    """A minimal SMTP receiver on a thread that keeps the DATA bytes exactly as sent."""

    def __init__(self) -> None:
        import socket
        import threading
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.data: list[bytes] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(30)
        conn, _ = self.listener.accept()
        conn.settimeout(30)
        with conn:
            conn.sendall(b"220 sink.test ESMTP\r\n")
            buf = b""
            while True:
                while b"\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                line, buf = buf.split(b"\r\n", 1)
                verb = line[:4].upper()
                if verb == b"EHLO":
                    # no CHUNKING: the message goes as dot-stuffed DATA
                    conn.sendall(b"250-sink.test\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go ahead\r\n")
                    while b"\r\n.\r\n" not in b"\r\n" + buf:
                        buf += conn.recv(65536)
                    end = (b"\r\n" + buf).index(b"\r\n.\r\n")
                    self.data.append(buf[:end])
                    buf = buf[end + 3:]
                    conn.sendall(b"250 2.0.0 Ok: kept\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 2.0.0 Ok\r\n")

    def close(self) -> None:
        self.listener.close()


def test_lf_only_content_is_relayed_with_crlf_and_dot_stuffing(make_server):
    sink = RawSink()
    try:
        srv = make_server(BACKEND_TOML + f"""
[backends.out]
use = "smarthost"
host = "127.0.0.1:{sink.port}"
tls = "none"
""" + routes_toml(("example.test", "local"), ("elsewhere.example", "out")))
        text = b"Subject: lf\n\n..stuffed\n.\nlone dot dropped\r\n\x00.\r\nNUL dot\n"
        assert lf_session(srv.port, "someone@elsewhere.example", text)[0] == 250
        deadline = time.monotonic() + 15
        while not sink.data and time.monotonic() < deadline:
            time.sleep(0.05)
        [wire] = sink.data
        content = wire[wire.index(b"Subject: lf"):]
        # CRLF only; the content lines ".stuffed" and "." are dot-stuffed again
        assert content == (b"Subject: lf\r\n\r\n..stuffed\r\nlone dot dropped\r\n..\r\n"
                           b"NUL dot\r\n\r\n")
    finally:
        sink.close()
