"""The durable spool: commit order, recovery, group commit, updates, kill -9."""

from __future__ import annotations

import hashlib
import io
import json
import os
import queue
import random
import signal
import stat
import subprocess
import sys
import textwrap
import errno
import threading
import time
from collections import deque
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from pymta.envelope import DELIVERED, FAILED, PENDING, Envelope, Recipient
from pymta.spool.message import parse_headers
from pymta.spool.queueid import LENGTH, QueueIdGenerator, is_queue_id, new_queue_id, queue_id_time
from pymta.spool import disk as store_module
from pymta.spool.disk import QueueDirectory
from pymta.spool.queuefile import TRAILER_BYTES, TRAILER_FORMAT, SpoolError
from pymta.spool.store import Spool
from pymta.spool.writer import MEMORY_BODY_LIMIT
from schedulerkit import SyncThreadPool

REPO = Path(__file__).resolve().parent.parent


# -- a reactor stand-in: Clock plus a thread pool the test controls ---------------

class ManualThreadPool:
    """Holds 'threaded' work until the test runs it, like a busy pool thread."""

    def __init__(self):
        self.jobs = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.jobs.append((on_result, f, args, kwargs))

    def run_one(self) -> None:
        SyncThreadPool().callInThreadWithCallback(*self._pop())

    def _pop(self):
        on_result, f, args, kwargs = self.jobs.pop(0)
        return (on_result, f, *args)

    def run_all(self) -> int:
        count = 0
        while self.jobs:
            self.run_one()
            count += 1
        return count

    def kinds(self) -> list[str]:
        """What each held job does: the request class of its batch (_Commit, _Update, _Remove)."""
        return [type(args[0][0]).__name__ for _, _, args, _ in self.jobs]

    def run_kind(self, kind: str) -> None:
        """Run the first held job of this kind, leaving the others waiting."""
        index = self.kinds().index(kind)
        self.jobs.insert(0, self.jobs.pop(index))
        self.run_one()


class FakeReactor(Clock):
    def __init__(self, pool=None):
        super().__init__()
        self.pool = pool or SyncThreadPool()

    def getThreadPool(self):
        return self.pool

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def make_envelope(queue_id: str = "", recipients=None, sender: str = "sender@example.net") -> Envelope:
    if recipients is None:
        recipients = [Recipient("alice@example.org", "alice@example.org", "local")]
    return Envelope(queue_id=queue_id, sender=sender, recipients=recipients,
                    received_at=1_700_000_000.0, client_ip="192.0.2.7", helo="client.example.net",
                    prepend=["Received: from client.example.net\r\n\tby mx.example.org; now\r\n"])


def result_of(d):
    """The result of a fired Deferred (raises if it failed or has not fired)."""
    box = []
    d.addBoth(box.append)
    assert box, "Deferred has not fired"
    if isinstance(box[0], Failure):
        box[0].raiseException()
    return box[0]


def spool_files(spool: Spool) -> dict[str, list[str]]:
    return {sub: sorted(os.listdir(os.path.join(spool.directory, sub)))
            for sub in ("tmp", "queue", "corrupt")}


#: the on-disk trailer of a committed message file, as the spool's format defines it
TRAILER_PREFIX = b"pymta envelope "


def split_message_file(path: str) -> tuple[bytes, bytes, bytes]:
    """A committed queue/<ID>.msg as (body, envelope JSON, trailer); asserts the trailer is right.

    The trailer is ``b"pymta envelope %010d\\n"`` with the envelope's length in
    bytes; the envelope is one JSON line; the body is everything before it.
    """
    data = Path(path).read_bytes()
    assert len(data) >= TRAILER_BYTES == 26, (path, len(data))
    trailer = data[-TRAILER_BYTES:]
    digits = trailer[len(TRAILER_PREFIX):-1]
    assert trailer.startswith(TRAILER_PREFIX) and trailer.endswith(b"\n"), trailer
    assert len(digits) == 10 and digits.isdigit(), trailer
    length = int(digits)
    assert trailer == TRAILER_FORMAT % length == b"pymta envelope %010d\n" % length
    assert TRAILER_BYTES + length <= len(data), (trailer, len(data))
    envelope_json = data[len(data) - TRAILER_BYTES - length:-TRAILER_BYTES]
    assert envelope_json.endswith(b"\n") and envelope_json.count(b"\n") == 1, envelope_json
    body = data[:len(data) - TRAILER_BYTES - length]
    return body, envelope_json, trailer


def embedded_envelope(path: str) -> Envelope:
    """The envelope inside a committed message file (as committed, before any update)."""
    _, envelope_json, _ = split_message_file(path)
    return Envelope.from_json(json.loads(envelope_json.decode("utf-8")))


def stored_body(spool: Spool, queue_id: str) -> bytes:
    """The body in queue/<ID>.msg: its first envelope.size bytes, the rest checked too."""
    body, envelope_json, _ = split_message_file(spool.body_path(queue_id))
    embedded = Envelope.from_json(json.loads(envelope_json.decode("utf-8")))
    assert embedded.queue_id == queue_id
    assert len(body) == embedded.size == spool.load(queue_id).size
    return body


def message_file_bytes(body: bytes, envelope: Envelope) -> bytes:
    """What queue/<ID>.msg holds for this body and envelope (to write damaged ones)."""
    envelope_json = json.dumps(envelope.to_json(), ensure_ascii=False,
                               separators=(",", ":")).encode("utf-8") + b"\n"
    return body + envelope_json + b"pymta envelope %010d\n" % len(envelope_json)


def commit_message(spool: Spool, body: bytes, envelope: Envelope | None = None) -> Envelope:
    writer = spool.new_message()
    for i in range(0, len(body), 7):
        writer.write(body[i:i + 7])
    envelope = envelope or make_envelope()
    result_of(writer.commit(envelope))
    return envelope


@pytest.fixture(params=["memory", "file"])
def spool(tmp_path, request) -> Spool:
    """Bodies held in memory until commit (the default), or in a temp file from the start."""
    limit = MEMORY_BODY_LIMIT if request.param == "memory" else 0
    return Spool(str(tmp_path / "spool"), reactor=FakeReactor(), memory_limit=limit)


# -- queue ids ---------------------------------------------------------------------

