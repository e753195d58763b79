"""Message content through the server state machine: DATA framing and
dot-unstuffing, SMTP smuggling, BDAT chunking, size and line limits; and the
body.DataReader / body.LineChecker building blocks on their own."""

from __future__ import annotations

import pytest

from pymta.smtp.server import ProtocolLimits
from pymta.smtp import events as E
from pymta.smtp.body import MAX_TEXT_LINE, DataReader, LineChecker
from pymta.verdict import Verdict
from smtp_driver import Driver, one_byte_chunks

EHLO = b"EHLO client.test\r\n"
TRANSACTION = EHLO + b"MAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\n"
OK = b"250 2.0.0 Ok\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
BYE = b"221 2.0.0 Bye\r\n"
BARE_IN_DATA = (b"550 5.6.11 Error: message contains bare <CR> or <LF>; "
                b"lines must end with <CR><LF>\r\n")
LONG_LINE_IN_DATA = b"550 5.6.0 Error: message has lines longer than 998 octets (RFC 5322 2.1.1)\r\n"
TOO_BIG = b"552 5.3.4 Error: message size exceeds fixed maximum message size\r\n"
NO_TRANSACTION = b"503 5.5.1 Error: BDAT without a mail transaction\r\n"


def in_transaction(limits: ProtocolLimits | None = None, **kw) -> Driver:
    driver = Driver(limits, **kw)
    driver.feed(TRANSACTION)
    assert len(driver.of(E.RcptTo)) == 1 and not driver.closed
    return driver


def after_transaction(out: bytes) -> bytes:
    """The replies after EHLO, MAIL and RCPT of TRANSACTION."""
    head = out.index(b"250 2.1.5 Ok\r\n") + len(b"250 2.1.5 Ok\r\n")
    return out[head:]


# ------------------------------------------------------------------ DATA
@pytest.mark.parametrize("body, stored", [
    (b"", b""),                                           # empty message
    (b"hello\r\n", b"hello\r\n"),
    (b"..x\r\n", b".x\r\n"),                              # dot-stuffed first line
    (b"a\r\n..\r\n...\r\n", b"a\r\n.\r\n..\r\n"),
    (b"a\r\n.b\r\n", b"a\r\nb\r\n"),                      # a leading dot is always removed
    (b"a.\r\nb. \r\n", b"a.\r\nb. \r\n"),                 # a dot elsewhere is content
    (b"no final newline", b"no final newline\r\n"),       # the CRLF of CRLF.CRLF ends the last line
    (b"\r\n\r\n", b"\r\n\r\n"),
    (b"8bit \xc3\xa9\xff\r\n", b"8bit \xc3\xa9\xff\r\n"),
])
def test_data_content_is_unstuffed(body, stored):
    if body and not body.endswith(b"\r\n"):
        wire = body + b"\r\n.\r\n"
    else:
        wire = body + b".\r\n"
    for chunks in ([TRANSACTION + b"DATA\r\n" + wire], one_byte_chunks(TRANSACTION + b"DATA\r\n" + wire)):
        driver = Driver()
        out = driver.feed_chunks(chunks)
        assert after_transaction(out) == GO_AHEAD + OK
        assert driver.messages() == [("end", stored)]
        assert driver.of(E.MessageEnd) == [E.MessageEnd(len(stored))]
        assert driver.of(E.MessageStart) == [E.MessageStart(chunking=False)]


@pytest.mark.parametrize("data", [b"DATA\r\n", b"DATA\n"])
def test_lone_dot_right_after_data_is_an_empty_message(data):
    # the line end of the DATA command counts, a bare LF under "normalize" too
    # (as Postfix 3.9 reads it); ".\n" right after it is no end (test_smtp_normalize)
    driver = in_transaction(ProtocolLimits(bare_newlines="normalize"))
    assert driver.feed(data + b".\r\nNOOP\r\n") == GO_AHEAD + OK + OK
    assert driver.messages() == [("end", b"")]
    assert driver.of(E.MessageData) == []


