"""The sans-I/O SMTP client, byte for byte: no sockets, no reactor."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymta.smtp import _client_state as T
from pymta.smtp import client as C
from pymta.smtp.body import DataReader
from pymta.smtp.client import ClientConnection, MailTransaction, RecipientSpec
from pymta.smtp.events import CLOSED, NEED_DATA

EHLO_FULL = (b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n"
             b"250-ENHANCEDSTATUSCODES\r\n250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n")
EHLO_DATA_ONLY = b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250 8BITMIME\r\n"
EHLO_PLAIN = b"250-mx.example\r\n250 SIZE 1000000\r\n"


class Driver:
    def __init__(self, **kw) -> None:
        self.conn = ClientConnection("me.example", **kw)

    def feed(self, data: bytes | None = None) -> list:
        """Give the machine ``data`` (b"" is the server closing) and return its events."""
        if data is not None:
            self.conn.receive_data(data)
        return self.events()

    def events(self) -> list:
        out = []
        while True:
            event = self.conn.next_event()
            if event is NEED_DATA or event is CLOSED:
                return out
            out.append(event)

    def sent(self) -> bytes:
        return self.conn.data_to_send()


def ready(ehlo: bytes = EHLO_FULL) -> Driver:
    d = Driver()
    assert d.feed(b"220 mx.example ESMTP\r\n") == []
    assert d.sent() == b"EHLO me.example\r\n"
    events = d.feed(ehlo)
    assert isinstance(events[0], C.Ready)
    return d


def txn(*addresses: str, size: int = 10, **kw) -> MailTransaction:
    return MailTransaction("from@example.org", tuple(RecipientSpec(a) for a in addresses), size, **kw)


def codes(done: C.TransactionDone) -> list[tuple[int, str]]:
    return [(r.reply.code, r.command) for r in done.results]


# -- the table -------------------------------------------------------------------------

def test_every_expected_reply_has_a_handler_a_timeout_and_documented_targets():
    for expect in T.Expect:
        handler = T.REPLY_HANDLERS[expect]
        assert callable(getattr(ClientConnection, "_on_" + handler))
        assert handler in T.NEXT_STATE
        assert T.TIMEOUTS[expect] in C.ClientTimeouts.__dataclass_fields__
    for action in T.ACTIONS:
        assert callable(getattr(ClientConnection, action))


def test_actions_in_the_wrong_state_are_refused():
    d = Driver()
    with pytest.raises(C.ClientError):
        d.conn.start_transaction(txn("a@x.example"))
    d = ready()
    with pytest.raises(C.ClientError):
        d.conn.send_body(b"x")
    with pytest.raises(C.ClientError):
        d.conn.tls_started()


# -- greeting and EHLO ----------------------------------------------------------------------

def test_extensions_are_parsed_from_the_ehlo_reply():
    d = ready()
    assert d.conn.esmtp
    assert d.conn.extensions == {"PIPELINING": "", "SIZE": "1000000", "8BITMIME": "",
                                 "ENHANCEDSTATUSCODES": "", "DSN": "", "SMTPUTF8": "", "CHUNKING": ""}


def test_ehlo_refused_with_5xx_falls_back_to_helo():
    d = Driver()
    d.feed(b"220 old.example SMTP\r\n")
    d.sent()
    assert d.feed(b"502 5.5.2 what?\r\n") == []
    assert d.sent() == b"HELO me.example\r\n"
    [event] = d.feed(b"250 old.example\r\n")
    assert event == C.Ready(esmtp=False, extensions={}, tls=False)


@pytest.mark.parametrize("greeting, quit", [(b"421 4.3.2 busy, try later\r\n", False),
                                            (b"554 5.7.1 go away\r\n", True),
                                            (b"451 4.3.0 not today\r\n", True)])
def test_a_refusing_greeting_fails_the_session(greeting, quit):
    d = Driver()
    events = d.feed(greeting)
    assert isinstance(events[0], C.SessionFailed) and events[0].stage == "greeting"
    assert events[0].reply.code == int(greeting[:3])
    assert isinstance(events[-1], C.Closed)
    assert d.sent() == (b"QUIT\r\n" if quit else b"")
    assert d.conn.closed


def test_ehlo_refused_with_4xx_fails_the_session():
    d = Driver()
    d.feed(b"220 hi\r\n")
    events = d.feed(b"450 4.7.1 slow down\r\n")
    assert isinstance(events[0], C.SessionFailed) and events[0].stage == "EHLO"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 40), max_size=30))
def test_replies_split_across_packets_anywhere_give_the_same_events(cuts):
    stream = b"220-mx.example ESMTP\r\n220 welcome\r\n" + EHLO_FULL
    d = Driver()
    events, pos = [], 0
    for cut in cuts:
        if stream[pos:pos + cut]:
            events += d.feed(stream[pos:pos + cut])
        pos += cut
    if stream[pos:]:
        events += d.feed(stream[pos:])
    assert [type(e) for e in events] == [C.Ready]
    assert d.conn.greeting.lines == ("mx.example ESMTP", "welcome")
    assert d.sent() == b"EHLO me.example\r\n"


def test_reply_texts_and_enhanced_codes():
    reply = C.ServerReply(550, ("5.1.1 The email account does not exist.", "5.1.1 Try again."))
    assert reply.enhanced == "5.1.1"
    assert reply.text == "The email account does not exist. Try again."
    assert reply.summary() == "550 5.1.1 The email account does not exist. Try again."
    assert C.ServerReply(250, ("ok",)).enhanced is None
    assert C.ServerReply(550, ("4.1.1 wrong class",)).enhanced is None


@pytest.mark.parametrize("garbage", [b"hello there\r\n", b"25 short\r\n", b"250x\r\n",
                                     b"250-first\r\n251 second\r\n", b"650 nonsense\r\n",
                                     b"2" * 5000])
def test_garbage_during_a_transaction_defers_every_recipient(garbage):
    d = ready(EHLO_DATA_ONLY)
    d.conn.start_transaction(txn("a@x.example", "b@x.example"))
    d.sent()
    events = d.feed(garbage)
    done = events[0]
    assert isinstance(done, C.TransactionDone)
    assert all(r.reply.temporary and r.reply.local for r in done.results)
    assert all(r.reply.enhanced == "4.5.0" for r in done.results)
    assert "protocol error" in done.results[0].reply.text
    assert isinstance(events[-1], C.Closed)


# -- transactions ------------------------------------------------------------------------

def test_pipelined_data_transaction_bytes_and_per_recipient_results():
    d = ready(EHLO_DATA_ONLY)
    d.conn.start_transaction(txn("a@x.example", "b@x.example", "c@x.example", size=7))
    assert d.sent() == (b"MAIL FROM:<from@example.org> SIZE=7\r\nRCPT TO:<a@x.example>\r\n"
                        b"RCPT TO:<b@x.example>\r\nRCPT TO:<c@x.example>\r\nDATA\r\n")
    events = d.feed(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 unknown\r\n"
                    b"452 4.2.2 over quota\r\n354 go\r\n")
    assert events == [C.BodyWanted()]
    d.conn.send_body(b"hello\r\n")
    d.conn.end_body()
    assert d.sent() == b"hello\r\n.\r\n"
    [done] = d.feed(b"250 2.0.0 queued as X\r\n")
    assert codes(done) == [(250, "end of DATA"), (550, "RCPT TO"), (452, "RCPT TO")]
    assert done.answered
    assert d.conn.state is T.State.READY


def test_mail_refused_applies_to_every_recipient():
    d = ready(EHLO_DATA_ONLY)
    d.conn.start_transaction(txn("a@x.example", "b@x.example"))
    d.sent()
    [done] = d.feed(b"451 4.3.0 try later\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n"
                    b"503 5.5.1 need MAIL\r\n")
    assert codes(done) == [(451, "MAIL FROM"), (451, "MAIL FROM")]


def test_data_refused_applies_to_the_accepted_recipients():
    d = ready(EHLO_DATA_ONLY)
    d.conn.start_transaction(txn("a@x.example", "b@x.example"))
    d.sent()
    [done] = d.feed(b"250 ok\r\n250 ok\r\n550 no\r\n554 5.7.1 no DATA for you\r\n")
    assert codes(done) == [(554, "DATA"), (550, "RCPT TO")]


def test_354_without_an_accepted_recipient_sends_only_the_dot():
    d = ready(EHLO_DATA_ONLY)
    d.conn.start_transaction(txn("a@x.example"))
    d.sent()
    assert d.feed(b"250 ok\r\n550 no\r\n354 go\r\n") == []
    assert d.sent() == b".\r\n"
    [done] = d.feed(b"554 5.5.1 no valid recipients\r\n")
    assert codes(done) == [(550, "RCPT TO")]


def test_without_pipelining_commands_wait_for_their_reply():
    d = ready(EHLO_PLAIN)
    d.conn.start_transaction(txn("a@x.example", "b@x.example", size=3))
    assert d.sent() == b"MAIL FROM:<from@example.org> SIZE=3\r\n"
    d.feed(b"250 ok\r\n")
    assert d.sent() == b"RCPT TO:<a@x.example>\r\n"
    d.feed(b"550 no\r\n")
    assert d.sent() == b"RCPT TO:<b@x.example>\r\n"
    d.feed(b"250 ok\r\n")
    assert d.sent() == b"DATA\r\n"
    assert d.feed(b"354 go\r\n") == [C.BodyWanted()]


def test_without_pipelining_no_data_when_every_recipient_was_refused():
    d = ready(EHLO_PLAIN)
    d.conn.start_transaction(txn("a@x.example"))
    d.sent()
    d.feed(b"250 ok\r\n")
    d.sent()
    [done] = d.feed(b"550 5.1.1 no\r\n")
    assert codes(done) == [(550, "RCPT TO")]
    assert d.sent() == b""


def test_without_pipelining_a_refused_mail_stops_the_transaction():
    d = ready(EHLO_PLAIN)
    d.conn.start_transaction(txn("a@x.example"))
    d.sent()
    [done] = d.feed(b"553 5.1.8 bad sender\r\n")
    assert codes(done) == [(553, "MAIL FROM")]
    assert d.sent() == b""


def test_small_message_with_chunking_goes_in_one_pipelined_group():
    d = ready()
    d.conn.start_transaction(txn("a@x.example", size=12))
    events = d.events()
    assert events == [C.BodyWanted()]
    d.conn.send_body(b".hello\r\n")
    d.conn.send_body(b"x\r\n.")
    d.conn.end_body()
    assert d.sent() == (b"MAIL FROM:<from@example.org> SIZE=12\r\nRCPT TO:<a@x.example>\r\n"
                        b"BDAT 12 LAST\r\n.hello\r\nx\r\n.")
    [done] = d.feed(b"250 ok\r\n250 ok\r\n250 2.0.0 queued\r\n")
    assert codes(done) == [(250, "BDAT")]


def test_large_message_with_chunking_waits_for_the_recipients():
    d = Driver(inline_body_limit=100)
    d.feed(b"220 hi\r\n")
    d.feed(EHLO_FULL)
    d.sent()
    d.conn.start_transaction(txn("a@x.example", "b@x.example", size=500))
    assert d.events() == []
    assert d.sent().count(b"\r\n") == 3
    assert d.feed(b"250 ok\r\n250 ok\r\n") == []
    assert d.feed(b"550 no\r\n") == [C.BodyWanted()]
    d.conn.send_body(b"x" * 500)
    d.conn.end_body()
    assert d.sent() == b"BDAT 500 LAST\r\n" + b"x" * 500
    [done] = d.feed(b"250 2.0.0 ok\r\n")
    assert codes(done) == [(250, "BDAT"), (550, "RCPT TO")]


def test_large_message_with_chunking_and_no_recipient_sends_no_content():
    d = Driver(inline_body_limit=100)
    d.feed(b"220 hi\r\n")
    d.feed(EHLO_FULL)
    d.sent()
    d.conn.start_transaction(txn("a@x.example", size=500))
    d.sent()
    [done] = d.feed(b"250 ok\r\n550 5.1.1 no\r\n")
    assert codes(done) == [(550, "RCPT TO")]
    assert d.sent() == b""


def test_bdat_octet_count_must_match_what_was_announced():
    d = ready()
    d.conn.start_transaction(txn("a@x.example", size=5))
    d.events()
    with pytest.raises(C.ClientError):
        d.conn.send_body(b"123456")
    d.conn.send_body(b"1234")
    with pytest.raises(C.ClientError):
        d.conn.end_body()


def test_rset_precedes_every_transaction_but_the_first():
    d = ready(EHLO_DATA_ONLY)
    for n in range(3):
        d.conn.start_transaction(txn("a@x.example", size=3))
        sent = d.sent()
        assert sent.startswith(b"RSET\r\nMAIL") == (n > 0)
        replies = (b"250 ok\r\n" if n else b"") + b"250 ok\r\n250 ok\r\n354 go\r\n"
        d.feed(replies)
        d.conn.send_body(b"ab\r\n")
        d.conn.end_body()
        d.sent()
        [done] = d.feed(b"250 2.0.0 ok\r\n")
        assert codes(done) == [(250, "end of DATA")]


def test_dsn_and_other_parameters_are_passed_only_when_offered():
    spec = MailTransaction("s@example.org", (RecipientSpec("a@x.example", ("SUCCESS", "DELAY"),
                                                           "rfc822;orig+x@example.org"),),
                           3, body="8BITMIME", eight_bit=False, smtputf8=True, ret="HDRS",
                           envid="id=1 2")
    d = ready()
    d.conn.start_transaction(spec)
    assert d.sent().split(b"\r\n")[:2] == [
        b"MAIL FROM:<s@example.org> SIZE=3 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=id+3D1+202",
        b"RCPT TO:<a@x.example> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;orig+2Bx@example.org"]
    d = ready(EHLO_PLAIN)
    d.conn.start_transaction(spec)
    assert d.sent() == b"MAIL FROM:<s@example.org> SIZE=3\r\n"


def test_requirements_the_server_cannot_meet_fail_without_sending():
    d = ready(b"250-mx.example\r\n250-PIPELINING\r\n250 SIZE 100\r\n")
    for spec, code, enhanced in [
            (txn("a@x.example", size=101), 552, "5.3.4"),
            (txn("a@x.example", body="8BITMIME", eight_bit=True), 554, "5.6.3"),
            (txn("a@x.example", body="8BITMIME"), 554, "5.6.3"),
            (txn("a@x.example", smtputf8=True, smtputf8_required=True), 550, "5.6.7")]:
        d.conn.start_transaction(spec)
        [done] = d.events()
        assert [(r.reply.code, r.reply.enhanced, r.reply.local) for r in done.results] == \
            [(code, enhanced, True)]
        assert d.sent() == b""
        assert d.conn.state is T.State.READY
    # declared 8BITMIME but 7-bit content, SMTPUTF8 not really needed: sent plainly
    d.conn.start_transaction(txn("a@x.example", body="8BITMIME", eight_bit=False, smtputf8=True))
    assert d.sent().startswith(b"MAIL FROM:<from@example.org> SIZE=10\r\n")


def test_a_421_reply_ends_the_session_and_defers_what_is_outstanding():
    d = ready(EHLO_DATA_ONLY)
    d.conn.start_transaction(txn("a@x.example", "b@x.example", "c@x.example"))
    d.sent()
    events = d.feed(b"250 ok\r\n550 5.1.1 no\r\n421 4.3.2 shutting down\r\n")
    done = events[0]
    assert codes(done) == [(550, "RCPT TO"), (421, "RCPT TO"), (421, "RCPT TO")]
    assert isinstance(events[-1], C.Closed)


@pytest.mark.parametrize("stage", ["before MAIL reply", "during content", "after the dot"])
def test_connection_lost_defers_and_never_delivers(stage):
    d = ready(EHLO_DATA_ONLY)
    d.conn.start_transaction(txn("a@x.example", "b@x.example"))
    d.sent()
    if stage != "before MAIL reply":
        d.feed(b"250 ok\r\n250 ok\r\n550 no\r\n354 go\r\n")
        d.conn.send_body(b"partial\r\n")
    if stage == "after the dot":
        d.conn.end_body()
    events = d.feed(b"")
    done = events[0]
    assert isinstance(done, C.TransactionDone)
    assert done.results[0].reply.temporary and done.results[0].reply.local
    assert done.results[0].reply.enhanced == "4.4.2"
    assert done.answered == (stage != "before MAIL reply")
    if stage != "before MAIL reply":
        assert done.results[1].reply.code == 550      # a permanent refusal stays one
    assert isinstance(events[-1], C.Closed)


def test_timeouts_follow_rfc5321_per_state():
    d = Driver()
    assert d.conn.timeout == 300                    # greeting
    d.feed(b"220 hi\r\n")
    assert d.conn.timeout == 300                    # EHLO
    d.feed(EHLO_DATA_ONLY)
    assert d.conn.timeout is None                   # idle: the pool's business
    d.conn.start_transaction(txn("a@x.example"))
    assert d.conn.timeout == 300                    # MAIL
    d.feed(b"250 ok\r\n250 ok\r\n")
    assert d.conn.timeout == 120                    # DATA initiation
    d.feed(b"354 go\r\n")
    assert d.conn.timeout == 180                    # data block
    d.conn.end_body()
    assert d.conn.timeout == 600                    # DATA termination
    events = d.conn.timed_out() or d.events()
    assert codes(events[0]) == [(451, "end of DATA")]
    assert "timed out while waiting for the reply to end of DATA" in events[0].results[0].reply.text


def test_unsolicited_reply_while_idle_ends_the_session():
    d = ready()
    events = d.feed(b"421 4.4.2 idle timeout\r\n")
    assert isinstance(events[-1], C.Closed)
    assert "unexpected reply while idle" in events[-1].reason


def test_quit():
    d = ready()
    d.conn.quit()
    assert d.sent() == b"QUIT\r\n"
    events = d.feed(b"221 2.0.0 bye\r\n")
    assert events == [C.Closed("QUIT")]


# -- STARTTLS and AUTH -------------------------------------------------------------------

def test_starttls_discards_what_came_before_the_handshake_and_says_ehlo_again():
    d = ready(EHLO_FULL[:-len(b"250 CHUNKING\r\n")] + b"250-CHUNKING\r\n250 STARTTLS\r\n")
    d.conn.start_tls()
    assert d.sent() == b"STARTTLS\r\n"
    # a man in the middle appends a forged reply to the 220 in the same packet
    events = d.feed(b"220 2.0.0 go ahead\r\n250-forged.example\r\n250 AUTH PLAIN\r\n")
    assert events == [C.TLSGranted()]
    d.conn.receive_data(b"250 more forged plaintext\r\n")   # before the switch: dropped too
    d.conn.tls_started()
    assert d.sent() == b"EHLO me.example\r\n"
    assert d.conn.extensions == {}
    [event] = d.feed(b"250-mx.example\r\n250 PIPELINING\r\n")
    assert event == C.Ready(esmtp=True, extensions={"PIPELINING": ""}, tls=True)


def test_starttls_refused_leaves_a_plaintext_session():
    d = ready(b"250-mx.example\r\n250 STARTTLS\r\n")
    d.conn.start_tls()
    d.sent()
    [event] = d.feed(b"454 4.7.0 TLS not available\r\n")
    assert isinstance(event, C.TLSRefused) and d.conn.state is T.State.READY


def test_auth_plain_and_login_bytes():
    d = ready(b"250-mx.example\r\n250 AUTH PLAIN LOGIN\r\n")
    d.conn.authenticate("PLAIN", "user", "secret")
    assert d.sent() == b"AUTH PLAIN " + base64.b64encode(b"\0user\0secret") + b"\r\n"
    [event] = d.feed(b"235 2.7.0 ok\r\n")
    assert isinstance(event, C.Authenticated) and d.conn.authenticated

    d = ready(b"250-mx.example\r\n250 AUTH LOGIN\r\n")
    d.conn.authenticate("LOGIN", "user", "secret")
    assert d.sent() == b"AUTH LOGIN\r\n"
    d.feed(b"334 VXNlcm5hbWU6\r\n")
    assert d.sent() == base64.b64encode(b"user") + b"\r\n"
    d.feed(b"334 UGFzc3dvcmQ6\r\n")
    assert d.sent() == base64.b64encode(b"secret") + b"\r\n"
    [event] = d.feed(b"535 5.7.8 bad credentials\r\n")
    assert isinstance(event, C.AuthRejected) and not d.conn.authenticated


# -- dot-stuffing ----------------------------------------------------------------------------

def unstuff(wire: bytes) -> bytes:
    """What a receiving server stores: pymta's own DataReader."""
    reader = DataReader()
    content, used, done = reader.feed(wire)
    assert done and used == len(wire), (used, len(wire))
    return content