def test_a_forked_child_does_not_repeat_its_parents_queue_ids():
    generator = QueueIdGenerator(clock=lambda: 1_700_000_000_000_000_000)   # a frozen clock
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:                                       # the child: same clock, same microsecond
        os.write(writer, "".join(generator.next() for _ in range(20)).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    with os.fdopen(reader, "rb") as fp:
        child = fp.read().decode()
    child_ids = {child[i:i + LENGTH] for i in range(0, len(child), LENGTH)}
    parent_ids = {generator.next() for _ in range(20)}
    assert len(child_ids) == 20 and not child_ids & parent_ids


def test_queue_ids_are_unique_sortable_and_filename_safe():
    ids = [new_queue_id() for _ in range(5000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    for queue_id in ids[:50]:
        assert len(queue_id) == LENGTH == 16
        assert queue_id.isalnum() and queue_id.upper() == queue_id
        assert is_queue_id(queue_id)
    assert abs(queue_id_time(ids[0]) - time.time()) < 60


def test_queue_ids_stay_ordered_when_the_clock_steps_back():
    now = [1_700_000_000_000_000_000]
    generator = QueueIdGenerator(clock=lambda: now[0])
    first = generator.next()
    now[0] -= 3_600 * 10**9  # an hour back
    second = generator.next()
    third = generator.next()
    assert first < second < third


def test_ids_sort_by_time_across_generators():
    early = QueueIdGenerator(clock=lambda: 1_700_000_000_000_000_000).next()
    late = QueueIdGenerator(clock=lambda: 1_700_000_000_000_001_000).next()  # 1 us later
    assert early < late


def test_is_queue_id_refuses_other_names():
    assert not is_queue_id("../../etc/passw")
    assert not is_queue_id("1K0TJEHGTP5CKM0")      # 15 characters
    assert not is_queue_id("1K0TJEHGTP5CKM0I")     # I is not in the alphabet
    assert not is_queue_id("1k0tjehgtp5ckm06")


# -- writing and committing ----------------------------------------------------------

def test_directory_tree_is_created_private(tmp_path):
    spool = Spool(str(tmp_path / "a" / "spool"), reactor=FakeReactor())
    for sub in ("", "tmp", "queue", "corrupt"):
        mode = stat.S_IMODE(os.stat(os.path.join(spool.directory, sub)).st_mode)
        assert mode == 0o700, (sub, oct(mode))


def test_unknown_sync_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="sync mode"):
        Spool(str(tmp_path / "spool"), reactor=FakeReactor(), sync="sometimes")


def test_commit_makes_body_and_envelope_durable_and_visible(spool):
    body = b"Subject: hi\r\n\r\nline one\r\n.leading dot kept\r\n" * 100
    writer = spool.new_message()
    writer.write(body[:10])
    writer.write(body[10:])
    assert writer.size == len(body)
    assert spool.queue_ids() == []                      # nothing committed yet
    envelope = make_envelope()
    result_of(writer.commit(envelope))
    assert envelope.queue_id == writer.queue_id
    assert envelope.size == len(body)
    assert spool.queue_ids() == [writer.queue_id]
    message = spool.message(envelope)
    with message.open_body() as fp:
        assert fp.read() == body                       # one body, exact bytes, no prepend
    assert message.prepend_bytes() == b"Received: from client.example.net\r\n\tby mx.example.org; now\r\n"
    # one file: the body, then the envelope, then the trailer; no envelope file of its own
    stored_body_bytes, envelope_json, _ = split_message_file(spool.body_path(writer.queue_id))
    assert stored_body_bytes == body
    assert Envelope.from_json(json.loads(envelope_json)) == envelope
    assert spool.load(writer.queue_id) == envelope
    assert spool_files(spool) == {"tmp": [], "queue": [writer.queue_id + ".msg"], "corrupt": []}
    assert not os.path.exists(spool.envelope_path(writer.queue_id))


def test_commit_refuses_an_envelope_of_another_message(spool):
    writer = spool.new_message()
    writer.write(b"x")
    with pytest.raises(SpoolError, match="queue id"):
        writer.commit(make_envelope(queue_id="0000000000000000"))


def test_write_after_commit_is_an_error(spool):
    writer = spool.new_message()
    writer.write(b"x\r\n")
    result_of(writer.commit(make_envelope()))
    with pytest.raises(SpoolError):
        writer.write(b"more")
    with pytest.raises(SpoolError):
        writer.commit(make_envelope())


def test_commit_fires_only_when_its_batch_is_on_disk(tmp_path):
    pool = ManualThreadPool()
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor(pool))
    writer = spool.new_message()
    writer.write(b"body\r\n")
    d = writer.commit(make_envelope())
    fired = []
    d.addCallback(fired.append)
    assert fired == []
    assert not os.path.exists(spool.body_path(writer.queue_id))   # not visible before the flush
    assert spool.queue_ids() == []
    pool.run_all()
    assert fired == [None]
    assert spool.queue_ids() == [writer.queue_id]
    assert stored_body(spool, writer.queue_id) == b"body\r\n"
    assert not os.path.exists(spool.envelope_path(writer.queue_id))   # no envelope file: it is inside


def test_group_commit_batches_concurrent_commits(tmp_path):
    pool = ManualThreadPool()
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor(pool))
    batches = []
    real_flush = spool.disk.commit

    def counting_flush(batch):
        batches.append(len(batch))
        return real_flush(batch)
    spool.disk.commit = counting_flush

    writers = [spool.new_message() for _ in range(50)]
    fired = []
    for n, writer in enumerate(writers):
        writer.write(b"message %d\r\n" % n)
        writer.commit(make_envelope()).addCallback(lambda _, n=n: fired.append(n))
    # the first commit started a flush; the other 49 wait for it to end
    assert len(pool.jobs) == 1
    pool.run_one()
    assert fired == [0]
    assert len(pool.jobs) == 1                 # one flush for all that waited
    pool.run_one()
    assert sorted(fired) == list(range(50))
    assert batches == [1, 49]
    assert len(spool.queue_ids()) == 50


def test_commits_arriving_during_a_flush_join_the_next_one(tmp_path):
    pool = ManualThreadPool()
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor(pool))
    first = spool.new_message()
    first.write(b"1")
    d1 = first.commit(make_envelope())
    later = []
    for _ in range(3):
        writer = spool.new_message()
        writer.write(b"2")
        later.append(writer.commit(make_envelope()))
    update = spool.update(make_envelope(queue_id=first.queue_id))   # after d1 in order
    assert len(pool.jobs) == 1              # the update waits for the commit it follows
    pool.run_one()
    result_of(d1)
    assert not any(d.called for d in later + [update])
    # one batch for the three later commits; the update in its own pipeline
    assert pool.run_all() == 2
    for d in later + [update]:
        result_of(d)


def test_one_failed_request_does_not_fail_its_batch(tmp_path):
    pool = ManualThreadPool()
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor(pool), memory_limit=0)
    blocker = spool.new_message()
    blocker.write(b"0")
    blocker.commit(make_envelope())
    good, bad = spool.new_message(), spool.new_message()
    good.write(b"good")
    bad.write(b"bad")
    d_good, d_bad = good.commit(make_envelope()), bad.commit(make_envelope())
    os.unlink(bad.path)              # its body vanished before the flush
    pool.run_all()
    result_of(d_good)
    with pytest.raises(SpoolError, match=bad.queue_id):
        result_of(d_bad)
    assert bad.queue_id not in spool.queue_ids()
    assert good.queue_id in spool.queue_ids()
    assert spool_files(spool)["tmp"] == []


@pytest.mark.parametrize("memory_limit", [MEMORY_BODY_LIMIT, 0])
def test_abort_discards_the_body_and_is_idempotent(tmp_path, memory_limit):
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor(), memory_limit=memory_limit)
    writer = spool.new_message()
    writer.write(b"spam")
    assert os.path.exists(writer.path) == (memory_limit == 0)
    writer.abort()
    writer.abort()
    assert not os.path.exists(writer.path)
    assert spool_files(spool) == {"tmp": [], "queue": [], "corrupt": []}
    with pytest.raises(SpoolError):
        writer.write(b"more")


def test_abort_after_commit_changes_nothing(spool):
    writer = spool.new_message()
    writer.write(b"kept")
    result_of(writer.commit(make_envelope()))
    writer.abort()
    assert spool.queue_ids() == [writer.queue_id]


# -- the view for data-stage filters ---------------------------------------------------

def test_view_sees_everything_written_so_far_and_parses_headers(spool):
    writer = spool.new_message()
    writer.write(b"From: Alice <alice@example.org>\r\nSubject: a long\r\n")
    writer.write(b"  folded\r\n\tsubject\r\nX-Empty:\r\nX-Utf8: gr\xc3\xbc\xc3\x9fe\r\n")
    writer.write(b"X-Bad: \xff\xfe\r\n\r\nBody: not a header\r\n")
    view = writer.view()
    assert view.size == writer.size
    with view.open() as fp:
        assert fp.read().endswith(b"Body: not a header\r\n")
    assert view.headers() == [
        ("From", "Alice <alice@example.org>"),
        ("Subject", "a long  folded\tsubject"),
        ("X-Empty", ""),
        ("X-Utf8", "gr\u00fc\u00dfe"),
        ("X-Bad", "\ufffd\ufffd"),
    ]


