"""The disk worker: calls in a child process, the spool and Maildir delivery through it."""

from __future__ import annotations

import os
import queue
import time
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.logger import Logger, globalLogPublisher
from twisted.python.failure import Failure

from pymta.delivery.maildir import MaildirBackend
from pymta.delivery.result import DELIVERED, FAILED
from pymta.envelope import Envelope, Recipient
from pymta.spool import diskworker
from pymta.spool.diskworker import DiskWorker, apply_spool_batch
from pymta.spool.store import Spool, SpoolError


class PumpReactor:
    """callFromThread queues; the test runs the queued calls until a Deferred fires."""

    def __init__(self) -> None:
        self.calls: queue.Queue = queue.Queue()

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.calls.put((f, args, kwargs))

    def wait(self, d: defer.Deferred, timeout: float = 30.0):
        box: list = []
        d.addBoth(box.append)
        deadline = time.monotonic() + timeout
        while not box:
            f, args, kwargs = self.calls.get(timeout=max(0.0, deadline - time.monotonic()))
            f(*args, **kwargs)
        if isinstance(box[0], Failure):
            box[0].raiseException()
        return box[0]


@pytest.fixture
def reactor() -> PumpReactor:
    return PumpReactor()


@pytest.fixture
def worker(reactor):
    worker = DiskWorker(reactor)
    assert reactor.wait(worker.start()) is True
    yield worker
    worker.stop()
    assert diskworker.active() is None


# -- functions the child runs (importable by name there) --------------------------

def log_and_add(a: int, b: int) -> int:
    Logger(namespace="pymta.test.child").warn("adding {a} and {b}", a=a, b=b)
    return a + b


def die() -> None:
    os._exit(3)


# -- calls ------------------------------------------------------------------------------

def test_a_call_runs_in_another_process(reactor, worker):
    assert diskworker.active() is worker
    child = reactor.wait(worker.call(os.getpid))
    assert child != os.getpid()
    assert reactor.wait(worker.call(os.getpid)) == child          # one child for every call


def test_an_exception_in_the_child_fails_the_call(reactor, worker):
    with pytest.raises(ValueError, match="invalid literal"):
        reactor.wait(worker.call(int, "not a number"))
    assert reactor.wait(worker.call(int, "7")) == 7


def test_what_the_child_logs_is_logged_by_the_server(reactor, worker):
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert reactor.wait(worker.call(log_and_add, 2, 3)) == 5
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e.get("log_namespace") == "pymta.test.child"]
    assert event["log_level"].name == "warn"
    assert event["text"] == "adding 2 and 3"


def test_a_dead_child_fails_its_call_and_the_next_call_starts_a_new_one(reactor, worker):
    first = reactor.wait(worker.call(os.getpid))
    with pytest.raises(BrokenProcessPool):
        reactor.wait(worker.call(die))
    second = reactor.wait(worker.call(os.getpid))
    assert second not in (first, os.getpid())


def test_stop_ends_the_child(reactor):
    worker = DiskWorker(reactor)
    child = reactor.wait(worker.call(os.getpid))
    worker.stop()
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{child}").exists()


# -- the spool through the worker ---------------------------------------------------------

def envelope() -> Envelope:
    return Envelope(queue_id="", sender="a@example.org",
                    recipients=[Recipient("b@example.org", "b@example.org", "local")],
                    received_at=1_700_000_000.0)


def commit(reactor, spool: Spool, body: bytes, drop=()) -> Envelope:
    writer = spool.new_message()
    writer.write(body)
    if drop:
        writer.drop_headers(drop)
    env = envelope()
    reactor.wait(writer.commit(env))
    return env


def body_of(spool: Spool, env: Envelope) -> bytes:
    return Path(spool.body_path(env.queue_id)).read_bytes()


