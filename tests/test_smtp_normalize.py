"""``bare_newlines`` byte for byte: what is stored for each sequence of bare
line ends, lone dots and NULs, in DATA and BDAT, in both modes, however the
input is split.

The rules (pymta/smtp/body.py's docstring): only ``CRLF . CRLF`` with a real
CRLF before the dot ends DATA; under "normalize" a bare CR or LF is a line end
as CRLF would be, also for dot-unstuffing, a lone-dot line next to a bare line
end is dropped (as Postfix 3.9 does), NULs are removed, and the stored content
has CRLF line ends only; under "reject" any of these refuses the message at
its end and nothing is stored.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pymta.config.model import Limits
from pymta.smtp.server import ProtocolLimits
from pymta.smtp import events as E
from smtp_driver import Driver, one_byte_chunks

TRANSACTION = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"
GO_AHEAD = b"354 End data with <CR><LF>.<CR><LF>\r\n"
OK = b"250 2.0.0 Ok\r\n"
BARE = b"550 5.6.11 Error: message contains bare <CR> or <LF>; lines must end with <CR><LF>\r\n"
NUL = b"550 5.6.0 Error: message contains NUL characters\r\n"
LONG = b"550 5.6.0 Error: message has lines longer than 998 octets (RFC 5322 2.1.1)\r\n"
TOO_BIG = b"552 5.3.4 Error: message size exceeds fixed maximum message size\r\n"

# DATA content as sent (before the final CRLF . CRLF) -> stored under "normalize",
# and the reply under "reject"
DATA_CASES = [
    # dot-unstuffing after a bare line end
    (b"A\n..\nB\r\n", b"A\r\n.\r\nB\r\n", BARE),
    (b"A\r\n..\nB\r\n", b"A\r\n.\r\nB\r\n", BARE),
    (b"A\n..\r\nB\r\n", b"A\r\n.\r\nB\r\n", BARE),
    (b"A\r..\r\nB\r\n", b"A\r\n.\r\nB\r\n", BARE),                # bare CR
    (b"A\n...\r\n", b"A\r\n..\r\n", BARE),
    (b"A\n.x\r\n", b"A\r\nx\r\n", BARE),
    (b"..\nB\r\n", b".\r\nB\r\n", BARE),                          # ".." first, then a bare LF
    (b"..x\nB\r\n", b".x\r\nB\r\n", BARE),
    (b"A\n..x\r\n", b"A\r\n.x\r\n", BARE),
    # a lone dot next to a bare line end: neither the end of data nor content
    (b"A\n.\nB\r\n", b"A\r\nB\r\n", BARE),
    (b"A\n.\r\nB\r\n", b"A\r\nB\r\n", BARE),
    (b"A\r\n.\nB\r\n", b"A\r\nB\r\n", BARE),
    (b"A\r.\r\nB\r\n", b"A\r\nB\r\n", BARE),
    (b"A\r\n.\rB\r\n", b"A\r\nB\r\n", BARE),
    (b"A\n.\n.\n.\nB\r\n", b"A\r\nB\r\n", BARE),
    (b".\nB\r\n", b"B\r\n", BARE),                                # right after DATA
    (b"A\n.\r\nMAIL FROM:<evil@x.test>\r\n", b"A\r\nMAIL FROM:<evil@x.test>\r\n", BARE),
    # mixes of line ends
    (b"A\r\nB\nC\rD\r\n", b"A\r\nB\r\nC\r\nD\r\n", BARE),
    (b"A\r\r\nB\n\rC\r\n", b"A\r\n\r\nB\r\n\r\nC\r\n", BARE),
    (b"A\n\nB\r\n", b"A\r\n\r\nB\r\n", BARE),
    (b"A\nlast line ends in CRLF\r\n", b"A\r\nlast line ends in CRLF\r\n", BARE),
    # line length is counted on the stored lines
    (b"x" * 998 + b"\nB\r\n", b"x" * 998 + b"\r\nB\r\n", BARE),
    (b"A\n." + b"x" * 998 + b"\nB\r\n", b"A\r\n" + b"x" * 998 + b"\r\nB\r\n", BARE),
    # NULs are removed after dot-unstuffing
    (b"A\x00B\r\n", b"AB\r\n", NUL),
    (b"A\r\n\x00.\r\nB\r\n", b"A\r\n.\r\nB\r\n", NUL),
    (b"A\r\n.\x00.\r\n", b"A\r\n.\r\n", NUL),
    (b"\x00\x00\r\n", b"\r\n", NUL),
    (b"A\n\x00.\nB\r\n", b"A\r\n.\r\nB\r\n", BARE),
    # plain CRLF content is untouched
    (b"A\r\n..\r\nB\r\n", b"A\r\n.\r\nB\r\n", OK),
]


def data_stream(content: bytes) -> bytes:
    assert content.endswith(b"\r\n") or not content    # else ".\r\n" would not end the data
    return TRANSACTION + b"DATA\r\n" + content + b".\r\nNOOP\r\n"


def every_split(stream: bytes):
    yield [stream]
    for cut in range(1, len(stream)):
        yield [stream[:cut], stream[cut:]]
    yield one_byte_chunks(stream)


def after_rcpt(driver: Driver) -> bytes:
    replies = bytes(driver.replies)
    return replies[replies.index(b"250 2.1.5 Ok\r\n") + 14:]


@pytest.mark.parametrize("content, stored, _", DATA_CASES)
def test_normalize_stores_crlf_content_however_split(content, stored, _):
    for chunks in every_split(data_stream(content)):
        driver = Driver(ProtocolLimits(bare_newlines="normalize"))
        driver.feed_chunks(chunks)
        assert after_rcpt(driver) == GO_AHEAD + OK + OK        # the end of data, then NOOP
        assert driver.messages() == [("end", stored)]
        assert driver.of(E.MessageEnd) == [E.MessageEnd(len(stored))]


@pytest.mark.parametrize("content, _, reply", DATA_CASES)
def test_reject_refuses_at_the_end_of_data_however_split(content, _, reply):
    for chunks in every_split(data_stream(content)):
        driver = Driver(ProtocolLimits(bare_newlines="reject"))
        driver.feed_chunks(chunks)
        assert after_rcpt(driver) == GO_AHEAD + reply + OK
        if reply == OK:
            continue
        assert driver.of(E.MessageEnd) == []
        assert driver.of(E.MessageAborted) == [E.MessageAborted(reply[reply.index(b" ", 4) + 1:-2].decode())]


@settings(max_examples=300, deadline=None)
@given(case=st.sampled_from(DATA_CASES), mode=st.sampled_from(["normalize", "reject"]),
       repeat=st.integers(min_value=1, max_value=3),
       cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12))
def test_any_chunking_gives_the_same_content_and_end_point(case, mode, repeat, cuts):
    content, stored, reply = case
    stream = data_stream(content * repeat)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in zip(points, points[1:]) if b > a]
    driver = Driver(ProtocolLimits(bare_newlines=mode))
    driver.feed_chunks(chunks)
    if mode == "normalize":
        assert after_rcpt(driver) == GO_AHEAD + OK + OK
        assert driver.messages() == [("end", stored * repeat)]
    else:
        assert after_rcpt(driver) == GO_AHEAD + reply + OK


def test_the_long_line_limit_applies_after_a_bare_lf():
    driver = Driver(ProtocolLimits(bare_newlines="normalize"))
    driver.feed(data_stream(b"A\n" + b"x" * 999 + b"\nB\r\n"))
    assert after_rcpt(driver) == GO_AHEAD + LONG + OK
    assert driver.of(E.MessageEnd) == []


@pytest.mark.parametrize("mode", ["normalize", "reject"])
@pytest.mark.parametrize("fake_end", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r",
                                      b"\r\n\x00.\r\n"])
def test_only_crlf_dot_crlf_ends_data(mode, fake_end):
    driver = Driver(ProtocolLimits(bare_newlines=mode))
    out = driver.feed(TRANSACTION + b"DATA\r\nA" + fake_end + b"QUIT\r\n")
    assert out.endswith(GO_AHEAD)
    assert driver.conn.in_data and not driver.closed
    assert driver.of(E.MessageEnd) == []


# ---------------------------------------------------------------- BDAT
# BDAT content is not dot-stuffed: only line ends and NULs change
BDAT_CASES = [
    (b"A\n..\nB\n", b"A\r\n..\r\nB\r\n", BARE),
    (b"A\n.\nB\r\n", b"A\r\n.\r\nB\r\n", BARE),
    (b"A\rB\r\n.\r\n", b"A\r\nB\r\n.\r\n", BARE),
    (b"A\r", b"A\r\n", BARE),                                     # a bare CR at the very end
    (b"A\x00\r\n\x00.\r\n", b"A\r\n.\r\n", NUL),
    (b"A\r\n.\r\nB", b"A\r\n.\r\nB", OK),
]


def bdat_stream(content: bytes) -> bytes:
    half = len(content) // 2
    first, last = content[:half], content[half:]
    return (TRANSACTION + b"BDAT %d\r\n" % len(first) + first
            + b"BDAT %d LAST\r\n" % len(last) + last + b"NOOP\r\n")


@pytest.mark.parametrize("content, stored, reply", BDAT_CASES)
def test_bdat_normalizes_line_ends_and_nuls_but_never_unstuffs(content, stored, reply):
    for chunks in every_split(bdat_stream(content)):
        driver = Driver(ProtocolLimits(bare_newlines="normalize"))
        driver.feed_chunks(chunks)
        assert after_rcpt(driver).endswith(OK + OK)
        assert driver.messages() == [("end", stored)]
        assert driver.of(E.MessageEnd) == [E.MessageEnd(len(stored))]


@pytest.mark.parametrize("content, stored, reply", BDAT_CASES)
def test_bdat_reject_mode_refuses(content, stored, reply):
    driver = Driver(ProtocolLimits(bare_newlines="reject"))
    driver.feed(bdat_stream(content))
    if reply == OK:
        assert after_rcpt(driver).endswith(OK + OK)
        return
    # refused at the end of the chunk that has it; RFC 3030: a later BDAT gets 503
    assert reply in after_rcpt(driver)
    assert driver.of(E.MessageEnd) == []


# ---------------------------------------------------------------- size
@pytest.mark.parametrize("content", [
    b"\x00" * 500 + b"\r\n",          # NULs removed
    b"A\r\n" + b"\n." * 200 + b"\r\n",  # lone-dot lines dropped
])
def test_what_normalize_removes_still_counts_against_the_size_limit(content):
    driver = Driver(ProtocolLimits(bare_newlines="normalize", max_message_size=100))
    driver.feed(data_stream(content))
    assert after_rcpt(driver) == GO_AHEAD + TOO_BIG + OK
    assert driver.of(E.MessageEnd) == []


def test_nuls_removed_from_bdat_count_against_the_size_limit():
    driver = Driver(ProtocolLimits(bare_newlines="normalize", max_message_size=100))
    chunk = b"\x00" * 200
    driver.feed(TRANSACTION + b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    assert after_rcpt(driver) == TOO_BIG


def test_the_size_is_that_of_the_stored_crlf_content():
    # 60 LF lines are 120 octets as sent, 180 as stored: the stored size counts
    driver = Driver(ProtocolLimits(bare_newlines="normalize", max_message_size=150))
    driver.feed(data_stream(b"a\n" * 59 + b"a\r\n"))
    assert after_rcpt(driver) == GO_AHEAD + TOO_BIG + OK
    driver = Driver(ProtocolLimits(bare_newlines="normalize", max_message_size=180))
    driver.feed(data_stream(b"a\n" * 59 + b"a\r\n"))
    assert after_rcpt(driver) == GO_AHEAD + OK + OK
    assert driver.of(E.MessageEnd) == [E.MessageEnd(180)]



def test_normalize_is_the_default():
    assert Limits().bare_newlines == "normalize"
    driver = Driver()
    driver.feed(data_stream(b"A\n..\nB\r\n"))
    assert driver.messages() == [("end", b"A\r\n.\r\nB\r\n")]