def test_header_parsing_stops_where_the_body_starts():
    assert parse_headers(io.BytesIO(b"Subject: x\nno colon here\nTo: y\n")) == [("Subject", "x")]
    assert parse_headers(io.BytesIO(b" leading continuation\r\nSubject: x\r\n")) == []
    assert parse_headers(io.BytesIO(b"")) == []
    assert parse_headers(io.BytesIO(b"Subject : spaced\r\n")) == [("Subject", "spaced")]
    big = b"Subject: x\r\n" + b"X-Pad: " + b"a" * 5000 + b"\r\n"
    assert parse_headers(io.BytesIO(big), limit=100) == [("Subject", "x")]


# -- updates and removal ---------------------------------------------------------------

def test_update_persists_per_recipient_state(spool):
    envelope = commit_message(spool, b"Subject: x\r\n\r\nbody\r\n", make_envelope(recipients=[
        Recipient("a@example.org", "a@example.org", "local"),
        Recipient("b@example.org", "list@example.org", "relay", notify=("FAILURE",), orcpt="rfc822;b@x"),
    ]))
    envelope.recipients[0].state = DELIVERED
    envelope.recipients[0].attempts = 1
    envelope.recipients[0].finished_at = 1_700_000_010.0
    envelope.recipients[1].attempts = 2
    envelope.recipients[1].next_attempt = 1_700_000_900.0
    envelope.recipients[1].last_result = "451 4.4.1 no answer"
    message_file = Path(spool.body_path(envelope.queue_id)).read_bytes()
    result_of(spool.update(envelope))
    assert spool.load(envelope.queue_id) == envelope
    # the update is queue/<ID>.env; the message file, its embedded envelope included, is untouched
    assert spool_files(spool) == {"tmp": [], "corrupt": [],
                                  "queue": [envelope.queue_id + ".env", envelope.queue_id + ".msg"]}
    assert Envelope.from_json(json.loads(Path(spool.envelope_path(envelope.queue_id)).read_bytes())) == envelope
    assert Path(spool.body_path(envelope.queue_id)).read_bytes() == message_file
    assert embedded_envelope(spool.body_path(envelope.queue_id)).recipients[0].state == PENDING


def test_a_fresh_commit_round_trips_its_envelope_through_the_trailer(spool):
    """load() of a message just committed reads the envelope back from the end of its file."""
    bodies = [
        b"",                                           # an empty body: the file is envelope + trailer
        b"x",
        b"Subject: tricky\r\n\r\nends like a trailer\npymta envelope 0000000003\n",
        b"{\"queue_id\": \"0000000000000000\"}\n",       # looks like an envelope line
        b"Subject: big\r\n\r\n" + bytes(range(256)) * 1000,
    ]
    envelopes = []
    for n, body in enumerate(bodies):
        envelope = make_envelope(
            sender="j\u00fcrgen@example.net" if n % 2 else "sender@example.net",   # UTF-8: bytes, not chars
            recipients=[Recipient("\u00e5sa@example.org", "\u00e5sa@example.org", "local"),
                        Recipient("b@example.org", "b@example.org", "relay", notify=("FAILURE",))])
        commit_message(spool, body, envelope)
        envelopes.append(envelope)
    for body, envelope in zip(bodies, envelopes):
        path = spool.body_path(envelope.queue_id)
        stored, envelope_json, trailer = split_message_file(path)
        assert stored == body and envelope.size == len(body)
        assert json.loads(envelope_json.decode("utf-8")) == envelope.to_json()
        assert trailer == b"pymta envelope %010d\n" % len(envelope_json)
        assert os.path.getsize(path) == len(body) + len(envelope_json) + 26
        loaded = spool.load(envelope.queue_id)
        assert loaded == envelope and loaded.sender == envelope.sender
        with spool.message(loaded).open_body() as fp:     # readers stop where the body ends
            assert fp.read() == body
    assert Spool(spool.directory, reactor=FakeReactor()).recover() == envelopes


def test_remove_deletes_the_message_file(spool):
    keep = commit_message(spool, b"keep")
    gone = commit_message(spool, b"gone")
    result_of(spool.remove(gone.queue_id))
    assert spool.queue_ids() == [keep.queue_id]
    assert spool_files(spool) == {"tmp": [], "queue": [keep.queue_id + ".msg"], "corrupt": []}
    assert spool.load(keep.queue_id) == keep
    with pytest.raises(FileNotFoundError):
        spool.load(gone.queue_id)


def test_a_removal_after_an_update_removes_both_files(spool):
    keep = commit_message(spool, b"keep")
    gone = commit_message(spool, b"gone")
    gone.recipients[0].attempts = 1
    result_of(spool.update(gone))
    assert spool_files(spool)["queue"] == sorted([keep.queue_id + ".msg", gone.queue_id + ".env",
                                                  gone.queue_id + ".msg"])
    inodes = {os.stat(spool.body_path(gone.queue_id)).st_ino,
              os.stat(spool.envelope_path(gone.queue_id)).st_ino}
    result_of(spool.remove(gone.queue_id, gone.size))
    assert spool.queue_ids() == [keep.queue_id]
    assert spool_files(spool) == {"tmp": [], "queue": [keep.queue_id + ".msg"], "corrupt": []}
    # both files retired into free/ for reuse
    assert spool.free_files == 2
    assert {os.stat(os.path.join(spool.free_dir, n)).st_ino for n in free_names(spool)} == inodes
    assert Spool(spool.directory, reactor=FakeReactor()).recover() == [keep]


def batch_protocol(monkeypatch) -> None:
    """Commits one at a time as in a batch under load: they take recycled files.

    (A commit alone in its batch takes a new file: see the lone-commit tests.)
    """
    monkeypatch.setattr(QueueDirectory, "lone_commits_fresh", False)


def free_names(spool: Spool) -> list[str]:
    return sorted(os.listdir(os.path.join(spool.directory, "free")))


@pytest.mark.parametrize("sync", ["fsync", "syncfs"])
def test_a_lone_commit_takes_a_new_file_named_in_queue_before_one_sync(tmp_path, monkeypatch, sync):
    """One journal commit for a lone session: the file and queue/ are synced together,
    after the rename (a recycled file would wait, so a free one is left alone)."""
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor(), sync=sync)
    gone = commit_message(spool, b"Subject: old\r\n\r\nold\r\n")
    result_of(spool.remove(gone.queue_id))
    free_inode = os.stat(os.path.join(spool.free_dir, free_names(spool)[0])).st_ino
    events = []
    real_fsync, real_rename, real_dir = os.fsync, os.rename, store_module._fsync_directory
    real_syncfs = spool.disk._call_syncfs
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", threading.current_thread().name)),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", os.path.basename(
        os.path.dirname(b)))), real_rename(a, b))[1])
    monkeypatch.setattr(store_module, "_fsync_directory", lambda path: (events.append(
        ("fsync queue/", threading.current_thread().name)), real_dir(path))[1])
    monkeypatch.setattr(spool.disk, "_call_syncfs", lambda: (events.append(("syncfs",)), real_syncfs())[1])
    envelope = commit_message(spool, b"Subject: new\r\n\r\nnew\r\n")
    assert os.stat(spool.body_path(envelope.queue_id)).st_ino != free_inode
    assert [os.stat(os.path.join(spool.free_dir, n)).st_ino for n in free_names(spool)] == [free_inode]
    assert events[0] == ("rename", "queue")                # no sync before the name is in queue/
    if sync == "syncfs":
        assert events[1:] == [("syncfs",)]
    else:
        # the two syncs run at once: the file's on the calling thread, queue/'s on a
        # thread of the spool's own (whose fsync of the directory is logged too)
        assert ("fsync", threading.current_thread().name) in events[1:]
        [(_, thread)] = [event for event in events if event[0] == "fsync queue/"]
        assert thread.startswith("pymta.spool.fsync")
    assert stored_body(spool, envelope.queue_id) == b"Subject: new\r\n\r\nnew\r\n"
    assert Spool(spool.directory, reactor=FakeReactor()).recover() == [envelope]


