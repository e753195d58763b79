"""SpoolWriter.drop_headers: removing header fields from a message being received."""

from __future__ import annotations

import io
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from pymta.envelope import Envelope, Recipient
from pymta.spool.message import header_field_spans, open_body_file, parse_headers
from pymta.spool.queuefile import COPY_CHUNK, SpoolError, load_queue_file
from pymta.spool.store import Spool
from pymta.spool.writer import MEMORY_BODY_LIMIT


class SyncReactor(Clock):
    """Runs the spool's 'threaded' flushes at once, on the calling thread."""

    def getThreadPool(self):
        return self

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            on_result(True, f(*args, **kwargs))
        except BaseException:
            on_result(False, Failure())

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


#: the body held in memory until commit, or streamed into its temp file from the start
MODES = {"memory": MEMORY_BODY_LIMIT, "file": 0}


@pytest.fixture(params=sorted(MODES))
def spool(tmp_path, request) -> Spool:
    return Spool(str(tmp_path / "spool"), reactor=SyncReactor(), memory_limit=MODES[request.param])


def receive(spool: Spool, data: bytes):
    writer = spool.new_message()
    for i in range(0, len(data), 5000):
        writer.write(data[i:i + 5000])
    return writer


def contents(writer) -> bytes:
    """The body as a filter sees it; in file mode also checks the file itself."""
    with writer.view().open() as f:
        data = f.read()
    assert writer.size == len(data)
    if not writer.in_memory:
        with open(writer.path, "rb") as f:
            assert f.read() == data
    return data


MESSAGE = (b"Authentication-Results: mx.example.org; spf=pass\r\n"
           b"Subject: a folded\r\n"
           b"  subject line\r\n"
           b"Authentication-Results: mx.example.org;\r\n"
           b"\tdkim=pass header.d=example.org\r\n"
           b"From: a@example.org\r\n"
           b"\r\n"
           b"Authentication-Results: in the body stays\r\n"
           b"body\r\n")


def new_envelope() -> Envelope:
    return Envelope(queue_id="", sender="a@example.org",
                    recipients=[Recipient("b@example.org", "b@example.org", "local")],
                    received_at=1_700_000_000.0)


def test_drops_fields_with_their_continuation_lines(spool):
    writer = receive(spool, MESSAGE)
    assert [name for name, _ in writer.view().headers()] == [
        "Authentication-Results", "Subject", "Authentication-Results", "From"]
    writer.drop_headers((2, 0))
    expected = (b"Subject: a folded\r\n  subject line\r\n"
                b"From: a@example.org\r\n"
                b"\r\n"
                b"Authentication-Results: in the body stays\r\n"
                b"body\r\n")
    assert contents(writer) == expected
    assert writer.size == len(expected)
    assert writer.view().headers() == [("Subject", "a folded  subject line"),
                                       ("From", "a@example.org")]


def test_writes_after_a_drop_append_at_the_new_end(spool):
    writer = receive(spool, MESSAGE)
    writer.drop_headers((0,))
    writer.write(b"more\r\n")
    assert contents(writer) == MESSAGE[len(b"Authentication-Results: mx.example.org; spf=pass\r\n"):] + b"more\r\n"


def test_empty_and_out_of_range_positions(spool):
    writer = receive(spool, MESSAGE)
    writer.drop_headers(())
    writer.drop_headers((4, 99, -1))       # no such fields: logged, nothing changes
    assert contents(writer) == MESSAGE and writer.size == len(MESSAGE)
    writer.drop_headers((3, 3, 7))         # duplicates collapse; 7 ignored
    assert b"From: a@example.org" not in contents(writer)


def test_large_body_moved_byte_for_byte(spool):
    body = bytes(range(256)) * (3 * COPY_CHUNK // 256 + 17)
    data = b"X-Drop: me\r\nX-Keep: yes\r\n\r\n" + body
    writer = receive(spool, data)
    writer.drop_headers((0,))
    assert contents(writer) == b"X-Keep: yes\r\n\r\n" + body
    assert writer.size == len(data) - len(b"X-Drop: me\r\n")


def test_drop_then_commit_keeps_the_spool_consistent(spool):
    writer = receive(spool, MESSAGE)
    writer.drop_headers((0, 2))
    envelope = new_envelope()
    results = []
    writer.commit(envelope).addBoth(results.append)
    assert results == [None]
    assert envelope.size == writer.size
    [recovered] = Spool(spool.directory, reactor=SyncReactor()).recover()   # size check passes
    assert recovered.size == load_queue_file(spool.queue_dir, envelope.queue_id)[1] == envelope.size


def test_after_commit_or_abort_is_an_error(spool):
    writer = receive(spool, MESSAGE)
    writer.abort()
    with pytest.raises(SpoolError):
        writer.drop_headers((0,))


def test_header_section_without_blank_line_and_bare_lf(spool):
    data = b"A: 1\nB: 2\r\nnot a header line\r\nC: 3\r\n"
    writer = receive(spool, data)
    assert [n for n, _ in writer.view().headers()] == ["A", "B"]
    writer.drop_headers((0,))
    assert contents(writer) == b"B: 2\r\nnot a header line\r\nC: 3\r\n"


# -- the numbering matches parse_headers, whatever the message --------------------

_name = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E,
                                       blacklist_characters=":"), min_size=1, max_size=12)