body_lines = st.lists(st.sampled_from([b".", b"..", b".x", b"x.", b"", b"a", b".\r", b"hello."]),
                      max_size=40)


@settings(max_examples=300, deadline=None)
@given(lines=body_lines, cuts=st.lists(st.integers(0, 30), max_size=20), trailing=st.booleans())
def test_dot_stuffing_is_exact_whatever_the_chunking(lines, cuts, trailing):
    body = b"\r\n".join(lines) + (b"\r\n" if trailing and lines else b"")
    stuffer = C.DotStuffer()
    wire, pos = b"", 0
    for cut in cuts:
        wire += stuffer.feed(body[pos:pos + cut])
        pos += cut
    wire += stuffer.feed(body[pos:]) + stuffer.finish()
    expected = body if body.endswith(b"\r\n") or not body else body + b"\r\n"
    assert unstuff(wire) == expected
    assert b"\r\n.\r\n" not in (b"\r\n" + wire)[:-3]     # no early terminator


@pytest.mark.parametrize("buffer", [64 * 1024, 16 * 1024])
def test_a_dot_line_at_every_offset_around_buffer_sizes(buffer):
    for offset in range(buffer - 6, buffer + 6):
        body = b"x" * (offset - 2) + b"\r\n.\r\n" + b"tail\r\n" if offset >= 2 else b".\r\ntail\r\n"
        stuffer = C.DotStuffer()
        wire = b"".join(stuffer.feed(body[i:i + buffer]) for i in range(0, len(body), buffer))
        wire += stuffer.finish()
        assert unstuff(wire) == body, offset