@pytest.mark.parametrize("failing", ["file", "queue/"])
def test_a_lone_commit_whose_sync_fails_is_taken_back(tmp_path, monkeypatch, failing):
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor())

    def broken(*args):
        raise OSError(errno.EIO, "Input/output error")
    if failing == "file":
        monkeypatch.setattr(os, "fsync", broken)
    else:
        monkeypatch.setattr(store_module, "_fsync_directory", broken)
    writer = spool.new_message()
    writer.write(b"Subject: x\r\n\r\nx\r\n")
    with pytest.raises((SpoolError, OSError), match="Input/output error"):
        result_of(writer.commit(make_envelope()))
    assert spool_files(spool) == {"tmp": [], "queue": [], "corrupt": []}


def test_removed_files_are_recycled_by_the_next_commits(tmp_path, monkeypatch):
    batch_protocol(monkeypatch)
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor())
    long_body = b"Subject: long\r\n\r\n" + b"x" * 5000 + b"\r\n"
    gone = commit_message(spool, long_body)
    inode = os.stat(spool.body_path(gone.queue_id)).st_ino
    old_length = os.path.getsize(spool.body_path(gone.queue_id))
    result_of(spool.remove(gone.queue_id))
    # one file per message (no update): one file freed
    assert len(free_names(spool)) == 1 and spool.free_files == 1
    assert {os.stat(os.path.join(spool.free_dir, n)).st_ino for n in free_names(spool)} == {inode}
    # the next message takes it: shorter than before, so it must be cut
    short = b"Subject: short\r\n\r\nhi\r\n"
    envelope = commit_message(spool, short)
    assert free_names(spool) == [] and spool.free_files == 0
    assert os.stat(spool.body_path(envelope.queue_id)).st_ino == inode
    assert os.path.getsize(spool.body_path(envelope.queue_id)) < old_length
    body, envelope_json, _ = split_message_file(spool.body_path(envelope.queue_id))
    assert body == short
    assert Envelope.from_json(json.loads(envelope_json)) == envelope
    assert spool.load(envelope.queue_id) == envelope
    with spool.message(envelope).open_body() as fp:
        assert fp.read() == short
    assert spool_files(spool) == {"tmp": [], "queue": [envelope.queue_id + ".msg"], "corrupt": []}
    assert Spool(spool.directory, reactor=FakeReactor()).recover() == [envelope]


def test_an_update_keeps_the_replaced_envelope_for_reuse(spool):
    envelope = commit_message(spool, b"Subject: x\r\n\r\nbody\r\n")
    message_inode = os.stat(spool.body_path(envelope.queue_id)).st_ino
    envelope.recipients[0].attempts = 1
    result_of(spool.update(envelope))
    # the first update adds queue/<ID>.env: there was no envelope file to replace
    assert free_names(spool) == [] and spool.free_files == 0
    assert os.stat(spool.body_path(envelope.queue_id)).st_ino == message_inode
    old_inode = os.stat(spool.envelope_path(envelope.queue_id)).st_ino
    envelope.recipients[0].attempts = 2
    result_of(spool.update(envelope))
    [kept] = free_names(spool)
    assert spool.free_files == 1
    assert os.stat(os.path.join(spool.free_dir, kept)).st_ino == old_inode
    assert os.stat(spool.envelope_path(envelope.queue_id)).st_ino != old_inode
    assert os.stat(spool.body_path(envelope.queue_id)).st_ino == message_inode
    assert spool.load(envelope.queue_id) == envelope
    assert spool_files(spool)["tmp"] == []


def test_a_free_name_that_is_still_a_queue_file_is_never_reused(tmp_path):
    """A crash between an update's link into free/ and its replace leaves one file
    under two names: the restarted spool must not write the next message into it."""
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor())
    kept = commit_message(spool, b"Subject: kept\r\n\r\nmine\r\n")
    kept.recipients[0].attempts = 1
    result_of(spool.update(kept))                  # so that it has an envelope file to replace
    envelope_before = open(spool.envelope_path(kept.queue_id), "rb").read()
    message_before = open(spool.body_path(kept.queue_id), "rb").read()
    assert spool.disk._keep_old_envelope(kept.queue_id) is not None      # ... and then the crash
    # a removal's rename that a crash left half done: the same message file under both names
    os.link(spool.body_path(kept.queue_id), os.path.join(spool.free_dir, "777"))
    assert len(free_names(spool)) == 2
    again = Spool(str(tmp_path / "spool"), reactor=FakeReactor())
    assert again.recover() == [kept]
    assert again.free_files == 0 and free_names(again) == []
    other = commit_message(again, b"Subject: other\r\n\r\nnot yours\r\n")
    other.recipients[0].attempts = 1
    result_of(again.update(other))                 # and an update's temp file: not from those either
    assert open(again.envelope_path(kept.queue_id), "rb").read() == envelope_before
    assert open(again.body_path(kept.queue_id), "rb").read() == message_before
    assert stored_body(again, kept.queue_id) == b"Subject: kept\r\n\r\nmine\r\n"
    assert again.load(kept.queue_id) == kept
    assert again.load(other.queue_id) == other


def test_free_files_are_bounded_and_large_bodies_are_deleted(tmp_path, monkeypatch):
    batch_protocol(monkeypatch)
    monkeypatch.setattr("pymta.spool.disk.FREE_FILES_KEPT", 3)
    # (a message file holds its envelope too: a few hundred bytes with make_envelope())
    monkeypatch.setattr("pymta.spool.disk.RECYCLE_MAX_BYTES", 1000)
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor())
    big = commit_message(spool, b"Subject: big\r\n\r\n" + b"y" * 2000)
    big.recipients[0].attempts = 1
    result_of(spool.update(big))
    envelope_inode = os.stat(spool.envelope_path(big.queue_id)).st_ino
    result_of(spool.remove(big.queue_id))
    # the updated envelope is kept; the large message file was deleted
    assert [os.stat(os.path.join(spool.free_dir, n)).st_ino for n in free_names(spool)] == [envelope_inode]
    assert spool.free_files == 1
    small = [commit_message(spool, b"small %d" % n) for n in range(4)]   # the first takes the free file
    assert spool.free_files == 0
    for envelope in small:
        envelope.recipients[0].attempts = 1
        result_of(spool.update(envelope))
    for envelope in small:
        result_of(spool.remove(envelope.queue_id))   # eight small files retired
    assert len(free_names(spool)) == 3 and spool.free_files == 3
    assert spool_files(spool) == {"tmp": [], "queue": [], "corrupt": []}


def test_a_restarted_spool_reuses_what_free_holds_and_drops_strangers(tmp_path, monkeypatch):
    batch_protocol(monkeypatch)
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor())
    for envelope in [commit_message(spool, b"one"), commit_message(spool, b"two")]:
        result_of(spool.remove(envelope.queue_id))
    names = free_names(spool)
    assert len(names) == 2                         # one file per message
    (Path(spool.free_dir) / "stranger.txt").write_bytes(b"?")
    again = Spool(str(tmp_path / "spool"), reactor=FakeReactor())
    assert again.recover() == []
    assert again.free_files == 2 and free_names(again) == names
    envelope = commit_message(again, b"three")
    assert again.free_files == 1
    assert stored_body(again, envelope.queue_id) == b"three"
    result_of(again.remove(envelope.queue_id))
    # new names continue after the highest one already there
    assert len(free_names(again)) == 2
    assert max(int(n) for n in free_names(again)) > max(int(n) for n in names)