@pytest.mark.parametrize("not_an_end", [b"x.\r\n", b" .\r\n", b".x\r\n", b"..\r\n", b".\n", b"\n.\r\n"])
def test_only_a_lone_dot_at_the_start_of_a_crlf_line_ends_data(not_an_end):
    driver = in_transaction(ProtocolLimits(bare_newlines="normalize"))
    out = driver.feed(b"DATA\r\nfirst\r\n" + not_an_end + b"NOOP\r\n")
    assert out == GO_AHEAD
    assert driver.conn.in_data
    assert driver.feed(b".\r\n") == OK
    assert len(driver.of(E.MessageEnd)) == 1


def test_commands_pipelined_after_the_end_of_data_are_run():
    driver = in_transaction()
    out = driver.feed(b"DATA\r\nbody\r\n.\r\nMAIL FROM:<x@y.test>\r\nQUIT\r\n")
    assert out == GO_AHEAD + OK + b"250 2.1.0 Ok\r\n" + BYE


def test_the_terminator_split_over_many_packets_is_found():
    driver = in_transaction()
    for piece in (b"DATA\r\nabc\r", b"\n", b".", b"\r", b"\nNO", b"OP\r\n"):
        driver.feed(piece)
    assert bytes(driver.replies).endswith(GO_AHEAD + OK + OK)
    assert driver.messages() == [("end", b"abc\r\n")]


def test_content_is_streamed_before_the_end_of_data():
    driver = in_transaction()
    driver.feed(b"DATA\r\n" + b"line\r\n" * 1000)
    assert sum(len(e.data) for e in driver.of(E.MessageData)) == 6000
    assert len(driver.conn._in) < 8


# --------------------------------------------------------- smuggling
SMUGGLED = b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nsmuggled\r\n"
HEAD = b"Subject: hi\r\n\r\nhello"
# each fake end of data, and what it becomes in the stored message under "normalize":
# a bare CR or LF is a line end, and a lone-dot line next to a bare line end is
# neither the end of data nor content: it is dropped (as Postfix 3.9 does)
FAKE_ENDS = {
    b"\n.\n": b"\r\n",
    b"\n.\r\n": b"\r\n",
    b"\r\n.\n": b"\r\n",
    b"\r.\r\n": b"\r\n",
    b"\r\n.\r": b"\r\n",
}


def smuggling_session(fake_end: bytes) -> bytes:
    return TRANSACTION + b"DATA\r\n" + HEAD + fake_end + SMUGGLED + b"\r\n.\r\n" + b"QUIT\r\n"


def assert_one_transaction(driver: Driver) -> None:
    assert [e.sender for e in driver.of(E.MailFrom)] == ["alice@a.test"]
    assert [e.recipient for e in driver.of(E.RcptTo)] == ["bob@b.test"]
    assert len(driver.of(E.MessageStart)) == 1
    assert len(driver.of(E.MessageEnd)) + len(driver.of(E.MessageAborted)) == 1


@pytest.mark.parametrize("fake_end", FAKE_ENDS)
@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_smuggling_with_bare_line_ends_is_rejected_in_reject_mode(fake_end, split):
    stream = smuggling_session(fake_end)
    driver = Driver(ProtocolLimits(bare_newlines="reject"))
    driver.feed_chunks([stream] if split == "whole" else one_byte_chunks(stream))
    assert_one_transaction(driver)
    assert after_transaction(bytes(driver.replies)) == GO_AHEAD + BARE_IN_DATA + BYE
    assert driver.of(E.MessageEnd) == []
    assert driver.of(E.MessageAborted) == [E.MessageAborted(BARE_IN_DATA[11:-2].decode())]
    assert all(b"evil" not in e.data for e in driver.of(E.MessageData))