def test_a_bare_lf_dot_is_stuffed_too():
    stuffer = C.DotStuffer()
    assert stuffer.feed(b"a\n.\r\n") == b"a\n..\r\n"


# -- robustness -----------------------------------------------------------------------------

def test_an_unexpected_3xx_reply_is_a_protocol_error():
    d = ready(EHLO_DATA_ONLY)
    d.conn.start_transaction(txn("a@x.example"))
    d.sent()
    events = d.feed(b"354 go ahead already\r\n")
    assert events[0].results[0].reply.enhanced == "4.5.0"
    assert "protocol error" in events[0].results[0].reply.text


REPLIES = st.sampled_from([b"220 hi\r\n", b"250 ok\r\n", b"250-multi\r\n", b"354 go\r\n",
                           b"421 4.3.2 bye\r\n", b"451 4.3.0 later\r\n", b"550 5.1.1 no\r\n",
                           b"334 VXNlcm5hbWU6\r\n", b"235 ok\r\n", b"junk\r\n", b"\r\n",
                           b"250 PIPELINING\r\n", b"25", b"0 x\r\n", b""])


@settings(max_examples=300, deadline=None)
@given(script=st.lists(st.tuples(REPLIES, st.sampled_from(["tx", "tls", "auth", "body", "quit",
                                                             "none"])), max_size=25),
       ehlo=st.sampled_from([EHLO_FULL, EHLO_DATA_ONLY, EHLO_PLAIN]))
