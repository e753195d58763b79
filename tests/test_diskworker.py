"""The disk worker: calls in a child process, the spool and Maildir delivery through it."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path

from twisted.internet import defer
from twisted.application.service import Service
from twisted.internet.task import Clock
from twisted.logger import Logger, globalLogPublisher

from pymta.delivery.maildir import MaildirBackend
from pymta.delivery.result import DELIVERED, FAILED
from pymta.envelope import Envelope, Recipient
from pymta.spool.worker_calls import apply_spool_batch
from pymta.spool.queuefile import TRAILER_BYTES, TRAILER_FORMAT, SpoolError
from pymta.spool.store import Spool
from pymta.worker import process as diskworker
from pymta.worker.process import DiskWorker, DiskWorkerError
from fakesmtp import run_reactor, sleep
from relaykit import local_backend


def in_reactor(test):
    """Run ``test(reactor, worker)`` under a private reactor with a started disk worker."""
    def body(reactor):
        worker = DiskWorker(reactor)

        @defer.inlineCallbacks
        def run():
            assert (yield worker.start()) is True
            try:
                result = yield defer.maybeDeferred(test, reactor, worker)
            finally:
                yield worker.stop()
            return result
        return run()
    return run_reactor(body, timeout=60)


class Caught:
    """A Failure held as a value (an errback returning a Failure would re-raise it)."""

    def __init__(self, failure) -> None:
        self.failure = failure

    def check(self, *kinds):
        return self.failure.check(*kinds)

    def getErrorMessage(self) -> str:
        return self.failure.getErrorMessage()


def outcome(d: defer.Deferred) -> defer.Deferred:
    """The Deferred's result, or its failure as a :class:`Caught` value (to assert on)."""
    return d.addErrback(Caught)


# -- functions the child runs (importable by name there) --------------------------

def log_and_add(a: int, b: int) -> int:
    Logger(namespace="pymta.test.child").warn("adding {a} and {b}", a=a, b=b)
    return a + b


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def die() -> None:
    os._exit(3)


# -- calls ------------------------------------------------------------------------------

def test_a_call_runs_in_another_process():
    @defer.inlineCallbacks
    def test(reactor, worker):
        child = yield worker.call(os.getpid)
        assert child not in (os.getpid(), None) and child == worker.pid
        assert (yield worker.call(os.getpid)) == child          # one child for every call
    in_reactor(test)


