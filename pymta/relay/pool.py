"""Outbound connections per destination: reuse, an idle limit and a concurrency limit.

A destination is what a backend groups mail by: a recipient domain (relay)
or the smarthost.  For each one the pool keeps the sessions that are busy,
idle or being opened, and a queue of jobs (one transaction each) waiting
for a session.  A job runs on an idle session when there is one (the
connection is reused: several messages per connection, RSET between), on a
new session while the destination has fewer than ``max_connections``, or
waits.  A session goes back to the pool after each job and is closed with
QUIT after ``idle_timeout`` without work, after ``reuse_limit`` messages or
``reuse_time`` seconds.

When a new session cannot be opened and no other session to the
destination exists, every job waiting for it gets the same failure, and so
does every job submitted for it during the next ``dead_time`` seconds (a
dead destination, as Postfix calls it): the hosts are down, and trying them
once per queued message would only make the wait longer.
:meth:`DestinationPool.forget_failures` (ETRN) makes them worth a try again.

A job that fails because a reused connection turned out to be dead (the
server closed it while idle, and nothing of the transaction was answered)
is run again, once, on another session.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class ShuttingDown(Exception):
    """The pool was closed: no new sessions.  A temporary condition for the job."""

    def __init__(self) -> None:
        super().__init__("pymta is shutting down")


class StaleConnection(Exception):
    """Raised by a job whose session died before answering anything.

    ``results`` is what the job reports if it cannot be run again."""

    def __init__(self, results: Any) -> None:
        super().__init__("connection closed before the transaction was answered")
        self.results = results


@dataclass(frozen=True)
class PoolLimits:
    #: sessions at once per destination (Postfix: default_destination_concurrency_limit)
    max_connections: int = 20
    #: seconds an idle session is kept for reuse
    idle_timeout: float = 5.0
    #: messages per session (0: no limit)
    reuse_limit: int = 100
    #: seconds a session is reused after it was opened (0: no limit)
    reuse_time: float = 300.0
    #: seconds a destination that could not be reached at all is not tried again (0: always try)
    dead_time: float = 60.0


@dataclass
class _Waiter:
    job: Callable[[Any], Any]
    done: defer.Deferred = field(default_factory=defer.Deferred)
    retried: bool = False


@dataclass
class _Destination:
    key: str
    idle: list = field(default_factory=list)
    timers: dict = field(default_factory=dict)
    busy: set = field(default_factory=set)
    opening: int = 0
    waiting: collections.deque = field(default_factory=collections.deque)

    @property
    def sessions(self) -> int:
        return self.opening + len(self.busy) + len(self.idle)


class DestinationPool:
    """Runs jobs on sessions to their destination; see the module docstring."""

    def __init__(self, reactor: Any, open_session: Callable[[str], defer.Deferred],
                 limits: PoolLimits = PoolLimits()) -> None:
        self.reactor = reactor
        self.open_session = open_session
        self.limits = limits
        self._destinations: dict[str, _Destination] = {}
        #: destination -> (until, failure) of a destination found unreachable
        self._dead: dict[str, tuple[float, Failure]] = {}
        #: the reactor's shutdown trigger that closes the pool, once a session was opened
        self._shutdown_trigger: Any = None
        self._closed = False

    # -- public ------------------------------------------------------------------
    def submit(self, key: str, job: Callable[[Any], Any]) -> defer.Deferred:
        """Run ``job(session)`` on a session to ``key``; fires with its result.

        Fails with whatever opening a session failed with, when it could not.
        """
        dead = self._dead.get(key)
        if dead is not None:
            until, failure = dead
            if self.reactor.seconds() < until:
                return defer.fail(failure)
            del self._dead[key]
        destination = self._destinations.get(key)
        if destination is None:
            destination = self._destinations[key] = _Destination(key)
        waiter = _Waiter(job)
        destination.waiting.append(waiter)
        self._dispatch(destination)
        return waiter.done

    def forget_failures(self) -> None:
        """Try unreachable destinations again at once (ETRN, a queue flush)."""
        self._dead.clear()

    def stats(self, key: str) -> dict[str, int]:
        """Sessions of one destination, for tests and admin tools."""
        d = self._destinations.get(key)
        if d is None:
            return {"idle": 0, "busy": 0, "opening": 0, "waiting": 0}
        return {"idle": len(d.idle), "busy": len(d.busy), "opening": d.opening,
                "waiting": len(d.waiting)}

    def close(self, grace: float = 10.0) -> None:
        """At shutdown: QUIT idle sessions, fail waiting jobs, give busy ones ``grace`` seconds.

        A busy session still running after that is aborted: its transaction
        then reports a temporary failure (the message stays queued; at worst
        it is sent twice, never lost).
        """
        if self._closed:
            return
        self._closed = True
        if self._shutdown_trigger is not None:      # closed before shutdown (a reload)
            self.reactor.removeSystemEventTrigger(self._shutdown_trigger)
            self._shutdown_trigger = None
        busy = False
        for destination in list(self._destinations.values()):
            for session in list(destination.idle):
                self._retire(destination, session)
            self._fail_waiting(destination)
            busy = busy or bool(destination.busy)
        if busy:
            self.reactor.callLater(grace, self._abort_busy)

    def _close_at_shutdown(self) -> None:
        self._shutdown_trigger = None                 # firing: not to be removed
        self.close()

    def _abort_busy(self) -> None:
        for destination in list(self._destinations.values()):
            for session in list(destination.busy):
                session.abort("pymta is shutting down")

    def _fail_waiting(self, destination: _Destination) -> None:
        waiting, destination.waiting = list(destination.waiting), collections.deque()
        for waiter in waiting:
            waiter.done.errback(ShuttingDown())

    # -- scheduling ------------------------------------------------------------------
    def _dispatch(self, destination: _Destination) -> None:
        if self._closed:
            self._fail_waiting(destination)
        while destination.waiting:
            session = self._take_idle(destination)
            if session is not None:
                self._run(destination, session, destination.waiting.popleft())
                continue
            if (destination.opening < len(destination.waiting)
                    and destination.sessions < self.limits.max_connections):
                self._open(destination)
                continue
            break
        self._forget_if_unused(destination)

    def _take_idle(self, destination: _Destination) -> Any:
        while destination.idle:
            session = destination.idle.pop()
            timer = destination.timers.pop(id(session), None)
            if timer is not None and timer.active():
                timer.cancel()
            if session.usable:
                return session
        return None

    def _open(self, destination: _Destination) -> None:
        destination.opening += 1
        if self._shutdown_trigger is None and not self._closed:
            self._shutdown_trigger = self.reactor.addSystemEventTrigger(
                "before", "shutdown", self._close_at_shutdown)
        d = defer.maybeDeferred(self.open_session, destination.key)
        d.addCallbacks(self._opened, self._open_failed,
                       callbackArgs=(destination,), errbackArgs=(destination,))

    def _opened(self, session: Any, destination: _Destination) -> None:
        destination.opening -= 1
        self._dead.pop(destination.key, None)
        session.on_close(lambda s: self._session_closed(destination, s))
        if destination.waiting:
            self._run(destination, session, destination.waiting.popleft())
        else:
            self._park(destination, session)
        self._dispatch(destination)

    def _open_failed(self, failure: Failure, destination: _Destination) -> None:
        destination.opening -= 1
        if not destination.waiting:
            self._forget_if_unused(destination)
            return
        if destination.busy or destination.idle:
            victims = [destination.waiting.popleft()]
        else:
            # nothing works there: everyone waiting now, and for a while whoever comes next
            victims = list(destination.waiting)
            destination.waiting.clear()
            if self.limits.dead_time > 0:
                self._dead[destination.key] = (self.reactor.seconds() + self.limits.dead_time,
                                               failure)
        for waiter in victims:
            waiter.done.errback(failure)
        self._dispatch(destination)

    def _run(self, destination: _Destination, session: Any, waiter: _Waiter) -> None:
        destination.busy.add(session)
        reused = session.messages > 0
        d = defer.maybeDeferred(waiter.job, session)
        d.addBoth(self._job_done, destination, session, waiter, reused)

    def _job_done(self, outcome: Any, destination: _Destination, session: Any,
                  waiter: _Waiter, reused: bool) -> None:
        destination.busy.discard(session)
        if isinstance(outcome, Failure) and outcome.check(StaleConnection):
            if reused and not waiter.retried:
                log.info("{destination}: connection {peer} was closed while idle; "
                         "sending again on another one", destination=destination.key,
                         peer=getattr(session, "peer", "?"))
                waiter.retried = True
                destination.waiting.appendleft(waiter)
                self._dispatch(destination)
                return
            outcome = outcome.value.results
        # back into the pool first, so that work the result triggers finds the session
        if self._reusable(session):
            self._park(destination, session)
        else:
            self._retire(destination, session)
        if isinstance(outcome, Failure):
            waiter.done.errback(outcome)
        else:
            waiter.done.callback(outcome)
        self._dispatch(destination)

    def _reusable(self, session: Any) -> bool:
        limits = self.limits
        if self._closed or not session.usable:
            return False
        if limits.reuse_limit and session.messages >= limits.reuse_limit:
            return False
        if limits.reuse_time and self.reactor.seconds() - session.created >= limits.reuse_time:
            return False
        return True

    def _park(self, destination: _Destination, session: Any) -> None:
        if not self._reusable(session):
            self._retire(destination, session)
            return
        destination.idle.append(session)
        destination.timers[id(session)] = self.reactor.callLater(
            self.limits.idle_timeout, self._idle_expired, destination, session)

    def _idle_expired(self, destination: _Destination, session: Any) -> None:
        destination.timers.pop(id(session), None)
        if session in destination.idle:
            self._retire(destination, session)

    def _retire(self, destination: _Destination, session: Any) -> None:
        if session in destination.idle:
            destination.idle.remove(session)
        timer = destination.timers.pop(id(session), None)
        if timer is not None and timer.active():
            timer.cancel()
        session.quit()
        self._forget_if_unused(destination)

    def _session_closed(self, destination: _Destination, session: Any) -> None:
        if session in destination.idle:
            destination.idle.remove(session)
            timer = destination.timers.pop(id(session), None)
            if timer is not None and timer.active():
                timer.cancel()
        self._forget_if_unused(destination)

    def _forget_if_unused(self, destination: _Destination) -> None:
        if destination.sessions == 0 and not destination.waiting \
                and self._destinations.get(destination.key) is destination:
            del self._destinations[destination.key]