_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20)
_field = st.tuples(_name, _value, st.lists(_value.map(lambda v: " " + v), max_size=2),
                   st.sampled_from([b"\r\n", b"\n"]))


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fields=st.lists(_field, max_size=8), body=st.binary(max_size=300), data=st.data(),
       memory_limit=st.sampled_from([MEMORY_BODY_LIMIT, 0, 40]))
def test_spans_agree_with_parse_headers_and_drop_is_exact(tmp_path, fields, body, data,
                                                            memory_limit):
    raw_fields = []
    for name, value, continuations, eol in fields:
        raw = f"{name}: {value}".encode() + eol + b"".join(c.encode() + eol for c in continuations)
        raw_fields.append(raw)
    message = b"".join(raw_fields) + b"\r\n" + body
    parsed = parse_headers(io.BytesIO(message))
    spans = header_field_spans(io.BytesIO(message))
    assert len(spans) == len(parsed)
    for (start, end), (name, _value) in zip(spans, parsed):
        assert message[start:end].startswith(name.encode())
    drop = data.draw(st.sets(st.integers(0, max(len(spans) - 1, 0))))
    spool = Spool(str(tmp_path / f"s{len(os.listdir(tmp_path))}"), reactor=SyncReactor(),
                  memory_limit=memory_limit)
    writer = receive(spool, message)
    writer.drop_headers(tuple(drop))
    kept = b"".join(message[s:e] for i, (s, e) in enumerate(spans) if i not in drop)
    expected = kept + message[spans[-1][1]:] if spans else message
    assert contents(writer) == expected
    assert writer.size == len(expected)
    assert parse_headers(io.BytesIO(expected)) == [f for i, f in enumerate(parsed) if i not in drop]
    writer.abort()


def test_drop_in_memory_then_spill_keeps_the_dropped_body(tmp_path):
    spool = Spool(str(tmp_path / "spool"), reactor=SyncReactor(), memory_limit=len(MESSAGE))
    writer = receive(spool, MESSAGE)
    assert writer.in_memory
    view = writer.view()
    writer.drop_headers((0,))
    first = len(b"Authentication-Results: mx.example.org; spf=pass\r\n")
    writer.write(b"x" * (first + 1))           # now over the limit: spills
    assert not writer.in_memory
    assert contents(writer) == MESSAGE[first:] + b"x" * (first + 1)
    with view.open() as f:                     # a view taken before the drop sees it too
        assert f.read() == MESSAGE[first:]


def test_drop_then_commit_from_memory_writes_the_dropped_body(tmp_path):
    spool = Spool(str(tmp_path / "spool"), reactor=SyncReactor())
    writer = receive(spool, MESSAGE)
    assert writer.in_memory and os.listdir(os.path.join(spool.directory, "tmp")) == []
    writer.drop_headers((1, 3))
    envelope = new_envelope()
    results = []
    writer.commit(envelope).addBoth(results.append)
    assert results == [None]
    with open_body_file(spool.body_path(envelope.queue_id), envelope.size) as f:
        stored = f.read()
    assert [name for name, _ in parse_headers(io.BytesIO(stored))] == [
        "Authentication-Results", "Authentication-Results"]
    assert len(stored) == envelope.size == load_queue_file(spool.queue_dir, envelope.queue_id)[1]


def test_a_spilled_body_is_cut_by_the_commit_not_on_the_reactor_thread(tmp_path):
    spool = Spool(str(tmp_path / "spool"), reactor=SyncReactor(), memory_limit=0)
    body = bytes(range(256)) * (2 * COPY_CHUNK // 256 + 3)
    data = b"X-Drop: me\r\nX-Keep: yes\r\n\r\n" + body
    writer = receive(spool, data)
    writer.drop_headers((0,))
    writer._file.flush()
    with open(writer.path, "rb") as fp:
        assert fp.read() == data                      # nothing moved yet
    assert writer.size == len(data) - len(b"X-Drop: me\r\n")
    writer.write(b"tail\r\n")                         # still appended at the end
    envelope = new_envelope()
    results = []
    writer.commit(envelope).addBoth(results.append)
    assert results == [None]
    with open_body_file(spool.body_path(envelope.queue_id), envelope.size) as fp:
        assert fp.read() == b"X-Keep: yes\r\n\r\n" + body + b"tail\r\n"
    assert load_queue_file(spool.queue_dir, envelope.queue_id) == (envelope, envelope.size)
    assert envelope.size == len(data) - len(b"X-Drop: me\r\n") + len(b"tail\r\n")


def test_a_cut_that_fails_at_commit_fails_the_commit_and_leaves_nothing(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path / "spool"), reactor=SyncReactor(), memory_limit=0)
    writer = receive(spool, MESSAGE)
    writer.drop_headers((0,))

    def broken(*args):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr("pymta.spool.disk.cut_ranges", broken)
    envelope = new_envelope()
    results = []
    writer.commit(envelope).addBoth(results.append)
    assert isinstance(results[0], Failure) and results[0].check(SpoolError)
    assert "Input/output error" in str(results[0].value)
    assert spool.queue_ids() == []
    assert os.listdir(os.path.join(spool.directory, "tmp")) == []