def test_calls_larger_than_the_pipe_arrive_whole_and_in_order():
    """A call goes straight into the pipe when nothing is queued; what the pipe
    does not take, and every call after it, goes through the transport."""
    @defer.inlineCallbacks
    def test(reactor, worker):
        large = bytes(range(256)) * (3 * 1024 * 1024 // 256)            # far over a pipe's 64 KiB
        calls = [worker.call(sha256, large), worker.call(len, b"small"),
                 worker.call(len, large), worker.call(log_and_add, 2, 3)]
        digest, small, size, added = yield defer.gatherResults(calls)
        assert digest == hashlib.sha256(large).hexdigest()
        assert (small, size, added) == (5, len(large), 5)
    in_reactor(test)


def test_an_exception_in_the_child_fails_the_call():
    @defer.inlineCallbacks
    def test(reactor, worker):
        failure = yield outcome(worker.call(int, "not a number"))
        assert failure.check(ValueError) and "invalid literal" in failure.getErrorMessage()
        assert (yield worker.call(int, "7")) == 7
    in_reactor(test)


def test_what_the_child_logs_is_logged_by_the_server():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        assert in_reactor(lambda reactor, worker: worker.call(log_and_add, 2, 3)) == 5
    finally:
        globalLogPublisher.removeObserver(events.append)
    [event] = [e for e in events if e.get("log_namespace") == "pymta.test.child"]
    assert event["log_level"].name == "warn"
    assert event["text"] == "adding 2 and 3"


def test_a_dead_child_fails_its_call_and_the_next_call_starts_a_new_one():
    @defer.inlineCallbacks
    def test(reactor, worker):
        first = yield worker.call(os.getpid)
        failure = yield outcome(worker.call(die))
        assert failure.check(DiskWorkerError)
        second = yield worker.call(os.getpid)
        assert second not in (first, os.getpid())
    in_reactor(test)


def test_stop_ends_the_child():
    pids = []

    @defer.inlineCallbacks
    def test(reactor, worker):
        pids.append((yield worker.call(os.getpid)))
    in_reactor(test)                                   # stops the worker at the end
    def ended() -> bool:                             # gone, or a zombie nobody reaped yet
        try:
            return Path(f"/proc/{pids[0]}/stat").read_text().split(") ")[1].startswith("Z")
        except OSError:
            return True
    deadline = time.monotonic() + 10
    while not ended() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ended()


class Unpicklable(Exception):
    """Pickles, but cannot be unpickled: __init__ wants two arguments."""

    def __init__(self, key, problem):
        super().__init__(f"{key}: {problem}")


def raise_unpicklable() -> None:
    Logger(namespace="pymta.test.child").error("about to fail")
    raise Unpicklable("base", "broken")


def scribble_on_stdout() -> str:
    print("a stray print")
    os.write(1, b"\xff" * 64)                   # C code or a subprocess writing to fd 1
    return "still in step"


def test_an_exception_that_cannot_travel_fails_the_call_and_its_logs_arrive():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)

    @defer.inlineCallbacks
    def test(reactor, worker):
        failure = yield outcome(worker.call(raise_unpicklable))
        assert failure.check(DiskWorkerError)
        assert "Unpicklable: base: broken" in failure.getErrorMessage()
        assert (yield worker.call(int, "8")) == 8                  # still in step
    try:
        in_reactor(test)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [e["text"] for e in events if e.get("log_namespace") == "pymta.test.child"] == ["about to fail"]


def test_writes_to_the_childs_stdout_do_not_break_the_answers():
    assert in_reactor(lambda reactor, worker: worker.call(scribble_on_stdout)) == "still in step"


def test_the_child_ignores_signals_meant_for_the_server():
    @defer.inlineCallbacks
    def test(reactor, worker):
        child = yield worker.call(os.getpid)
        for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            os.kill(child, number)
        yield sleep(reactor, 0.3)
        assert (yield worker.call(os.getpid)) == child
    in_reactor(test)


def test_a_stopped_worker_stays_stopped():
    @defer.inlineCallbacks
    def test(reactor, worker):
        yield worker.call(os.getpid)
        first, second = worker.stop(), worker.stop()
        yield defer.gatherResults([first, second])
        failure = yield outcome(worker.call(os.getpid))
        assert failure.check(DiskWorkerError) and "stopped" in failure.getErrorMessage()
        assert worker.pid is None
    in_reactor(test)


def test_a_child_that_does_not_finish_is_killed_after_the_stop_timeout():
    @defer.inlineCallbacks
    def test(reactor, worker):
        child = yield worker.call(os.getpid)
        worker.stop_timeout = 0.5
        stuck = outcome(worker.call(time.sleep, 30))
        started = time.monotonic()
        yield worker.stop()
        assert time.monotonic() - started < 10
        failure = yield stuck
        assert failure.check(DiskWorkerError)
        return child
    child = in_reactor(test)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{child}/stat").read_text().split(") ")[1].startswith("Z"):
                break
        except OSError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"child {child} still running")


# -- the spool through the worker ---------------------------------------------------------

def envelope() -> Envelope:
    return Envelope(queue_id="", sender="a@example.org",
                    recipients=[Recipient("b@example.org", "b@example.org", "local")],
                    received_at=1_700_000_000.0)


@defer.inlineCallbacks
def commit(spool: Spool, body: bytes, drop=()):
    writer = spool.new_message()
    writer.write(body)
    if drop:
        writer.drop_headers(drop)
    env = envelope()
    yield writer.commit(env)
    return env