def test_any_server_input_gives_documented_transitions_and_never_raises(script, ehlo):
    d = Driver()
    conn = d.conn
    seen = []
    original = ClientConnection._dispatch

    def dispatch(self, reply):
        handler = T.REPLY_HANDLERS[self._expect[0][0]]
        original(self, reply)
        seen.append((handler, self.state))
    conn._dispatch = dispatch.__get__(conn)
    d.feed(b"220 hi\r\n")
    d.feed(ehlo)
    for data, action in script:
        state = conn.state
        try:
            if action == "tx" and state in T.ACTIONS["start_transaction"]:
                conn.start_transaction(txn("a@x.example", "b@x.example", size=4))
            elif action == "tls" and state in T.ACTIONS["start_tls"] and "STARTTLS" in conn.extensions:
                conn.start_tls()
            elif action == "auth" and state in T.ACTIONS["authenticate"]:
                conn.authenticate("LOGIN", "u", "p")
            elif action == "body" and state in T.ACTIONS["send_body"]:
                conn.send_body(b"abcd")
                conn.end_body()
            elif action == "quit" and state in T.ACTIONS["quit"]:
                conn.quit()
        except C.ClientError:
            pass                       # e.g. STARTTLS not offered: a caller's mistake, refused
        if conn.state is T.State.TLS_HANDSHAKE:
            conn.tls_started()
        d.sent()
        events = d.feed(data)
        for event in events:
            assert not isinstance(event, C.TransactionDone) or len(event.results) == 2
    for handler, state in seen:
        assert state in T.NEXT_STATE[handler] | {T.State.CLOSED}, (handler, state)