@pytest.mark.parametrize("fake_end, normalized", FAKE_ENDS.items())
@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_smuggling_with_normalize_gives_one_message_with_crlf_line_ends(fake_end, normalized, split):
    stream = smuggling_session(fake_end)
    driver = Driver(ProtocolLimits(bare_newlines="normalize"))
    driver.feed_chunks([stream] if split == "whole" else one_byte_chunks(stream))
    assert_one_transaction(driver)
    assert after_transaction(bytes(driver.replies)) == GO_AHEAD + OK + BYE
    stored = HEAD + normalized + SMUGGLED + b"\r\n"
    assert driver.messages() == [("end", stored)]
    assert driver.of(E.MessageEnd) == [E.MessageEnd(len(stored))]


NUL_IN_DATA = b"550 5.6.0 Error: message contains NUL characters\r\n"


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_smuggling_with_a_nul_before_the_dot_is_refused_in_reject_mode(split):
    # a next hop that drops NULs would read CRLF NUL "." CRLF as the end of data
    stream = smuggling_session(b"\r\n\x00.\r\n")
    driver = Driver(ProtocolLimits(bare_newlines="reject"))
    driver.feed_chunks([stream] if split == "whole" else one_byte_chunks(stream))
    assert_one_transaction(driver)
    assert after_transaction(bytes(driver.replies)) == GO_AHEAD + NUL_IN_DATA + BYE
    assert driver.of(E.MessageEnd) == []
    assert driver.of(E.MessageAborted) == [E.MessageAborted(NUL_IN_DATA[10:-2].decode())]


@pytest.mark.parametrize("split", ["whole", "bytewise"])
def test_smuggling_with_a_nul_before_the_dot_is_one_message_without_the_nul(split):
    # the NUL is removed from the content; the line "." it leaves is content,
    # which a relay dot-stuffs again
    stream = smuggling_session(b"\r\n\x00.\r\n")
    driver = Driver(ProtocolLimits(bare_newlines="normalize"))
    driver.feed_chunks([stream] if split == "whole" else one_byte_chunks(stream))
    assert_one_transaction(driver)
    assert after_transaction(bytes(driver.replies)) == GO_AHEAD + OK + BYE
    assert driver.messages() == [("end", HEAD + b"\r\n.\r\n" + SMUGGLED + b"\r\n")]


@pytest.mark.parametrize("bare", [b"\n", b"\r", b"\r\r\n", b"\n\r"])
def test_bare_line_ends_anywhere_in_data_are_rejected_at_the_end(bare):
    driver = in_transaction(ProtocolLimits(bare_newlines="reject"))
    assert driver.feed(b"DATA\r\nline one" + bare + b"line two\r\n") == GO_AHEAD
    assert driver.feed(b".\r\nNOOP\r\n") == BARE_IN_DATA + OK
    assert len(driver.of(E.MessageAborted)) == 1
    assert driver.feed(b"DATA\r\n") == b"503 5.5.1 Error: need MAIL command\r\n"


@pytest.mark.parametrize("bare, normalized", [(b"\n", b"\r\n"), (b"\r", b"\r\n"),
                                              (b"\r\r\n", b"\r\n\r\n"), (b"\n\r", b"\r\n\r\n")])
def test_bare_line_ends_are_normalized_when_configured(bare, normalized):
    driver = in_transaction(ProtocolLimits(bare_newlines="normalize"))
    assert driver.feed(b"DATA\r\none" + bare + b"two\r\n.\r\n") == GO_AHEAD + OK
    assert driver.messages() == [("end", b"one" + normalized + b"two\r\n")]


# ---------------------------------------------------------- line length
def test_a_text_line_of_998_octets_is_accepted_and_999_refused():
    driver = in_transaction()
    assert driver.feed(b"DATA\r\n" + b"x" * 998 + b"\r\n.\r\n") == GO_AHEAD + OK
    driver.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    out = driver.feed(b"DATA\r\nshort\r\n" + b"y" * 999 + b"\r\nshort\r\n.\r\nNOOP\r\n")
    assert out == GO_AHEAD + LONG_LINE_IN_DATA + OK
    assert [outcome for outcome, _ in driver.messages()] == ["end", "aborted"]


