"""Group commit: requests applied in batches, off the reactor thread.

A :class:`BatchPipeline` runs one batch at a time in a thread pool.  While a
batch is being applied, new requests wait; when it ends they all go in the
next batch, and each request's Deferred fires (on the reactor thread) when
its batch was applied.  The spool runs one pipeline per kind of change
(commits, envelope updates, removals) so that none waits behind another,
and each local delivery backend one of its own.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any, Callable, Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorCore, IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool


class Request(Protocol):
    #: fires with None when the request was applied, or errbacks
    done: defer.Deferred


class BatchPipeline:
    """Requests applied in batches by ``apply`` in ``threadpool``, one batch at a time.

    ``prepare(batch)`` runs on the reactor thread just before a batch
    starts.  ``apply(batch)`` runs in a pool thread and returns the failures
    of single requests by ``id(request)``; raising fails the whole batch.
    With ``threadpool`` None, ``apply`` is called on the reactor thread and
    returns a Deferred of the same (it hands the batch to another process).
    ``observe(size, seconds)``, if given, is told each batch's size and how
    long it took to apply (for the metrics).
    """

    def __init__(self, reactor, threadpool, apply: Callable[[list], dict[int, Failure]],
                 prepare: Callable[[list], None] | None = None,
                 observe: Callable[[int, float], None] | None = None):
        self._reactor = reactor
        self._threadpool = threadpool
        self._apply = apply
        self._prepare = prepare
        self._observe = observe
        self._started = 0.0
        self._waiting: list[Any] = []
        self._flushing = False

    def submit(self, request: Request) -> None:
        self._waiting.append(request)
        if not self._flushing:
            self._start()

    def _start(self) -> None:
        batch, self._waiting = self._waiting, []
        self._flushing = True
        if self._prepare is not None:
            self._prepare(batch)
        if self._observe is not None:
            self._started = perf_counter()
        if self._threadpool is None:
            d = defer.maybeDeferred(self._apply, batch)      # apply hands the batch on itself
        else:
            d = deferToThreadPool(self._reactor, self._threadpool, self._apply, batch)
        d.addBoth(self._applied, batch)

    def _applied(self, outcome, batch: list[Request]) -> None:
        if self._observe is not None:
            self._observe(len(batch), perf_counter() - self._started)
        self._flushing = False
        if self._waiting:
            self._start()
        for request in batch:
            error = outcome if isinstance(outcome, Failure) else outcome.get(id(request))
            if error is None:
                request.done.callback(None)
            else:
                request.done.errback(error)


def pipeline_threadpool(reactor, threads: int, name: str):
    """A thread pool of its own for pipelines, or the reactor's (for test reactors).

    With one thread per pipeline, each having at most one batch in flight,
    no batch ever queues behind another, nor behind work in the reactor's
    pool (local deliveries run there).  A reactor that cannot start and stop
    a pool (a test clock) lends its own.
    """
    if not (IReactorCore.providedBy(reactor) and IReactorThreads.providedBy(reactor)):
        return reactor.getThreadPool()
    pool = ThreadPool(0, threads, name)
    reactor.callWhenRunning(pool.start)
    pool.pymta_stop_trigger = reactor.addSystemEventTrigger("during", "shutdown", pool.stop)
    return pool


def release_threadpool(reactor, pool) -> None:
    """Stop a pool :func:`pipeline_threadpool` made, before shutdown (its owner is retired).

    The reactor's own pool (lent to test reactors) is left alone.
    """
    trigger = getattr(pool, "pymta_stop_trigger", None)
    if trigger is None:
        return
    pool.pymta_stop_trigger = None
    reactor.removeSystemEventTrigger(trigger)
    if pool.started:
        pool.stop()