def body_of(spool: Spool, env: Envelope) -> bytes:
    """The body in the message's spool file (checking the envelope and trailer after it)."""
    data = Path(spool.body_path(env.queue_id)).read_bytes()
    body, embedded = data[:env.size], data[env.size:]
    assert embedded.endswith(TRAILER_FORMAT % (len(embedded) - TRAILER_BYTES))
    assert json.loads(embedded[:-TRAILER_BYTES])["queue_id"] == env.queue_id
    return body


def test_the_spool_commits_updates_and_removes_in_the_child(tmp_path):
    @defer.inlineCallbacks
    def test(reactor, worker):
        spool = Spool(str(tmp_path / "spool"), reactor=reactor, memory_limit=100, worker=worker)
        small = yield commit(spool, b"Subject: small\r\n\r\nhi\r\n")
        large_body = b"X-Drop: me\r\nSubject: large\r\n\r\n" + b"z" * 5000
        large = yield commit(spool, large_body, drop=(0,))        # spilled, cut in the child
        assert body_of(spool, small) == b"Subject: small\r\n\r\nhi\r\n"
        assert body_of(spool, large) == large_body[len(b"X-Drop: me\r\n"):]
        assert large.size == len(large_body) - len(b"X-Drop: me\r\n")
        assert spool.load(small.queue_id) == small
        small.recipients[0].attempts = 2
        yield spool.update(small)
        assert spool.load(small.queue_id).recipients[0].attempts == 2
        yield spool.remove(small.queue_id, small.size)
        assert spool.queue_ids() == [large.queue_id]
        # the child recycled the files: free/ holds the removed message's
        # file and the envelope its update wrote
        assert len(os.listdir(tmp_path / "spool" / "free")) == 2
        assert os.listdir(tmp_path / "spool" / "tmp") == []
        # and a restarted spool finds everything committed
        again = Spool(str(tmp_path / "spool"), reactor=reactor, worker=worker)
        assert [e.queue_id for e in again.recover()] == [large.queue_id]
    in_reactor(test)


def test_a_failed_commit_in_the_child_fails_that_message_only(tmp_path):
    @defer.inlineCallbacks
    def test(reactor, worker):
        spool = Spool(str(tmp_path / "spool"), reactor=reactor, worker=worker)
        good = yield commit(spool, b"good")
        writer = spool.new_message()
        writer.write(b"duplicate id")
        env = envelope()
        env.queue_id = writer.queue_id = good.queue_id                 # already in the spool
        failure = yield outcome(writer.commit(env))
        assert failure.check(SpoolError) and "already in the spool" in failure.getErrorMessage()
        assert spool.queue_ids() == [good.queue_id] and body_of(spool, good) == b"good"
    in_reactor(test)


class WorkerThatDiesAfterwards:
    """Runs the batch here, as the child would, then reports the child dead."""

    def call(self, function, *args):
        function(*args)
        return defer.fail(DiskWorkerError("the child died"))


def test_a_commit_batch_whose_child_died_is_taken_back(tmp_path):
    spool = Spool(str(tmp_path / "spool"), reactor=Clock(), worker=WorkerThatDiesAfterwards())
    writer = spool.new_message()
    writer.write(b"Subject: lost\r\n\r\nbody\r\n")
    failure = outcome(writer.commit(envelope())).result
    assert failure.check(DiskWorkerError)
    # written by the "child" but not known durable: the sender got 4xx, nothing stays
    assert spool.queue_ids() == []
    assert os.listdir(tmp_path / "spool" / "queue") == []


def test_records_survive_the_trip_for_every_kind(tmp_path):
    """apply_spool_batch is what the child runs: here it runs in this process."""
    spool = Spool(str(tmp_path / "spool"), reactor=Clock(), worker=WorkerThatRunsHere())
    writer = spool.new_message()
    writer.write(b"Subject: here\r\n\r\nx\r\n")
    env = envelope()
    assert outcome(writer.commit(env)).result is None
    assert outcome(spool.update(env)).result is None
    assert outcome(spool.remove(env.queue_id)).result is None
    assert spool.queue_ids() == []


