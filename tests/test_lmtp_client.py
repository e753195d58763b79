"""The SMTP client machine in LMTP mode (RFC 2033), byte for byte: no sockets, no reactor."""

from __future__ import annotations

import pytest

from pymta.smtp import client as C
from pymta.smtp.client import ClientConnection

from test_smtp_client import Driver, codes, txn

LHLO_DOVECOT = (b"250-mailstore\r\n250-8BITMIME\r\n250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n"
                b"250 PIPELINING\r\n")
LHLO_DATA_ONLY = b"250-mailstore\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING\r\n"
LHLO_PLAIN = b"250 mailstore\r\n"


def lmtp_ready(lhlo: bytes = LHLO_DATA_ONLY) -> Driver:
    d = Driver(lmtp=True)
    assert d.feed(b"220 mailstore LMTP ready\r\n") == []
    assert d.sent() == b"LHLO me.example\r\n"
    (ready, ) = d.feed(lhlo)
    assert isinstance(ready, C.Ready)
    return d


def through_content(d: Driver, *addresses: str, replies: bytes) -> None:
    """Start a transaction, feed the replies up to 354 and send a one-line content."""
    d.conn.start_transaction(txn(*addresses))
    d.sent()
    d.feed(replies)
    d.conn.send_body(b"x\r\n")
    d.conn.end_body()
    d.sent()


def test_lhlo_is_sent_and_its_extensions_are_read():
    d = lmtp_ready(LHLO_DOVECOT)
    assert set(d.conn.extensions) == {"8BITMIME", "CHUNKING", "ENHANCEDSTATUSCODES", "PIPELINING"}
    assert d.conn.esmtp


@pytest.mark.parametrize("refusal", [b"500 5.5.1 unknown command\r\n", b"451 4.3.0 not now\r\n"])
def test_a_refused_lhlo_fails_the_session_without_helo(refusal):
    d = Driver(lmtp=True)
    d.feed(b"220 mailstore\r\n")
    d.sent()
    events = d.feed(refusal)
    assert isinstance(events[0], C.SessionFailed) and events[0].stage == "LHLO"
    assert isinstance(events[-1], C.Closed)
    assert d.sent() == b"QUIT\r\n"        # never HELO


def test_one_reply_per_accepted_recipient_after_the_dot_each_deciding_its_own():
    d = lmtp_ready()
    d.conn.start_transaction(txn("a@x", "b@x", "c@x", "d@x"))
    assert d.sent() == (b"MAIL FROM:<from@example.org>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\n"
                        b"RCPT TO:<c@x>\r\nRCPT TO:<d@x>\r\nDATA\r\n")
    events = d.feed(b"250 2.1.0 OK\r\n250 2.1.5 OK\r\n550 5.1.1 <b@x> unknown\r\n"
                    b"250 2.1.5 OK\r\n250 2.1.5 OK\r\n354 go ahead\r\n")
    assert events == [C.BodyWanted()]
    d.conn.send_body(b"Subject: t\r\n\r\n.hi\r\n")
    d.conn.end_body()
    assert d.sent() == b"Subject: t\r\n\r\n..hi\r\n.\r\n"
    # three recipients were accepted: three replies, in RCPT order
    assert d.feed(b"250 2.0.0 <a@x> saved\r\n452 4.2.2 <c@x> Quota exceeded\r\n") == []
    assert d.conn.state is C.State.FINISHING
    (done,) = d.feed(b"552 5.2.2 <d@x> Quota exceeded\r\n")
    assert isinstance(done, C.TransactionDone) and done.answered
    assert codes(done) == [(250, "end of DATA"), (550, "RCPT TO"), (452, "end of DATA"),
                           (552, "end of DATA")]
    assert done.results[2].reply.enhanced == "4.2.2"
    assert d.conn.state is C.State.READY


def test_without_pipelining_commands_wait_for_their_reply():
    d = lmtp_ready(LHLO_PLAIN)
    d.conn.start_transaction(txn("a@x", "b@x"))
    assert d.sent() == b"MAIL FROM:<from@example.org>\r\n"
    d.feed(b"250 ok\r\n")
    assert d.sent() == b"RCPT TO:<a@x>\r\n"
    d.feed(b"250 ok\r\n")
    assert d.sent() == b"RCPT TO:<b@x>\r\n"
    d.feed(b"250 ok\r\n")
    assert d.sent() == b"DATA\r\n"
    assert d.feed(b"354 go\r\n") == [C.BodyWanted()]
    d.conn.send_body(b"0123456789")
    d.conn.end_body()
    assert d.sent() == b"0123456789\r\n.\r\n"
    (done,) = d.feed(b"250 a ok\r\n250 b ok\r\n")
    assert codes(done) == [(250, "end of DATA"), (250, "end of DATA")]
    assert [r.reply.text for r in done.results] == ["a ok", "b ok"]


def test_chunking_waits_for_the_recipients_then_one_bdat_reply_per_accepted_recipient():
    d = lmtp_ready(LHLO_DOVECOT)
    d.conn.start_transaction(txn("a@x", "b@x", "c@x", size=5))
    # small as it is, the content is not pipelined: the reply count is not known yet
    assert d.sent() == (b"MAIL FROM:<from@example.org>\r\nRCPT TO:<a@x>\r\nRCPT TO:<b@x>\r\n"
                        b"RCPT TO:<c@x>\r\n")
    events = d.feed(b"250 ok\r\n250 ok\r\n450 4.2.1 try later\r\n250 ok\r\n")
    assert events == [C.BodyWanted()]
    d.conn.send_body(b"hello")
    d.conn.end_body()
    assert d.sent() == b"BDAT 5 LAST\r\nhello"
    assert d.feed(b"250 2.0.0 a saved\r\n") == []
    (done,) = d.feed(b"250 2.0.0 c saved\r\n")
    assert codes(done) == [(250, "BDAT"), (450, "RCPT TO"), (250, "BDAT")]


