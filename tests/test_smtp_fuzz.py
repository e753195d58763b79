"""Property tests: the SMTP server state machine and its body framing do not
depend on how the input is split, agree with simple line-by-line reference
implementations, and never raise on any input."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pymta.smtp.server import ProtocolLimits
from pymta.smtp import events as E
from pymta.smtp.body import MAX_TEXT_LINE, DataReader, LineChecker
from pymta.verdict import Verdict
from smtp_driver import Driver, one_byte_chunks, reply_lines

FUZZ = settings(max_examples=400, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

REPLY_LINE = re.compile(rb"[2-5][0-9][0-9][ -][\x20-\x7e\x80-\xff]*\Z")


# ----------------------------------------------------------------- splitting
def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return [p for p in pieces if p]


# ------------------------------------------------------ a scripted policy
def hello_policy(ev: E.Hello):
    return {"reject.test": Verdict.reject("No", 550, "5.7.1"),
            "later.test": Verdict.defer(),
            "bye.test": Verdict.disconnect()}.get(ev.hostname)


def address_policy(address: str):
    return {"bad@x.test": Verdict.reject(),
            "later@x.test": Verdict.defer("Later\r\n250 injected"),
            "bye@x.test": Verdict.disconnect(),
            "what@x.test": Verdict.dunno()}.get(address)


def message_policy(ev: E.MessageEnd):
    if ev.size % 7 == 3:
        return Verdict.reject("Content rejected", 554, "5.7.1")
    if ev.size % 7 == 5:
        return Verdict.defer()
    return Verdict.accept("Ok: queued as ABC")


POLICY = {E.Hello: hello_policy,
          E.MailFrom: lambda ev: address_policy(ev.sender),
          E.RcptTo: lambda ev: address_policy(ev.recipient),
          E.MessageEnd: message_policy}


def run(limits: ProtocolLimits, chunks: list[bytes]) -> Driver:
    driver = Driver(limits, policy=POLICY)
    driver.feed_chunks(chunks)
    return driver


def check_well_formed(driver: Driver) -> None:
    for line in reply_lines(bytes(driver.replies)):
        assert REPLY_LINE.match(line), line
    driver.messages()   # asserts MessageStart / MessageData / MessageEnd nesting
    if driver.closed:
        assert driver.conn.next_event() is E.CLOSED


def assert_chunking_invariant(limits: ProtocolLimits, stream: bytes, cuts: list[int]) -> None:
    whole = run(limits, [stream])
    check_well_formed(whole)
    for chunks in (one_byte_chunks(stream), split_at(stream, cuts)):
        split = run(limits, chunks)
        assert bytes(split.replies) == bytes(whole.replies)
        assert split.normalized_events() == whole.normalized_events()
        assert split.last_sentinel is whole.last_sentinel
        assert_same_messages(split.messages(), whole.messages())


def assert_same_messages(split: list, whole: list) -> None:
    """Complete messages are identical; of a message that never completed,
    each run passed on a prefix of the same content."""
    assert [outcome for outcome, _ in split] == [outcome for outcome, _ in whole]
    for (outcome, a), (_, b) in zip(split, whole):
        if outcome == "end":
            assert a == b
        else:
            assert a.startswith(b) or b.startswith(a)


# --------------------------------------------------- a grammar of sessions
limits_strategy = st.builds(
    ProtocolLimits,
    max_message_size=st.sampled_from([40, 3000, 1_000_000]),
    max_recipients=st.sampled_from([2, 100]),
    max_errors=st.sampled_from([6, 1000]),
    bare_newlines=st.sampled_from(["reject", "normalize"]),
)

hostnames = st.sampled_from(["client.test", "[192.0.2.1]", "reject.test", "later.test",
                             "bye.test", "", "two words", "h" * 600])
paths = st.sampled_from([
    "<a@b.test>", "<>", "<Postmaster>", "<postmaster@b.test>", "<@r1.test,@r2.test:u@d.test>",
    '<"q u>"@d.test>', "<ü@d.test>", "<bad@x.test>", "<later@x.test>", "<bye@x.test>",
    "<what@x.test>", "<a@[192.0.2.1]>", "<a@[IPv6:2001:db8::1]>", "<a@b..test>", "<a@>",
    "<@r1.test:>", "a@b.test", "<a@b.test", "<a@b.test>x", "<" + "l" * 70 + "@b.test>",
])
mail_params = st.sampled_from([
    "SIZE=10", "SIZE=99999999", "SIZE=x", "SIZE=\u00b2", "SIZE", "BODY=8BITMIME", "BODY=7bit",
    "BODY=BINARYMIME", "SMTPUTF8", "SMTPUTF8=yes", "RET=HDRS", "RET=FULL", "RET=NONE",
    "ENVID=a+2Bb", "ENVID=+ZZ", "ENVID=", "AUTH=<>", "AUTH=u+40x", "FOO=bar", "=x", "SIZE=1=2",
])
rcpt_params = st.sampled_from([
    "NOTIFY=NEVER", "NOTIFY=SUCCESS,FAILURE", "NOTIFY=NEVER,DELAY", "NOTIFY=success,success",
    "ORCPT=rfc822;a+40b.test", "ORCPT=rfc822", "ORCPT=;x", "X-FOO=1", "NOTIFY",
])
body_tokens = st.sampled_from([
    b"text", b"\r\n", b".", b"..", b"\r", b"\n", b"\x00", b" ", b"\xff\xfe",
    b"\r\n.\r\n", b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\r\n.\r", b"\r\n\x00.\r\n",
    b"MAIL FROM:<evil@x.test>\r\n", b"RCPT TO:<victim@y.test>\r\n", b"DATA\r\n",
    b"x" * 500, b"y" * 1100,
])
bodies = st.lists(body_tokens, max_size=12).map(b"".join)


def _line(text: str) -> bytes:
    return text.encode("utf-8") + b"\r\n"


@st.composite
def mail_command(draw) -> bytes:
    verb = draw(st.sampled_from(["MAIL FROM:", "mail from:", "MAIL FROM: ", "MAIL TO:", "MAIL"]))
    params = draw(st.lists(mail_params, max_size=3))
    return _line(" ".join([verb + draw(paths), *params]))


@st.composite
def rcpt_command(draw) -> bytes:
    verb = draw(st.sampled_from(["RCPT TO:", "rcpt to:", "RCPT TO: ", "RCPT FROM:"]))
    params = draw(st.lists(rcpt_params, max_size=2))
    return _line(" ".join([verb + draw(paths), *params]))


@st.composite
def data_command(draw) -> bytes:
    body = draw(bodies)
    ending = draw(st.sampled_from([b"\r\n.\r\n", b".\r\n", b"\r\n.\r\n", b""]))
    return b"DATA\r\n" + body + ending


@st.composite
def bdat_command(draw) -> bytes:
    chunk = draw(bodies)
    size = len(chunk) + draw(st.sampled_from([0, 0, 0, -1, 1]))
    size = max(size, 0)
    last = draw(st.sampled_from(["", " LAST", " last", " LAST x"]))
    prefix = draw(st.sampled_from(["BDAT ", "BDAT ", "BDAT x", "BDAT -"]))
    return f"{prefix}{size}{last}\r\n".encode() + chunk


simple_commands = st.sampled_from([
    b"RSET\r\n", b"RSET x\r\n", b"NOOP\r\n", b"NOOP hello\r\n", b"VRFY a\r\n", b"VRFY\r\n",
    b"HELP\r\n", b"EXPN list\r\n", b"STARTTLS\r\n", b"FOO\r\n", b"\r\n", b"NOOP\n",
    b"NOOP\rx\r\n", b"NO\x00OP\r\n", b"NOOP \xff\r\n", b"DATA x\r\n", b"QUIT\r\n",
    b"NOOP " + b"x" * 600 + b"\r\n", b"MAIL FROM:<a@b.test> " + b"x" * 1200 + b"\r\n",
    b"NOOP " + b"z" * 3000 + b"\r\n", b"NOOP " + b"z" * 3000 + b"\n",
])

commands = st.one_of(
    st.builds(lambda v, h: _line(f"{v} {h}"), st.sampled_from(["EHLO", "HELO", "ehlo"]), hostnames),
    mail_command(), rcpt_command(), data_command(), bdat_command(), simple_commands,
    st.binary(max_size=30).map(lambda b: b + b"\r\n"),
)


@st.composite
def sessions(draw) -> bytes:
    start = draw(st.sampled_from([[b"EHLO client.test\r\n"], [b"HELO client.test\r\n"], []]))
    body = draw(st.lists(commands, max_size=14))
    return b"".join(start + body)


@FUZZ
@given(limits=limits_strategy, stream=sessions(),
       cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=20))
def test_sessions_do_not_depend_on_how_input_is_split(limits, stream, cuts):
    assert_chunking_invariant(limits, stream, cuts)


raw_tokens = st.one_of(
    st.binary(max_size=20),
    st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"\r\n.\r\n", b"EHLO a\r\n", b"MAIL FROM:<a@b>\r\n",
                     b"RCPT TO:<c@d>\r\n", b"DATA\r\n", b"BDAT 4\r\n", b"BDAT 0 LAST\r\n",
                     b"RSET\r\n", b"x" * 700, b"\x00", b"\xff"]),
)


@FUZZ
@given(limits=limits_strategy, stream=st.lists(raw_tokens, max_size=25).map(b"".join),
       cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=20))
def test_raw_byte_streams_do_not_depend_on_how_input_is_split(limits, stream, cuts):
    assert_chunking_invariant(limits, stream, cuts)


@FUZZ
@given(stream=st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(stream):
    for limits in (ProtocolLimits(bare_newlines="reject"), ProtocolLimits(bare_newlines="normalize", max_message_size=64)):
        driver = run(limits, [b"EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n" + stream])
        check_well_formed(driver)
        driver.conn.receive_data(b"")
        assert driver.pump() is E.CLOSED
        assert driver.messages() == [m for m in driver.messages() if m[0] != "open"]


# ------------------------------------------------- DataReader vs reference
def reference_data(stream: bytes) -> tuple[bytes, int, bool]:
    """Line by line (lines end with CRLF only): (unstuffed content, bytes used, done)."""
    content, pos = [], 0
    while True:
        end = stream.find(b"\r\n", pos)
        if end < 0:
            return b"".join(content), pos, False
        line = stream[pos:end]
        pos = end + 2
        if line == b".":
            return b"".join(content), pos, True
        content.append((line[1:] if line.startswith(b".") else line) + b"\r\n")


def reference_normalized(stream: bytes) -> tuple[bytes, int, bool, int, bool]:
    """Line by line under "normalize": (content, bytes used, done, octets removed, too long).

    Only a lone "." between two real CRLFs ends the data; otherwise a bare CR
    or LF ends a line as CRLF would; a lone-dot line next to a bare line end
    is dropped; a leading dot is removed; then NULs are removed.
    """
    end = (b"\r\n" + stream).find(b"\r\n.\r\n")
    done = end >= 0
    if done:
        region, used = stream[:end], end + 3
    else:
        # lines that are complete (and whose end is known not to be half a CRLF)
        cut = max(stream.rfind(b"\n"), stream.rfind(b"\r", 0, len(stream) - 1)) + 1
        region, used = stream[:cut], cut
    content, removed, too_long = [], 0, False
    for line in re.split(rb"\r\n|\r|\n", region)[:-1]:
        if line == b".":
            removed += 3
            continue
        if line.startswith(b"."):
            line = line[1:]
        removed += line.count(b"\x00")
        line = line.replace(b"\x00", b"")
        too_long = too_long or len(line) > MAX_TEXT_LINE
        content.append(line + b"\r\n")
    return b"".join(content), used, done, removed, too_long


def drive_reader(chunks: list[bytes], bare_newlines: str = "reject") -> tuple[bytes, int, bool, int]:
    """Feed chunks the way the server does; (content, used, done, largest held-back buffer)."""
    reader, buf, out, used, largest = DataReader(bare_newlines), b"", [], 0, 0
    for chunk in chunks:
        buf += chunk
        while buf:
            content, n, done = reader.feed(buf)
            out.append(content)
            buf = buf[n:]
            used += n
            if done:
                return b"".join(out), used, True, largest
            if n == 0:
                break
        largest = max(largest, len(buf))
    return b"".join(out), used, False, largest


data_tokens = st.sampled_from([b"a", b"\r\n", b"\r", b"\n", b".", b"..", b"\x00", b"\r\n.\r\n",
                               b"\r\n.", b".\r\n", b"b" * 990, b"c" * 1200])


@FUZZ
@given(stream=st.lists(data_tokens, max_size=30).map(b"".join),
       cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=30))
def test_data_reader_matches_line_by_line_reference(stream, cuts):
    for full in (stream, stream + b"\r\n.\r\nNEXT"):
        expected_content, expected_used, expected_done = reference_data(full)
        for chunks in ([full], split_at(full, cuts), one_byte_chunks(full)):
            content, used, done, largest = drive_reader(chunks)
            assert done == expected_done
            if done:
                assert (content, used) == (expected_content, expected_used)
            else:
                # everything up to the last CRLF is passed on; what is held
                # back is part of one unfinished line, at most about a kilobyte
                assert content.startswith(expected_content)
                rest = full[used:]
                assert b"\r\n" not in rest
                assert len(rest) <= MAX_TEXT_LINE + 5
            assert largest <= MAX_TEXT_LINE + 5


normalize_tokens = st.sampled_from([b"a", b"\r\n", b"\r", b"\n", b".", b"..", b"\x00", b"\r\n.\r\n",
                                    b"\n.\n", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n", b"\n..\n",
                                    b"\r\n.", b".\r\n", b".\n", b"b" * 990, b"c" * 1200])


@FUZZ
@given(stream=st.lists(normalize_tokens, max_size=30).map(b"".join),
       cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=30))
def test_normalizing_data_reader_matches_line_by_line_reference(stream, cuts):
    """Every split of the same bytes: the same content (CRLF only), the same end point."""
    for full in (stream, stream + b"\r\n.\r\nNEXT"):
        expected, expected_used, expected_done, _, _ = reference_normalized(full)
        for chunks in ([full], split_at(full, cuts), one_byte_chunks(full)):
            content, used, done, largest = drive_reader(chunks, "normalize")
            # the reader leaves NUL removal to the LineChecker
            content = content.replace(b"\x00", b"")
            assert done == expected_done
            if done:
                assert (content, used) == (expected, expected_used)
            else:
                # whole lines are passed on; what is held back is at most an
                # unfinished line (over 998 octets it is passed on without its end)
                assert content.startswith(expected)
                assert used >= expected_used or len(full) - used <= MAX_TEXT_LINE + 5
            assert re.search(rb"\r(?!\n)|(?<!\r)\n", content) is None
            assert largest <= MAX_TEXT_LINE + 5


def test_data_reader_leaves_pipelined_bytes_to_the_caller():
    content, used, done = DataReader().feed(b"hi\r\n.\r\nQUIT\r\n")
    assert (content, used, done) == (b"hi\r\n", 7, True)


# ------------------------------------------------- LineChecker vs reference
def reference_lines(content: bytes, bare_newlines: str) -> tuple[bytes, bool, bool]:
    """(stored content, bare seen, too long seen), one line at a time (NULs removed
    under "normalize")."""
    bare = re.search(rb"\r(?!\n)|(?<!\r)\n", content) is not None
    body = content[:-1] if content.endswith(b"\r") else content
    if bare_newlines == "normalize":
        lines = [line.replace(b"\x00", b"") for line in re.split(rb"\r\n|\r|\n", content)]
        stored = b"\r\n".join(lines)
        measured = [line.replace(b"\x00", b"") for line in re.split(rb"\r\n|\r|\n", body)]
    else:
        stored = content
        measured = body.split(b"\r\n")
    too_long = any(len(line) > MAX_TEXT_LINE for line in measured)
    return stored, bare, too_long


line_tokens = st.sampled_from([b"a", b"\r\n", b"\r", b"\n", b"\r\r\n", b"\n\r", b"\x00", b"b" * 400,
                               b"c" * 997, b"d" * 999])


@FUZZ
@given(content=st.lists(line_tokens, max_size=20).map(b"".join),
       bare_newlines=st.sampled_from(["reject", "normalize"]),
       cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=30))
def test_line_checker_matches_line_by_line_reference(content, bare_newlines, cuts):
    expected = reference_lines(content, bare_newlines)
    for chunks in ([content], split_at(content, cuts), one_byte_chunks(content)):
        checker = LineChecker(bare_newlines)
        stored = b"".join(checker.feed(chunk) for chunk in chunks) + checker.finish()
        assert (stored, checker.bare, checker.too_long) == expected
        assert checker.nul == (b"\x00" in content)
        assert checker.removed == (content.count(b"\x00") if bare_newlines == "normalize" else 0)


# ------------------------------- the whole DATA path against the references
TRANSACTION = b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<c@d.test>\r\n"
DATA_REPLIES = {
    "size": b"552 5.3.4 Error: message size exceeds fixed maximum message size\r\n",
    "bare": b"550 5.6.11 Error: message contains bare <CR> or <LF>; lines must end with <CR><LF>\r\n",
    "nul": b"550 5.6.0 Error: message contains NUL characters\r\n",
    "long": b"550 5.6.0 Error: message has lines longer than 998 octets (RFC 5322 2.1.1)\r\n",
    "ok": b"250 2.0.0 Ok\r\n",
}


@FUZZ
@given(body=st.lists(st.one_of(data_tokens, line_tokens, normalize_tokens), max_size=25).map(b"".join),
       bare_newlines=st.sampled_from(["reject", "normalize"]),
       limit=st.sampled_from([60, 5000, 1_000_000]),
       cuts=st.lists(st.integers(min_value=0, max_value=1 << 16), max_size=20))
def test_data_outcome_matches_the_line_by_line_references(body, bare_newlines, limit, cuts):
    if bare_newlines == "normalize":
        stored, _, _, removed, too_long = reference_normalized(body + b"\r\n.\r\n")
        bare = nul = False
    else:
        stored, _, _ = reference_data(body + b"\r\n.\r\n")
        _, bare, too_long = reference_lines(stored, bare_newlines)
        removed, nul = 0, b"\x00" in stored
    if len(stored) + removed > limit:
        outcome = "size"
    elif bare:
        outcome = "bare"
    elif nul:
        outcome = "nul"
    elif too_long:
        outcome = "long"
    else:
        outcome = "ok"
    stream = TRANSACTION + b"DATA\r\n" + body + b"\r\n.\r\n"
    for chunks in ([stream], split_at(stream, cuts)):
        driver = Driver(ProtocolLimits(max_message_size=limit, bare_newlines=bare_newlines))
        driver.feed_chunks(chunks)
        replies = bytes(driver.replies)
        go_ahead = b"354 End data with <CR><LF>.<CR><LF>\r\n"
        after = replies[replies.index(go_ahead) + len(go_ahead):]
        assert after.startswith(DATA_REPLIES[outcome])
        first = driver.messages()[0]
        if outcome == "ok":
            assert first == ("end", stored)
        else:
            assert first[0] == "aborted"
            assert len(first[1]) <= limit