class WorkerThatRunsHere:
    def call(self, function, *args):
        assert function is apply_spool_batch
        return defer.succeed(function(*args))


# -- local delivery through the worker -----------------------------------------------------

DONE = "250 2.0.0 delivered"

def test_maildir_delivers_in_the_child(tmp_path):
    @defer.inlineCallbacks
    def test(reactor, worker):
        spool = Spool(str(tmp_path / "spool"), reactor=reactor, worker=worker)
        env = yield commit(spool, b"Subject: to the maildir\r\n\r\nhello\r\n")
        backend = local_backend(MaildirBackend, tmp_path, reactor)
        backend.use_disk_worker(worker)
        results = yield backend.deliver(spool.message(env), [
            Recipient("a@example.org", "a@example.org", "local"), Recipient("../x@example.org", "x", "local")])
        assert [r.status for r in results] == [DELIVERED, FAILED]
        [delivered] = list((tmp_path / "mail" / "example.org" / "a" / "new").iterdir())
        content = delivered.read_bytes()
        assert content.startswith(b"Return-Path: <a@example.org>\r\nDelivered-To: a@example.org\r\n")
        assert content.endswith(b"Subject: to the maildir\r\n\r\nhello\r\n")
        # the file was written by the child, not by this process
        assert f"P{worker.pid}Q" in delivered.name and f"P{os.getpid()}Q" not in delivered.name
    in_reactor(test)


def test_the_child_removes_a_delivered_message_from_the_spool_before_it_answers(tmp_path):
    @defer.inlineCallbacks
    def test(reactor, worker):
        spool = Spool(str(tmp_path / "spool"), reactor=reactor, worker=worker)
        done = yield commit(spool, b"Subject: done\r\n\r\nhello\r\n")
        refused = yield commit(spool, b"Subject: refused\r\n\r\nhello\r\n")
        backend = local_backend(MaildirBackend, tmp_path, reactor)
        backend.use_disk_worker(worker)
        messages = [spool.message(env) for env in (done, refused)]
        for message in messages:
            message.record_delivery = spool.delivery_record(message.envelope, (0,), True)
        answers = yield defer.gatherResults([
            backend.deliver(messages[0], [Recipient("a@example.org", "a@example.org", "local")]),
            backend.deliver(messages[1], [Recipient("../x@example.org", "x", "local")])])
        assert [[r.status for r in results] for results in answers] == [[DELIVERED], [FAILED]]
        # gone when the answer came, and through the child's spool (its file kept for reuse)
        assert [m.removed for m in messages] == [True, False]
        assert spool.queue_ids() == [refused.queue_id]
        assert len(os.listdir(tmp_path / "spool" / "free")) == 1
        # the order does not travel with the Spool object of this process
        assert messages[0].record_delivery.spool is None
        # outside the child the order does nothing (this process keeps no free list)
        assert spool.delivery_record(refused, (0,), True).apply([(True, DONE)]) is False
        assert spool.queue_ids() == [refused.queue_id]
    in_reactor(test)


def test_the_child_records_deliveries_that_do_not_finish_the_message(tmp_path):
    @defer.inlineCallbacks
    def test(reactor, worker):
        spool = Spool(str(tmp_path / "spool"), reactor=reactor, worker=worker)
        env = yield commit(spool, b"Subject: two\r\n\r\nhello\r\n")
        env.recipients.append(Recipient("c@example.net", "c@example.net", "relay"))
        yield spool.update(env)
        backend = local_backend(MaildirBackend, tmp_path, reactor)
        backend.use_disk_worker(worker)
        message = spool.message(env)
        message.record_delivery = spool.delivery_record(env, (0,), False)
        [result] = yield backend.deliver(message, [env.recipients[0]])
        assert result.status == DELIVERED and not message.removed
        stored = spool.load(env.queue_id).recipients
        assert [r.state for r in stored] == [DELIVERED, "pending"]
        assert stored[0].last_result == result.summary()
    in_reactor(test)