def test_the_spool_commits_updates_and_removes_in_the_child(tmp_path, reactor, worker):
    spool = Spool(str(tmp_path / "spool"), reactor=reactor, memory_limit=100, worker=worker)
    small = commit(reactor, spool, b"Subject: small\r\n\r\nhi\r\n")
    large_body = b"X-Drop: me\r\nSubject: large\r\n\r\n" + b"z" * 5000
    large = commit(reactor, spool, large_body, drop=(0,))            # spilled, cut in the child
    assert body_of(spool, small) == b"Subject: small\r\n\r\nhi\r\n"
    assert body_of(spool, large) == large_body[len(b"X-Drop: me\r\n"):]
    assert large.size == len(large_body) - len(b"X-Drop: me\r\n")
    assert spool.load(small.queue_id) == small
    small.recipients[0].attempts = 2
    reactor.wait(spool.update(small))
    assert spool.load(small.queue_id).recipients[0].attempts == 2
    reactor.wait(spool.remove(small.queue_id, small.size))
    assert spool.queue_ids() == [large.queue_id]
    # the child recycled the files: free/ holds the old envelope (kept by the
    # update), the removed message's envelope and body
    assert len(os.listdir(tmp_path / "spool" / "free")) == 3
    assert os.listdir(tmp_path / "spool" / "tmp") == []
    # and a restarted spool finds everything committed
    again = Spool(str(tmp_path / "spool"), reactor=reactor, worker=worker)
    assert [e.queue_id for e in again.recover()] == [large.queue_id]


def test_a_failed_commit_in_the_child_fails_that_message_only(tmp_path, reactor, worker):
    spool = Spool(str(tmp_path / "spool"), reactor=reactor, worker=worker)
    good = commit(reactor, spool, b"good")
    writer = spool.new_message()
    writer.write(b"duplicate id")
    env = envelope()
    env.queue_id = good.queue_id                                       # already in the spool
    writer.queue_id = good.queue_id
    with pytest.raises(SpoolError, match="already in the spool"):
        reactor.wait(writer.commit(env))
    assert spool.queue_ids() == [good.queue_id] and body_of(spool, good) == b"good"


class WorkerThatDiesAfterwards:
    """Runs the batch here, as the child would, then reports the child dead."""

    def call(self, function, *args):
        function(*args)
        return defer.fail(BrokenProcessPool("the child died"))


def test_a_commit_batch_whose_child_died_is_taken_back(tmp_path, reactor):
    spool = Spool(str(tmp_path / "spool"), reactor=reactor, worker=WorkerThatDiesAfterwards())
    writer = spool.new_message()
    writer.write(b"Subject: lost\r\n\r\nbody\r\n")
    with pytest.raises(BrokenProcessPool):
        reactor.wait(writer.commit(envelope()))
    # written by the "child" but not known durable: the sender got 4xx, nothing stays
    assert spool.queue_ids() == []
    assert os.listdir(tmp_path / "spool" / "queue") == []


def test_records_survive_the_trip_for_every_kind(tmp_path, reactor):
    """apply_spool_batch is what the child runs: here it runs in this process."""
    spool = Spool(str(tmp_path / "spool"), reactor=reactor, worker=WorkerThatRunsHere())
    env = commit(reactor, spool, b"Subject: here\r\n\r\nx\r\n")
    reactor.wait(spool.update(env))
    reactor.wait(spool.remove(env.queue_id))
    assert spool.queue_ids() == []


class WorkerThatRunsHere:
    def call(self, function, *args):
        assert function is apply_spool_batch
        return defer.succeed(function(*args))


# -- local delivery through the worker -----------------------------------------------------

class Context:
    hostname = "mx.example.org"
    domains = ("example.org",)

    def __init__(self, config_dir: Path, reactor) -> None:
        self.config_dir = str(config_dir)
        self.reactor = reactor

    def resolve_path(self, path: str) -> str:
        return os.path.join(self.config_dir, path)


def test_maildir_delivers_in_the_child(tmp_path, reactor, worker):
    spool = Spool(str(tmp_path / "spool"), reactor=reactor, worker=worker)
    env = commit(reactor, spool, b"Subject: to the maildir\r\n\r\nhello\r\n")
    backend = MaildirBackend({"base": "mail"}, Context(tmp_path, reactor))
    results = reactor.wait(backend.deliver(spool.message(env), [Recipient("a@example.org", "a@example.org",
                                                                          "local"),
                                                                Recipient("../x@example.org", "x", "local")]))
    assert [r.status for r in results] == [DELIVERED, FAILED]
    [delivered] = list((tmp_path / "mail" / "example.org" / "a" / "new").iterdir())
    content = delivered.read_bytes()
    assert content.startswith(b"Return-Path: <a@example.org>\r\nDelivered-To: a@example.org\r\n")
    assert content.endswith(b"Subject: to the maildir\r\n\r\nhello\r\n")
    # the file was written by the child, not by this process
    assert f"P{os.getpid()}Q" not in delivered.name