def test_a_very_long_data_line_neither_ends_data_nor_loses_sync():
    driver = in_transaction()
    driver.feed(b"DATA\r\n")
    for _ in range(50):
        driver.feed(b"z" * 2000)
        assert len(driver.conn._in) <= MAX_TEXT_LINE + 5
    out = driver.feed(b"\r\nMAIL FROM:<evil@x>\r\n.\r\nNOOP\r\n")
    assert out == LONG_LINE_IN_DATA + OK
    assert len(driver.of(E.MailFrom)) == 1


# ---------------------------------------------------------------- size
def test_declared_size_over_the_limit_is_552_at_mail():
    driver = Driver(ProtocolLimits(max_message_size=1000))
    out = driver.feed(EHLO + b"MAIL FROM:<a@b.test> SIZE=1001\r\nMAIL FROM:<a@b.test> SIZE=1000\r\n")
    assert out.endswith(b"552 5.3.4 Message size exceeds fixed maximum message size\r\n"
                        b"250 2.1.0 Ok\r\n")
    assert driver.of(E.MailFrom) == [E.MailFrom("a@b.test", {"SIZE": 1000})]


def test_actual_size_over_the_limit_is_552_at_the_end_and_not_passed_on():
    limit = 100
    driver = in_transaction(ProtocolLimits(max_message_size=limit))
    body = b"".join(b"line %03d\r\n" % i for i in range(30))   # 300 octets
    out = driver.feed(b"DATA\r\n" + body + b".\r\nNOOP\r\n")
    assert out == GO_AHEAD + TOO_BIG + OK
    assert sum(len(e.data) for e in driver.of(E.MessageData)) <= limit
    assert driver.of(E.MessageEnd) == []
    assert len(driver.of(E.MessageAborted)) == 1


def test_size_exactly_at_the_limit_is_accepted():
    driver = in_transaction(ProtocolLimits(max_message_size=10))
    assert driver.feed(b"DATA\r\n12345678\r\n.\r\n") == GO_AHEAD + OK
    assert driver.of(E.MessageEnd) == [E.MessageEnd(10)]


def test_oversize_streamed_in_pieces_is_not_passed_on():
    driver = in_transaction(ProtocolLimits(max_message_size=1000))
    driver.feed(b"DATA\r\n")
    for _ in range(20):
        driver.feed(b"a" * 98 + b"\r\n")
    assert driver.feed(b".\r\n") == TOO_BIG
    assert sum(len(e.data) for e in driver.of(E.MessageData)) <= 1000


# ---------------------------------------------------------------- BDAT
def test_bdat_chunks_then_last():
    driver = in_transaction()
    assert driver.feed(b"BDAT 7\r\nhello\r\n") == b"250 2.0.0 Ok: 7 octets received\r\n"
    assert driver.conn.state.value == "bdat_more"
    assert driver.feed(b"BDAT 8 LAST\r\nworld\r\n.") == OK
    assert driver.of(E.MessageEnd) == [E.MessageEnd(15)]
    assert driver.of(E.MessageStart) == [E.MessageStart(chunking=True)]
    # no dot-unstuffing in BDAT
    assert driver.messages() == [("end", b"hello\r\nworld\r\n.")]


