"""The server machine reports every refusal at end of data (MessageRejected) for the log."""

from __future__ import annotations

from hypothesis import given, strategies as st

from pymta.smtp.server import ProtocolLimits
from pymta.smtp import events as E
from pymta.verdict import Kind, Verdict

from smtp_driver import Driver

#: these tests are about refusals: bare line ends are refused, not normalized
REJECT = ProtocolLimits(bare_newlines="reject")

START = b"EHLO c.test\r\nMAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\n"


def rejected(driver):
    return driver.of(E.MessageRejected)


def test_bare_newline_at_end_of_data():
    driver = Driver(REJECT)
    out = driver.feed(START + b"DATA\r\nx\ny\r\n.\r\n")
    assert out.endswith(b"550 5.6.11 Error: message contains bare <CR> or <LF>; "
                        b"lines must end with <CR><LF>\r\n")
    [ev] = rejected(driver)
    assert (ev.command, ev.code, ev.enhanced) == ("DATA", 550, "5.6.11")
    assert ev.text.startswith("Error: message contains bare")
    assert (ev.sender, ev.recipients) == ("alice@a.test", ("bob@b.test",))
    # reported before the message is discarded
    assert driver.events.index(ev) + 1 == driver.events.index(driver.of(E.MessageAborted)[0])


def test_size_and_long_lines_and_bdat():
    driver = Driver(ProtocolLimits(max_message_size=100, bare_newlines="reject"))
    driver.feed(START + b"DATA\r\n" + b"x" * 200 + b"\r\n.\r\n")
    driver.feed(b"MAIL FROM:<alice@a.test>\r\nRCPT TO:<bob@b.test>\r\nRCPT TO:<carl@b.test>\r\n")
    driver.feed(b"BDAT 5 LAST\r\na\rb\r\n")
    size, bdat = rejected(driver)
    assert (size.command, size.code, size.enhanced) == ("DATA", 552, "5.3.4")
    assert (bdat.command, bdat.code, bdat.enhanced) == ("BDAT", 550, "5.6.11")
    assert bdat.recipients == ("bob@b.test", "carl@b.test")
    driver = Driver()
    driver.feed(START + b"DATA\r\n" + b"x" * 1000 + b"\r\n.\r\n")
    [long_line] = rejected(driver)
    assert (long_line.code, long_line.enhanced) == (550, "5.6.0")


def test_the_answer_to_message_end_is_reported_as_sent():
    for verdict, expected in [
        (Verdict(Kind.REJECT), (554, "5.7.1", "Message rejected")),
        (Verdict.reject("spam", 550, "5.7.1"), (550, "5.7.1", "spam")),
        (Verdict.defer("later", 451, "4.3.0"), (451, "4.3.0", "later")),
        (Verdict(Kind.DISCONNECT), (421, "4.7.0", "Closing connection")),
    ]:
        driver = Driver(policy={E.MessageEnd: verdict})
        out = driver.feed(START + b"DATA\r\nok\r\n.\r\n")
        [ev] = rejected(driver)
        assert (ev.code, ev.enhanced, ev.text) == expected
        assert out.endswith(f"{expected[0]} {expected[1]} {expected[2]}\r\n".encode())
        assert ev.recipients == ("bob@b.test",)


def test_accepted_messages_and_other_refusals_are_not_reported():
    driver = Driver()
    driver.feed(START + b"DATA\r\nok\r\n.\r\nRCPT TO:<x@y.test>\r\nDATA\r\n")
    driver.feed(b"MAIL FROM:<a@a.test>\r\nBDAT 3 LAST\r\nabc")     # BDAT refused: no recipients
    assert not rejected(driver)


@given(st.data())
def test_one_report_however_the_bytes_are_split(data):
    stream = START + b"DATA\r\nSubject: x\r\n\r\nbare\nLF\r\n.\r\nNOOP\r\n"
    cuts = sorted(data.draw(st.sets(st.integers(1, len(stream) - 1), max_size=6)))
    driver = Driver(REJECT)
    driver.feed_chunks(stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)]))
    [ev] = rejected(driver)
    assert (ev.code, ev.enhanced) == (550, "5.6.11")