def test_a_body_committed_from_memory_is_delivered_from_memory(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor())
    body = b"Subject: kept\r\n\r\nhello\r\n"
    envelope = commit_message(spool, body)
    message = spool.message(envelope)
    os.unlink(spool.body_path(envelope.queue_id))       # proof: the file is not read
    with message.open_body() as fp:
        assert fp.read() == body
    assert message.headers() == [("Subject", "kept")]
    result_of(spool.remove(envelope.queue_id, envelope.size))
    with pytest.raises(FileNotFoundError):              # forgotten with the message
        spool.message(envelope).open_body()


def test_bodies_kept_in_memory_are_bounded_oldest_first(tmp_path, monkeypatch):
    monkeypatch.setattr("pymta.spool.store.BODY_CACHE_BYTES", 16 * 100)
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor())
    envelopes = [commit_message(spool, bytes([65 + n]) * 100) for n in range(20)]
    in_memory = [e for e in envelopes if spool.message(e)._body is not None]
    assert in_memory == envelopes[-16:]
    for envelope in envelopes:                          # all of them read the same either way
        with spool.message(envelope).open_body() as fp:
            assert fp.read() == bytes([65 + envelopes.index(envelope)]) * 100


def test_a_spilled_body_is_read_from_its_file(tmp_path):
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor(), memory_limit=0)
    envelope = commit_message(spool, b"Subject: file\r\n\r\nx\r\n")
    message = spool.message(envelope)
    assert message._body is None
    with message.open_body() as fp:                 # the body only: not the envelope after it
        assert fp.read() == b"Subject: file\r\n\r\nx\r\n"
    with message.open_body() as fp:
        assert fp.read(4) == b"Subj" and fp.read(1000) == b"ect: file\r\n\r\nx\r\n" and fp.read() == b""
    assert message.headers() == [("Subject", "file")]


def test_update_of_a_removed_message_fails_instead_of_resurrecting_it(spool):
    envelope = commit_message(spool, b"x")
    result_of(spool.remove(envelope.queue_id))
    with pytest.raises(SpoolError, match="not in the spool"):
        result_of(spool.update(envelope))
    assert spool_files(spool) == {"tmp": [], "queue": [], "corrupt": []}


# -- small bodies in memory ------------------------------------------------------------

def test_a_small_body_touches_no_file_until_its_commit(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor())
    body = b"Subject: small\r\n\r\nhello\r\n"
    calls = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda *a, **k: calls.append(a[0]) or real_open(*a, **k))
    writer = spool.new_message()
    writer.write(body[:9])
    writer.write(body[9:])
    view = writer.view()
    assert view.path is None and view.size == len(body)
    assert view.headers() == [("Subject", "small")]
    assert calls == [] and spool_files(spool)["tmp"] == []
    envelope = make_envelope()
    result_of(writer.commit(envelope))
    assert calls                                   # the flush wrote the file
    assert stored_body(spool, writer.queue_id) == body
    assert envelope.size == len(body)
    assert spool_files(spool)["tmp"] == []


def test_a_body_spills_into_its_temp_file_past_the_limit(tmp_path):
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor(), memory_limit=100)
    writer = spool.new_message()
    writer.write(b"a" * 60)
    writer.write(b"b" * 40)                        # exactly the limit: still in memory
    assert writer.in_memory and not os.path.exists(writer.path)
    writer.write(b"c")                             # one byte over: spilled
    assert not writer.in_memory
    with writer.view().open() as fp:
        assert fp.read() == b"a" * 60 + b"b" * 40 + b"c"
    assert Path(writer.path).read_bytes() == b"a" * 60 + b"b" * 40 + b"c"
    writer.write(b"d" * 1000)                      # and streams there from now on
    envelope = make_envelope()
    result_of(writer.commit(envelope))
    assert stored_body(spool, writer.queue_id) == b"a" * 60 + b"b" * 40 + b"c" + b"d" * 1000
    assert embedded_envelope(spool.body_path(writer.queue_id)) == envelope
    assert envelope.size == 1101
    assert Spool(spool.directory, reactor=FakeReactor()).recover() == [envelope]


def test_a_colliding_queue_id_fails_that_commit_only(tmp_path):
    pool = ManualThreadPool()
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor(pool))
    existing = spool.new_message()
    existing.write(b"already committed")
    d_existing = existing.commit(make_envelope())
    pool.run_all()
    result_of(d_existing)
    existing_file = Path(spool.body_path(existing.queue_id)).read_bytes()
    blocker = spool.new_message()
    blocker.write(b"0")
    blocker.commit(make_envelope())
    good, in_tmp, in_queue = spool.new_message(), spool.new_message(), spool.new_message()
    in_queue.queue_id = existing.queue_id           # the impossible: an id in use
    Path(in_tmp.path).write_bytes(b"someone else's")
    ds = []
    for writer in (good, in_tmp, in_queue):
        writer.write(b"new " + writer.queue_id.encode())
        ds.append(writer.commit(make_envelope()))
    pool.run_all()
    result_of(ds[0])
    for d in ds[1:]:
        with pytest.raises(SpoolError):
            result_of(d)
    assert Path(in_tmp.path).read_bytes() == b"someone else's"        # not ours: left alone
    assert Path(spool.body_path(existing.queue_id)).read_bytes() == existing_file   # untouched
    assert stored_body(spool, existing.queue_id) == b"already committed"
    assert not os.path.exists(spool.envelope_path(existing.queue_id))
    assert spool.load(existing.queue_id).size == len(b"already committed")
    assert sorted(spool.queue_ids()) == sorted([existing.queue_id, blocker.queue_id, good.queue_id])


def test_a_batch_fsyncs_its_files_on_several_threads_at_once(tmp_path, monkeypatch):
    pool = ManualThreadPool()
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor(pool))
    threads = set()
    real_fsync = os.fsync

    def fsync(fd):
        threads.add(threading.current_thread().name)
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    blocker = spool.new_message()
    blocker.commit(make_envelope())
    bodies = {}
    ds = []
    for n in range(40):
        writer = spool.new_message()
        bodies[writer.queue_id] = b"message %d\r\n" % n * (n + 1)
        writer.write(bodies[writer.queue_id])
        ds.append(writer.commit(make_envelope()))
    pool.run_one()
    threads.clear()
    pool.run_one()                                 # the batch of 40
    assert len(threads) > 1
    for d in ds:
        result_of(d)
    for queue_id, body in bodies.items():
        assert stored_body(spool, queue_id) == body
        assert spool.load(queue_id).size == len(body)


# -- removals and updates never hold up commits ------------------------------------------

def test_commits_complete_while_a_removal_and_an_update_wait(tmp_path):
    pool = ManualThreadPool()
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor(pool))
    first = spool.new_message()
    first.write(b"first")
    one = make_envelope()
    first.commit(one)
    second = spool.new_message()
    second.write(b"second")
    two = make_envelope()
    second.commit(two)
    pool.run_all()
    removed = spool.remove(one.queue_id)
    two.recipients[0].attempts = 1
    updated = spool.update(two)
    assert sorted(pool.kinds()) == ["_Remove", "_Update"]
    committed = []
    for n in range(3):                             # the removal and the update are stalled
        writer = spool.new_message()
        writer.write(b"more %d" % n)
        d = writer.commit(make_envelope())
        pool.run_kind("_Commit")
        committed.append(result_of(d) is None)
    assert committed == [True, True, True]
    assert not removed.called and not updated.called
    assert one.queue_id in spool.queue_ids()
    pool.run_all()
    result_of(removed)
    result_of(updated)
    assert one.queue_id not in spool.queue_ids()
    assert spool.load(two.queue_id).recipients[0].attempts == 1