def test_bdat_content_that_looks_like_commands_is_content():
    chunk = b"\r\n.\r\nMAIL FROM:<evil@x>\r\nQUIT\r\n"
    driver = in_transaction()
    out = driver.feed(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert out == OK + OK
    assert len(driver.of(E.MailFrom)) == 1
    assert driver.messages() == [("end", chunk)]


def test_bdat_last_alone_and_bdat_0_last():
    driver = in_transaction()
    assert driver.feed(b"BDAT 5 LAST\r\nhello") == OK
    assert driver.messages() == [("end", b"hello")]
    driver.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    assert driver.feed(b"BDAT 3\r\nabcBDAT 0 LAST\r\n") == b"250 2.0.0 Ok: 3 octets received\r\n" + OK
    driver.feed(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n")
    assert driver.feed(b"bdat 0 last\r\n") == OK
    assert driver.messages() == [("end", b"hello"), ("end", b"abc"), ("end", b"")]


@pytest.mark.parametrize("setup, refusal", [
    (b"", b"503 5.5.1 Error: send HELO/EHLO first\r\n"),
    (EHLO, NO_TRANSACTION),
    (EHLO + b"MAIL FROM:<a@b.test>\r\n", b"554 5.5.1 Error: no valid recipients\r\n"),
])
def test_bdat_refused_in_the_wrong_state_still_swallows_its_chunk(setup, refusal):
    driver = Driver()
    if setup:
        driver.feed(setup)
    chunk = b"NOOP\r\nQUIT\r\n"
    out = driver.feed(b"BDAT %d LAST\r\n" % len(chunk) + chunk + b"NOOP\r\n")
    assert out == refusal + OK
    assert not driver.closed
    assert driver.of(E.MessageStart) == []


def test_bdat_refusal_waits_for_the_whole_chunk():
    driver = Driver()
    driver.feed(EHLO)
    assert driver.feed(b"BDAT 10\r\n12345") == b""
    assert driver.feed(b"6789") == b""
    assert driver.feed(b"0NOOP\r\n") == NO_TRANSACTION + OK


def test_bdat_after_a_failed_chunk_is_503():
    driver = in_transaction(ProtocolLimits(max_message_size=10))
    chunk = b"x" * 20
    out = driver.feed(b"BDAT 20\r\n" + chunk + b"BDAT 3 LAST\r\nabc")
    assert out == TOO_BIG + NO_TRANSACTION
    assert len(driver.of(E.MessageAborted)) == 1 and driver.of(E.MessageEnd) == []
    assert driver.of(E.MessageData) == []


def test_bdat_with_bare_line_ends_is_refused_at_the_chunk_end():
    driver = in_transaction(ProtocolLimits(bare_newlines="reject"))
    assert driver.feed(b"BDAT 4\r\na\nbcNOOP\r\n") == BARE_IN_DATA + OK
    assert len(driver.of(E.MessageAborted)) == 1


def test_bdat_crlf_split_across_chunks_is_not_bare():
    driver = in_transaction()
    assert driver.feed(b"BDAT 2\r\na\r") == b"250 2.0.0 Ok: 1 octets received\r\n"
    assert driver.feed(b"BDAT 2 LAST\r\n\nb") == OK
    assert driver.messages() == [("end", b"a\r\nb")]


def test_bdat_ending_in_a_bare_cr_is_refused():
    driver = in_transaction(ProtocolLimits(bare_newlines="reject"))
    assert driver.feed(b"BDAT 2 LAST\r\na\r") == BARE_IN_DATA


def test_bdat_state_errors():
    driver = in_transaction()
    driver.feed(b"BDAT 1\r\nx")
    assert driver.feed(b"DATA\r\n") == b"503 5.5.1 Error: DATA not allowed after BDAT\r\n"
    assert driver.feed(b"RCPT TO:<c@d.test>\r\n") == b"503 5.5.1 Error: RCPT not allowed after BDAT\r\n"
    assert driver.feed(b"MAIL FROM:<c@d.test>\r\n") == b"503 5.5.1 Error: nested MAIL command\r\n"
    assert driver.feed(b"NOOP\r\nBDAT 1 LAST\r\ny") == OK + OK
    assert driver.messages() == [("end", b"xy")]


def test_rset_between_bdat_chunks_aborts_the_message():
    driver = in_transaction()
    assert driver.feed(b"BDAT 1\r\nxRSET\r\nBDAT 1 LAST\r\ny") == (
        b"250 2.0.0 Ok: 1 octets received\r\n" + OK + NO_TRANSACTION)
    assert driver.events[-1] == E.MessageAborted("RSET")


@pytest.mark.parametrize("line", [b"BDAT\r\n", b"BDAT x\r\n", b"BDAT -1\r\n", b"BDAT 1 MORE\r\n",
                                  b"BDAT 1 LAST x\r\n", b"BDAT \xc2\xb2\r\n", b"BDAT 1234567890123456\r\n"])
def test_bdat_syntax_error_ends_the_transaction(line):
    driver = in_transaction()
    assert driver.feed(line) == b"501 5.5.4 Syntax: BDAT chunk-size [LAST]\r\n"
    assert driver.feed(b"RCPT TO:<c@d.test>\r\n") == b"503 5.5.1 Error: need MAIL command\r\n"


def test_message_end_refusal_after_bdat_discards_the_message():
    driver = in_transaction(policy={E.MessageEnd: Verdict.defer("Spool full", 452, "4.3.1")})
    assert driver.feed(b"BDAT 2 LAST\r\nhi") == b"452 4.3.1 Spool full\r\n"
    assert driver.events[-1] == E.MessageAborted("rejected")


# ------------------------------------------------ DataReader on its own
def test_data_reader_waits_for_a_whole_line_before_deciding_on_a_dot():
    reader = DataReader()
    assert reader.feed(b".") == (b"", 0, False)
    assert reader.feed(b".\r") == (b"", 0, False)
    assert reader.feed(b".\r\n") == (b"", 3, True)


def test_data_reader_passes_on_complete_lines_and_keeps_the_rest():
    reader = DataReader()
    assert reader.feed(b"one\r\n..two\r\nthr") == (b"one\r\n.two\r\n", 12, False)
    assert reader.feed(b"three\r\n.\r\nNOOP") == (b"three\r\n", 10, True)


def test_data_reader_passes_on_a_long_line_without_its_end():
    reader = DataReader()
    content, used, done = reader.feed(b"." + b"x" * 1500 + b"\r")
    assert (content, used, done) == (b"x" * 1500, 1501, False)    # unstuffed, CR held back
    assert reader.feed(b"\r\n.\r\n") == (b"\r\n", 5, True)


# ----------------------------------------------- LineChecker on its own
def test_line_checker_reject_mode_keeps_content_and_flags():
    checker = LineChecker("reject")
    assert checker.feed(b"a\nb") == b"a\nb"
    assert checker.bare and not checker.too_long


def test_line_checker_holds_a_trailing_cr_until_it_knows():
    checker = LineChecker("reject")
    assert checker.feed(b"a\r") == b"a"
    assert checker.feed(b"\nb") == b"\r\nb"
    assert not checker.bare
    assert checker.feed(b"\r") == b""
    assert checker.finish() == b"\r"
    assert checker.bare


def test_line_checker_normalize_mode():
    checker = LineChecker("normalize")
    assert checker.feed(b"a\nb\rc\r\n") == b"a\r\nb\r\nc\r\n"
    assert checker.feed(b"d\r") == b"d"
    assert checker.finish() == b"\r\n"
    assert checker.bare


@pytest.mark.parametrize("pieces, too_long", [
    ([b"x" * 998 + b"\r\n"], False),
    ([b"x" * 999 + b"\r\n"], True),
    ([b"x" * 500, b"x" * 498, b"\r\n"], False),
    ([b"x" * 500, b"x" * 499, b"\r\n"], True),
    ([b"a\r\n" + b"x" * 999 + b"\r\nb\r\n"], True),                 # a long middle line
    ([b"x" * 999], True),                                          # an unfinished long line
])
def test_line_checker_line_length(pieces, too_long):
    checker = LineChecker()
    for piece in pieces:
        checker.feed(piece)
    checker.finish()
    assert checker.too_long is too_long
