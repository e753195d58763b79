"""SessionShutdown's bookkeeping with a fake clock: what the stop waits for, and when."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from pymta.server.factory import ConnectionCounter, SessionShutdown


class FakeTransport:
    def __init__(self) -> None:
        self.aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


class FakeSession:
    """Records what the stop asks of a session; closes only when told to."""

    def __init__(self, counter: ConnectionCounter, committing: bool = False) -> None:
        self.counter = counter
        self.transport = FakeTransport()
        self._committing = committing
        self.calls: list[str] = []
        counter.sessions.add(self)

    def drain(self) -> None:
        self.calls.append("drain")

    def shutdown(self) -> None:
        self.calls.append("shutdown")

    def close(self) -> None:
        self.counter.sessions.discard(self)
        self.counter._notify()


def stopping(timeout: float = 30.0):
    clock = Clock()
    counter = ConnectionCounter()
    service = SessionShutdown(counter, clock, timeout)
    service.startService()
    return clock, counter, service


def fired(d: Deferred) -> bool:
    out = []
    d.addBoth(out.append)
    return bool(out)


def test_with_no_session_the_stop_is_over_at_once():
    clock, counter, service = stopping()
    assert fired(service.stopService())
    assert counter.draining
    assert not clock.getDelayedCalls()


def test_the_stop_waits_for_every_session_and_each_is_told_to_drain():
    clock, counter, service = stopping()
    a, b = FakeSession(counter), FakeSession(counter)
    done = service.stopService()
    listener = service.drained()               # a listener stops only after the drain
    assert a.calls == b.calls == ["drain"]
    a.close()
    assert not fired(done) and not fired(listener)
    b.close()
    assert fired(done) and fired(listener)
    assert not clock.getDelayedCalls()       # the deadline is cancelled
    assert fired(service.drained())          # asked later: already over


def test_a_commit_in_flight_holds_the_stop_after_its_session_closed():
    clock, counter, service = stopping()
    session = FakeSession(counter)
    commit = Deferred()
    counter.commits.add(commit)

    def landed(result):
        counter.commits.discard(commit)
        counter._notify()
        return result

    commit.addBoth(landed)
    done = service.stopService()
    session.close()
    assert not fired(done)
    commit.callback(None)
    assert fired(done)


def test_at_the_deadline_sessions_are_shut_down_then_aborted_unless_committing():
    clock, counter, service = stopping(timeout=10)
    stalled = FakeSession(counter)
    committing = FakeSession(counter, committing=True)
    done = service.stopService()
    clock.advance(9.9)
    assert stalled.calls == ["drain"]
    clock.advance(0.1)
    assert stalled.calls == committing.calls == ["drain", "shutdown"]
    clock.advance(SessionShutdown.ABORT_AFTER)       # the 421 did not get out: abort
    assert stalled.transport.aborted and not committing.transport.aborted
    stalled.close()
    committing._committing = False
    clock.advance(SessionShutdown.ABORT_AFTER)
    assert committing.transport.aborted
    committing.close()
    assert fired(done)
    assert not clock.getDelayedCalls()


def test_a_second_signal_ends_the_drain_at_once():
    clock, counter, service = stopping(timeout=300)
    session = FakeSession(counter)
    service.stopService()
    service._expire("signal SIGTERM again")
    assert session.calls == ["drain", "shutdown"]
    service._expire("shutdown_timeout reached")      # once only
    assert session.calls == ["drain", "shutdown"]
    session.close()
    assert not clock.getDelayedCalls()