def test_removal_uses_no_durability_barrier(spool, monkeypatch):
    envelope = commit_message(spool, b"delivered")
    import pymta.spool.disk as store

    def no_barrier(*args):
        raise AssertionError("removal asked for a barrier")
    monkeypatch.setattr(store, "_fsync_directory", no_barrier)
    monkeypatch.setattr(os, "fsync", no_barrier)
    result_of(spool.remove(envelope.queue_id))
    assert spool_files(spool)["queue"] == []


def test_a_removal_waits_for_the_pending_update_of_its_message(tmp_path):
    pool = ManualThreadPool()
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor(pool))
    writer = spool.new_message()
    writer.write(b"two routes")
    envelope = make_envelope()
    writer.commit(envelope)
    pool.run_all()
    envelope.recipients[0].attempts = 1
    updated = spool.update(envelope)               # the first route's result
    removed = spool.remove(envelope.queue_id)      # the second route finished the message
    assert pool.kinds() == ["_Update"]             # the removal is not started yet
    pool.run_one()
    result_of(updated)
    assert pool.kinds() == ["_Remove"]
    pool.run_one()
    result_of(removed)
    assert spool_files(spool) == {"tmp": [], "queue": [], "corrupt": []}   # nothing resurrected


def test_a_stalled_removal_thread_holds_up_no_commit(tmp_path, monkeypatch):
    """The real thing: a thread pool of the spool's own, a removal blocked in its thread."""
    from twisted.python.threadpool import ThreadPool

    calls = queue.Queue()

    class ThreadedReactor(Clock):
        def callFromThread(self, f, *args, **kwargs):
            calls.put((f, args, kwargs))

    def wait_for(d, timeout=10.0):
        box = []
        d.addBoth(box.append)
        deadline = time.monotonic() + timeout
        while not box:
            f, args, kwargs = calls.get(timeout=max(0.01, deadline - time.monotonic()))
            f(*args, **kwargs)
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]

    threadpool = ThreadPool(0, 3, "test-spool")
    threadpool.start()
    release = threading.Event()
    try:
        spool = Spool(str(tmp_path / "spool"), reactor=ThreadedReactor(), threadpool=threadpool)
        writer = spool.new_message()
        writer.write(b"delivered")
        delivered = make_envelope()
        wait_for(writer.commit(delivered))
        real_removals = spool.disk.remove

        def stalled_removals(batch):
            assert release.wait(10)
            return real_removals(batch)
        spool.disk.remove = stalled_removals
        removed = spool.remove(delivered.queue_id)
        for n in range(20):
            writer = spool.new_message()
            writer.write(b"message %d" % n)
            wait_for(writer.commit(make_envelope()))
        assert not removed.called
        assert len(spool.queue_ids()) == 21
        release.set()
        wait_for(removed)
        assert len(spool.queue_ids()) == 20
    finally:
        release.set()
        threadpool.stop()



# -- recovery ------------------------------------------------------------------------------