class WorkerThatDiesAfterDelivering:
    """Runs the delivery batch here (as the child, removals included), then reports the child dead."""

    def call(self, function, *args):
        diskworker._in_child = True
        try:
            function(*args)
        finally:
            diskworker._in_child = False
        return defer.fail(DiskWorkerError("the child died"))


def test_a_delivery_batch_whose_child_died_after_removing_counts_as_delivered(tmp_path):
    reactor = Clock()
    spool = Spool(str(tmp_path / "spool"), reactor=reactor, worker=WorkerThatRunsHere())
    writer = spool.new_message()
    writer.write(b"Subject: x\r\n\r\nx\r\n")
    env = envelope()
    writer.commit(env)
    backend = local_backend(MaildirBackend, tmp_path, reactor)
    message = spool.message(env)
    message.record_delivery = spool.delivery_record(env, (0,), True)
    from pymta.delivery.mailbox import BatchPipeline
    backend._pipeline = BatchPipeline(reactor, None, lambda jobs: backend._apply_jobs_in_worker(
        WorkerThatDiesAfterDelivering(), jobs))
    results = outcome(backend.deliver(message, [Recipient("a@example.org", "a@example.org", "local")])).result
    # delivered and removed before the child "died": not to be delivered again
    assert [r.status for r in results] == [DELIVERED] and message.removed
    assert spool.queue_ids() == []
    assert len(list((tmp_path / "mail" / "example.org" / "a" / "new").iterdir())) == 1


def test_a_removal_order_of_a_spool_kept_in_this_process_does_nothing_elsewhere(tmp_path):
    """Sent to a disk worker by mistake, it must not make a second free list of the same files."""
    import pickle
    from schedulerkit import FakeReactor
    spool = Spool(str(tmp_path / "spool"), reactor=FakeReactor())
    writer = spool.new_message()
    writer.write(b"Subject: x\r\n\r\nx\r\n")
    env = envelope()
    writer.commit(env)
    order = pickle.loads(pickle.dumps(spool.delivery_record(env, (0,), True)))
    diskworker._in_child = True
    try:
        assert order.spool is None and order.apply([(True, DONE)]) is False
    finally:
        diskworker._in_child = False
    assert spool.queue_ids() == [env.queue_id]
    assert spool.delivery_record(env, (0,), True).apply([(True, DONE)]) is True   # its own spool
    assert spool.queue_ids() == []


# -- the server's services around the worker --------------------------------------------

class RecordingWorker:
    def __init__(self, events: list) -> None:
        self.events = events
        self.stopped = defer.Deferred()

    def start(self) -> defer.Deferred:
        self.events.append("worker start")
        return defer.succeed(True)

    def stop(self) -> defer.Deferred:
        self.events.append("worker stop")
        return self.stopped


class DrainingService(Service):
    """Stops only when the test says so (a scheduler waiting for deliveries)."""

    def __init__(self, events: list) -> None:
        self.events = events
        self.drained = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        self.events.append("service start")

    def stopService(self):
        super().stopService()
        self.events.append("service stopping")
        return self.drained


def test_the_worker_starts_first_and_stops_after_every_other_service():
    from pymta.tap import ServerServices
    events: list[str] = []
    worker = RecordingWorker(events)
    top = ServerServices(worker)
    service = DrainingService(events)
    service.setServiceParent(top)
    top.startService()
    assert events == ["worker start", "service start"]
    stopped = []
    top.stopService().addCallback(stopped.append)
    assert events[-1] == "service stopping" and "worker stop" not in events
    service.drained.callback(None)                    # the scheduler has drained
    assert events[-1] == "worker stop" and not stopped
    worker.stopped.callback(None)                     # the child has finished its calls
    assert len(stopped) == 1