def test_a_refused_data_applies_to_every_accepted_recipient():
    d = lmtp_ready()
    d.conn.start_transaction(txn("a@x", "b@x"))
    d.sent()
    (done,) = d.feed(b"250 ok\r\n250 ok\r\n250 ok\r\n554 5.6.0 no\r\n")
    assert codes(done) == [(554, "DATA"), (554, "DATA")]


def test_no_accepted_recipient_after_354_sends_the_dot_and_awaits_nothing():
    d = lmtp_ready()
    d.conn.start_transaction(txn("a@x"))
    d.sent()
    (done,) = d.feed(b"250 ok\r\n550 5.1.1 no such user\r\n354 go\r\n")
    assert d.sent() == b".\r\n"
    assert codes(done) == [(550, "RCPT TO")]
    assert d.conn.state is C.State.READY


def test_a_connection_lost_between_replies_keeps_the_replies_already_in():
    d = lmtp_ready()
    through_content(d, "a@x", "b@x", replies=b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    events = d.feed(b"250 2.0.0 a saved\r\n")
    assert events == []
    events = d.feed(b"")
    done = events[0]
    assert codes(done) == [(250, "end of DATA"), (451, "end of DATA")]
    assert done.results[1].reply.local and done.results[1].reply.temporary
    assert isinstance(events[-1], C.Closed)


def test_a_421_for_one_recipient_defers_the_ones_not_answered_yet():
    d = lmtp_ready()
    through_content(d, "a@x", "b@x", "c@x",
                    replies=b"250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    events = d.feed(b"250 2.0.0 a saved\r\n421 4.3.2 shutting down\r\n")
    done = events[0]
    assert codes(done) == [(250, "end of DATA"), (421, "end of DATA"), (421, "end of DATA")]


def test_rset_precedes_the_second_transaction_and_lhlo_is_sent_once():
    d = lmtp_ready()
    for expected_prefix in (b"", b"RSET\r\n"):
        d.conn.start_transaction(txn("a@x"))
        assert d.sent() == expected_prefix + b"MAIL FROM:<from@example.org>\r\nRCPT TO:<a@x>\r\nDATA\r\n"
        d.feed((b"250 ok\r\n" if expected_prefix else b"") + b"250 ok\r\n250 ok\r\n354 go\r\n")
        d.conn.send_body(b"x\r\n")
        d.conn.end_body()
        assert d.sent() == b"x\r\n.\r\n"
        (done,) = d.feed(b"250 saved\r\n")
        assert codes(done) == [(250, "end of DATA")]


def test_smtp_mode_is_unchanged_one_reply_for_the_whole_message():
    d = Driver()
    d.feed(b"220 mx\r\n")
    assert d.sent() == b"EHLO me.example\r\n"
    d.feed(LHLO_DATA_ONLY)
    through_content(d, "a@x", "b@x", replies=b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    (done,) = d.feed(b"250 queued\r\n")
    assert codes(done) == [(250, "end of DATA"), (250, "end of DATA")]


def test_the_lhlo_timeout_is_the_helo_one():
    conn = ClientConnection("me.example", C.ClientTimeouts(helo=7.0), lmtp=True)
    conn.receive_data(b"220 hi\r\n")
    conn.next_event()
    assert conn.data_to_send() == b"LHLO me.example\r\n"
    assert conn.timeout == 7.0
    assert conn.situation == "while waiting for the reply to LHLO"


def test_a_reply_too_many_after_the_content_ends_the_session_before_it_is_reused():
    # the pool starts the next transaction as soon as this one is done: the extra reply
    # would answer its RSET, every later reply one command late
    for extra in (b"250 2.0.0 one more\r\n", b"250 2.0.0 hal"):
        d = lmtp_ready()
        d.conn.start_transaction(txn("a@x"))
        d.sent()
        d.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
        d.conn.send_body(b"x\r\n")
        d.conn.end_body()
        d.sent()
        d.conn.receive_data(b"250 2.0.0 saved\r\n" + extra)
        done = d.conn.next_event()
        assert codes(done) == [(250, "end of DATA")]      # its own reply stands
        assert d.conn.state is C.State.CLOSED              # not reused


@pytest.mark.parametrize("lhlo", [LHLO_DATA_ONLY, LHLO_PLAIN])
def test_a_2xx_reply_to_data_is_out_of_step_and_delivers_nothing(lhlo):
    # a server a reply behind answers DATA with the 250 of a RCPT: taken as the end of the
    # content, a message never sent would count as delivered
    d = lmtp_ready(lhlo)
    d.conn.start_transaction(txn("a@x"))
    events = []
    for _ in range(3):                          # MAIL, RCPT, DATA (sent one by one or at once)
        d.sent()
        events += d.feed(b"250 ok\r\n")
    done = events[0]
    assert isinstance(done, C.TransactionDone)
    assert [(r.reply.code, r.reply.enhanced) for r in done.results] == [(451, "4.5.0")]
    assert "in reply to DATA" in done.results[0].reply.text