def test_recover_discards_uncommitted_messages(tmp_path):
    directory = str(tmp_path / "spool")
    spool = Spool(directory, reactor=FakeReactor())
    committed = commit_message(spool, b"committed\r\n")
    crashed = spool.new_message()          # DATA was arriving when the process died
    crashed.write(b"half a mess" * (MEMORY_BODY_LIMIT // 10))    # spilled into tmp/
    crashed._file.flush()
    # an update that died between writing its envelope temp and renaming it:
    Path(directory, "tmp", committed.queue_id + ".7.env").write_text("{}")
    # a commit that died after writing its file (body, envelope, trailer) but before its rename:
    unrenamed = make_envelope(queue_id=new_queue_id())
    unrenamed.size = len(b"never committed")
    Path(directory, "tmp", unrenamed.queue_id + ".msg").write_bytes(
        message_file_bytes(b"never committed", unrenamed))

    envelopes = Spool(directory, reactor=FakeReactor()).recover()
    assert envelopes == [committed]
    assert spool_files(spool) == {"tmp": [], "queue": [committed.queue_id + ".msg"], "corrupt": []}
    assert stored_body(spool, committed.queue_id) == b"committed\r\n"


def test_recover_loads_envelopes_with_recipient_state_intact(tmp_path):
    directory = str(tmp_path / "spool")
    spool = Spool(directory, reactor=FakeReactor())
    first = commit_message(spool, b"first")
    second = commit_message(spool, b"second body", make_envelope(recipients=[
        Recipient("a@example.org", "a@example.org", "local", state=DELIVERED, attempts=1,
                  finished_at=1_700_000_001.5, last_result="250 2.0.0 delivered"),
        Recipient("b@example.org", "b@example.org", "relay", attempts=3,
                  next_attempt=1_700_001_000.0, last_result="451 4.4.1 timeout"),
        Recipient("c@example.org", "c@example.org", "relay", state=FAILED, attempts=1,
                  finished_at=1_700_000_002.0, last_result="550 5.1.1 no such user"),
    ]))
    recovered = Spool(directory, reactor=FakeReactor()).recover()
    assert recovered == [first, second]
    assert [r.state for r in recovered[1].recipients] == [DELIVERED, PENDING, FAILED]


def test_recover_deletes_the_envelope_a_crashed_removal_left_behind(tmp_path):
    """A removal retires the message file first, then its updated envelope: a crash
    between the two leaves queue/<ID>.env alone, which is no message."""
    directory = str(tmp_path / "spool")
    spool = Spool(directory, reactor=FakeReactor())
    keep = commit_message(spool, b"keep")
    keep.recipients[0].attempts = 1
    result_of(spool.update(keep))
    gone = commit_message(spool, b"delivered")
    gone.recipients[0].state = DELIVERED
    result_of(spool.update(gone))
    real_retire = spool.disk._retire
    retired = []

    def dies_before_the_envelope(path, keep):
        if path == spool.envelope_path(gone.queue_id):
            raise OSError(5, "the process died here")
        retired.append(path)
        return real_retire(path, keep)
    spool.disk._retire = dies_before_the_envelope
    with pytest.raises(SpoolError):
        result_of(spool.remove(gone.queue_id))
    assert retired == [spool.body_path(gone.queue_id)]          # the message file went first
    assert spool_files(spool)["queue"] == sorted([keep.queue_id + ".env", keep.queue_id + ".msg",
                                                  gone.queue_id + ".env"])
    assert spool.queue_ids() == [keep.queue_id]                  # not a message any more

    again = Spool(directory, reactor=FakeReactor())
    with capturedLogs() as events:
        recovered = again.recover()
    assert recovered == [keep]
    assert spool_files(again) == {"tmp": [], "corrupt": [],
                                  "queue": [keep.queue_id + ".env", keep.queue_id + ".msg"]}
    texts = [formatEvent(event) for event in events]
    assert any(gone.queue_id in text and "removed the envelope of a removed message" in text
               for text in texts), texts
    assert not any(keep.queue_id in text for text in texts), texts
    assert again.load(keep.queue_id) == keep


def test_an_updated_envelope_wins_over_the_embedded_one_after_a_restart(tmp_path):
    directory = str(tmp_path / "spool")
    spool = Spool(directory, reactor=FakeReactor())
    untouched = commit_message(spool, b"Subject: one\r\n\r\nuntouched\r\n")
    envelope = commit_message(spool, b"Subject: two\r\n\r\nupdated\r\n", make_envelope(recipients=[
        Recipient("a@example.org", "a@example.org", "local"),
        Recipient("b@example.org", "b@example.org", "relay"),
    ]))
    committed = Envelope.from_json(envelope.to_json())
    envelope.recipients[0].state = DELIVERED
    envelope.recipients[0].attempts = 1
    envelope.recipients[0].finished_at = 1_700_000_010.0
    envelope.recipients[1].attempts = 1
    envelope.recipients[1].next_attempt = 1_700_000_900.0
    envelope.recipients[1].last_result = "451 4.4.1 no answer"
    result_of(spool.update(envelope))
    assert envelope != committed

    again = Spool(directory, reactor=FakeReactor())
    assert again.recover() == [untouched, envelope]
    assert again.load(envelope.queue_id) == envelope
    assert [r.state for r in again.load(envelope.queue_id).recipients] == [DELIVERED, PENDING]
    # the message file still holds the envelope as committed: the .env replaces it
    assert embedded_envelope(again.body_path(envelope.queue_id)) == committed
    assert stored_body(again, envelope.queue_id) == b"Subject: two\r\n\r\nupdated\r\n"
    with again.message(envelope).open_body() as fp:
        assert fp.read() == b"Subject: two\r\n\r\nupdated\r\n"
    # and a later update replaces the updated one, across another restart
    envelope.recipients[1].state = FAILED
    result_of(again.update(envelope))
    assert Spool(directory, reactor=FakeReactor()).recover() == [untouched, envelope]


def _damage(spool: Spool, bad: Envelope, good: Envelope, damage: str) -> None:
    path = Path(spool.body_path(bad.queue_id))
    data = path.read_bytes()
    if damage == "truncated":                      # the end of the file lost: no trailer there
        path.write_bytes(data[:-3])
    elif damage == "trailer overwritten":
        path.write_bytes(data[:-TRAILER_BYTES] + b"x" * TRAILER_BYTES)
    elif damage == "trailer not zero-padded":     # the right length, not in the trailer's format
        length = len(data) - TRAILER_BYTES - len(b"bad body")
        path.write_bytes(data[:-TRAILER_BYTES] + b"pymta envelope %10d\n" % length)
    elif damage == "trailer without newline":
        path.write_bytes(data[:-1] + b" ")
    elif damage == "trailer longer than the file":
        path.write_bytes(data[:-TRAILER_BYTES] + b"pymta envelope %010d\n" % (len(data) + 1))
    elif damage == "trailer length off by one":   # the envelope found from the end is cut
        length = len(data) - TRAILER_BYTES - len(b"bad body")
        path.write_bytes(data[:-TRAILER_BYTES] + b"pymta envelope %010d\n" % (length - 1))
    elif damage == "too short for a trailer":
        path.write_bytes(b"pymta envelope")
    elif damage == "empty file":
        path.write_bytes(b"")
    elif damage == "short body":                   # a well-formed file, but the body is cut
        path.write_bytes(message_file_bytes(b"bad", bad))
    elif damage == "long body":
        path.write_bytes(message_file_bytes(b"bad body!", bad))
    elif damage == "bad json":
        envelope_json = b'{"queue_id": \n'
        path.write_bytes(b"bad body" + envelope_json + b"pymta envelope %010d\n" % len(envelope_json))
    elif damage == "foreign id":
        path.write_bytes(message_file_bytes(b"bad body", Envelope.from_json(
            dict(bad.to_json(), queue_id=good.queue_id))))
    elif damage == "bad updated json":
        Path(spool.envelope_path(bad.queue_id)).write_bytes(b'{"queue_id": ')
    elif damage == "updated foreign id":
        Path(spool.envelope_path(bad.queue_id)).write_text(json.dumps(dict(bad.to_json(), queue_id=good.queue_id)))
    elif damage == "updated wrong size":
        Path(spool.envelope_path(bad.queue_id)).write_text(json.dumps(dict(bad.to_json(), size=bad.size + 1)))
    else:
        raise AssertionError(damage)


#: damage to the message file, whether or not an update added queue/<ID>.env
FILE_DAMAGE = ["truncated", "trailer overwritten", "trailer not zero-padded", "trailer without newline",
               "trailer longer than the file", "trailer length off by one", "too short for a trailer",
               "empty file", "short body", "long body"]
#: damage to the embedded envelope: only while no update replaced it (the .env wins)
EMBEDDED_DAMAGE = ["bad json", "foreign id"]
#: damage to queue/<ID>.env
UPDATED_DAMAGE = ["bad updated json", "updated foreign id", "updated wrong size"]


@pytest.mark.parametrize("damage, updated", [
    *[(damage, updated) for damage in FILE_DAMAGE for updated in (False, True)],
    *[(damage, False) for damage in EMBEDDED_DAMAGE],
    *[(damage, True) for damage in UPDATED_DAMAGE]])
def test_recover_moves_corrupt_messages_aside(tmp_path, damage, updated):
    directory = str(tmp_path / "spool")
    spool = Spool(directory, reactor=FakeReactor())
    good = commit_message(spool, b"good")
    bad = commit_message(spool, b"bad body")
    if updated:
        for envelope in (good, bad):
            envelope.recipients[0].attempts = 1
            result_of(spool.update(envelope))
    good_files = {name: Path(directory, "queue", name).read_bytes()
                  for name in spool_files(spool)["queue"] if name.startswith(good.queue_id)}
    bad_files = {name: Path(directory, "queue", name).read_bytes()
                 for name in spool_files(spool)["queue"] if name.startswith(bad.queue_id)}
    _damage(spool, bad, good, damage)
    bad_files = {name: Path(directory, "queue", name).read_bytes() for name in bad_files}
    again = Spool(directory, reactor=FakeReactor())
    with capturedLogs() as events:
        recovered = again.recover()
    assert recovered == [good]
    # the damaged message is moved aside whole: its file, and its updated envelope if any
    corrupt = spool_files(spool)["corrupt"]
    assert corrupt == sorted(bad_files)
    assert corrupt == ([bad.queue_id + ".env", bad.queue_id + ".msg"] if updated else [bad.queue_id + ".msg"])
    assert {name: Path(directory, "corrupt", name).read_bytes() for name in corrupt} == bad_files
    assert spool.queue_ids() == [good.queue_id]
    assert {name: Path(directory, "queue", name).read_bytes()
            for name in spool_files(spool)["queue"]} == good_files
    errors = [formatEvent(event) for event in events if event.get("log_level").name == "error"]
    assert len(errors) == 1, errors
    assert bad.queue_id in errors[0] and "corrupt" in errors[0]
    assert again.load(good.queue_id) == good


def test_syncfs_mode_commits_updates_and_recovers(tmp_path):
    directory = str(tmp_path / "spool")
    spool = Spool(directory, reactor=FakeReactor(), sync="syncfs")
    if sys.platform.startswith("linux"):
        assert spool.sync == "syncfs"
    envelope = commit_message(spool, b"synced")
    envelope.recipients[0].attempts = 4
    result_of(spool.update(envelope))
    assert Spool(directory, reactor=FakeReactor(), sync="syncfs").recover() == [envelope]


# -- kill -9 -------------------------------------------------------------------------------

CHILD = textwrap.dedent("""
    import hashlib, random, sys, time
    from twisted.internet import defer, reactor
    from pymta.envelope import Envelope, Recipient
    from pymta.spool.store import Spool

    spool = Spool(sys.argv[1])
    rng = random.Random(int(sys.argv[2]))

    def report(_, queue_id, body):
        digest = hashlib.sha256(body).hexdigest()
        sys.stdout.write(f"{queue_id} {digest} {len(body)}\\n")
        sys.stdout.flush()

    @defer.inlineCallbacks
    def run():
        n = 0
        while True:
            pending = []
            for _ in range(rng.randint(1, 16)):
                n += 1
                writer = spool.new_message()
                body = rng.randbytes(rng.choice([0, 1, 200, 5000, 70000, 250000]))
                for i in range(0, len(body), 16384):
                    writer.write(body[i:i + 16384])
                envelope = Envelope(writer.queue_id, f"s{n}@example.net",
                                    [Recipient(f"r{n}@example.org", f"r{n}@example.org", "local")],
                                    time.time())
                d = writer.commit(envelope)
                d.addCallback(report, writer.queue_id, body)
                pending.append(d)
            yield defer.gatherResults(pending)

    reactor.callWhenRunning(run)
    reactor.run()
""")


def test_kill_9_never_loses_a_committed_message(tmp_path):
    script = tmp_path / "committer.py"
    script.write_text(CHILD)
    directory = str(tmp_path / "spool")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rng = random.Random()
    printed: dict[str, tuple[str, int]] = {}
    for round_number in range(3):
        child = subprocess.Popen([sys.executable, str(script), directory, str(rng.randrange(10**6))],
                                 stdout=subprocess.PIPE, env=env)
        try:
            deadline = time.monotonic() + 30
            seen = 0
            while seen < 20 + rng.randrange(40):          # kill at a random point
                line = child.stdout.readline()
                assert line, "the committing child exited early"
                assert time.monotonic() < deadline, "the committing child is too slow"
                seen += 1
                queue_id, digest, size = line.decode().split()
                printed[queue_id] = (digest, int(size))
            time.sleep(rng.random() * 0.05)
        finally:
            child.send_signal(signal.SIGKILL)
            rest = child.communicate()[0]
        for line in rest.decode().splitlines(keepends=True):
            if line.endswith("\n"):                       # a torn last line was never fully printed
                queue_id, digest, size = line.split()
                printed[queue_id] = (digest, int(size))
        assert child.returncode == -signal.SIGKILL

        spool = Spool(directory, reactor=FakeReactor())
        recovered = {e.queue_id: e for e in spool.recover()}
        missing = set(printed) - set(recovered)
        assert not missing, f"round {round_number}: committed messages lost: {sorted(missing)}"
        for queue_id, (digest, size) in printed.items():
            envelope = recovered[queue_id]
            body = stored_body(spool, queue_id)
            assert (hashlib.sha256(body).hexdigest(), len(body)) == (digest, size), queue_id
            assert envelope.size == size
            assert envelope.recipients[0].state == PENDING
            assert envelope.recipients[0].address.startswith("r")
        assert spool_files(spool)["tmp"] == []
        assert spool_files(spool)["corrupt"] == []
        assert all(name.endswith(".msg") for name in spool_files(spool)["queue"])   # no updates here
    assert len(printed) >= 60


def test_a_removed_file_is_reused_only_after_queue_is_synced(tmp_path, monkeypatch):
    """Removals have no barrier: until queue/ is synced, a crash can bring the old
    name back, so its file must not take another message's bytes before then."""
    batch_protocol(monkeypatch)
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor())
    gone = commit_message(spool, b"Subject: old\r\n\r\nold secret\r\n")
    old_inode = os.stat(spool.body_path(gone.queue_id)).st_ino
    events = []
    real_fsync_directory = store_module._fsync_directory
    real_rename = os.rename

    def fsync_directory(path):
        events.append(("sync", os.path.basename(path)))
        real_fsync_directory(path)

    def rename(src, dst):
        real_rename(src, dst)
        events.append(("rename", os.path.basename(os.path.dirname(src)), os.path.basename(os.path.dirname(dst))))
    monkeypatch.setattr(store_module, "_fsync_directory", fsync_directory)
    monkeypatch.setattr(os, "rename", rename)
    result_of(spool.remove(gone.queue_id, gone.size))
    assert spool.free_files == 1 and spool.disk._free == deque()          # retired, not reusable yet
    assert events == [("rename", "queue", "free")]
    new = commit_message(spool, b"Subject: new\r\n\r\nnew\r\n")
    # the queue/ sync came before the retired file was taken for the new message
    assert events[1:3] == [("sync", "queue"), ("rename", "free", "tmp")]
    assert os.stat(spool.body_path(new.queue_id)).st_ino == old_inode
    assert stored_body(spool, new.queue_id) == b"Subject: new\r\n\r\nnew\r\n"


def test_a_restarted_spool_syncs_queue_before_reusing_free_files(tmp_path, monkeypatch):
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor())
    envelope = commit_message(spool, b"Subject: x\r\n\r\nx\r\n")
    result_of(spool.remove(envelope.queue_id, envelope.size))
    synced = []
    real_fsync_directory = store_module._fsync_directory
    monkeypatch.setattr(store_module, "_fsync_directory",
                        lambda path: (synced.append(os.path.basename(path)), real_fsync_directory(path)))
    again = Spool(str(tmp_path / "spool"), reactor=FakeReactor())
    assert synced == ["queue"] and list(again.disk._free) == free_names(again) and again.free_files == 1


def test_syncfs_mode_syncs_a_recycled_file_before_naming_it_in_queue(tmp_path, monkeypatch):
    """Overwritten blocks are not ordered before a rename: without the first sync a
    crash could leave queue/<new> holding the removed message's bytes."""
    batch_protocol(monkeypatch)
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor(), sync="syncfs")
    assert spool.sync == "syncfs"
    gone = commit_message(spool, b"Subject: old\r\n\r\nold\r\n")
    result_of(spool.remove(gone.queue_id, gone.size))
    events = []
    real_syncfs, real_rename = spool.disk._call_syncfs, os.rename
    monkeypatch.setattr(spool.disk, "_call_syncfs", lambda: (events.append("syncfs"), real_syncfs()))

    def rename(src, dst):
        real_rename(src, dst)
        events.append(f"{os.path.basename(os.path.dirname(src))}->{os.path.basename(os.path.dirname(dst))}")
    monkeypatch.setattr(os, "rename", rename)
    new = commit_message(spool, b"Subject: new\r\n\r\nnew\r\n")
    assert "free->tmp" in events                                       # it was recycled
    assert events[events.index("free->tmp") + 1:] == ["syncfs", "tmp->queue", "syncfs"]
    assert stored_body(spool, new.queue_id) == b"Subject: new\r\n\r\nnew\r\n"


def test_an_envelope_that_is_not_held_is_written_as_the_previous_version_reads_it(tmp_path):
    """The "held" field is written only when set: after a rollback to the version before it,
    whose Envelope takes no "held", the queue is read, not moved to corrupt/."""
    previous_fields = {"queue_id", "sender", "recipients", "received_at", "size", "client_ip",
                       "client_name", "helo", "protocol", "body", "smtputf8", "ret", "envid",
                       "auth", "prepend", "notification", "version"}
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor())
    envelope = commit_message(spool, b"Subject: x\r\n\r\nx\r\n")
    result_of(spool.update(envelope))
    data, _ = load_stored_json(spool, envelope.queue_id)
    assert set(data) <= previous_fields
    assert spool.load(envelope.queue_id).held is None
    envelope.held = "undeliverable postmaster notification"
    result_of(spool.update(envelope))
    data, _ = load_stored_json(spool, envelope.queue_id)
    assert data["held"] == "undeliverable postmaster notification"
    assert spool.load(envelope.queue_id) == envelope


def load_stored_json(spool, queue_id):
    """The JSON of the message's updated envelope (queue/ID.env) and its path."""
    path = spool.envelope_path(queue_id)
    with open(path, encoding="utf-8") as fp:
        return json.loads(fp.read()), path
