"""The disk worker: a child process for the spool's and the local deliveries' file work.

In CPython every file-system call releases the GIL and takes it back.  With
the spool's flushes and the local deliveries in threads of the server
process, each of their ~20 calls per message handed the GIL to and from
the reactor thread, and each of the reactor thread's own calls (send,
recv, the log line) waited for it to come back (bench/README.md has the
measurements).  A child process has a GIL of its own: the reactor thread
hands it a batch, goes on, and hears back when the batch is on disk.

:class:`DiskWorker` runs picklable calls in one child process
(``concurrent.futures.ProcessPoolExecutor``, "spawn": the child starts
from a clean interpreter, not a copy of the running server) and returns a
Deferred per call, fired on the reactor thread.  The functions the child
runs live here too: :func:`apply_spool_batch` (the same
:class:`pymta.spool.store.Spool` code the threads run, on the child's own
``Spool`` for that directory) and :func:`deliver_local` (the same backend
class, built in the child from its options).  What the child logs while
running a call comes back with the result and is logged by the server, so
nothing goes missing from the log file.

If the child dies, the calls in flight fail (the spool treats a failed
commit batch as not durable: 4xx to the clients, its files removed) and
the next call starts a new child.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import LogLevel, Logger, formatEventAsClassicLogText, globalLogPublisher

log = Logger()

#: prctl(2) option: signal to get when the parent dies (linux/prctl.h)
PR_SET_PDEATHSIG = 1

#: the worker the server started, if any (local backends look here)
_active: "DiskWorker | None" = None


def active() -> "DiskWorker | None":
    """The running server's disk worker, or None (work then runs in threads)."""
    return _active


class DiskWorker:
    """One child process running picklable calls; see the module docstring."""

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._executor: ProcessPoolExecutor | None = None

    # -- life cycle ------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Start the child (and make this the active worker); fires when it answers."""
        global _active
        _active = self
        return self.call(_ready)

    def stop(self) -> None:
        """Let the calls in flight finish, then end the child."""
        global _active
        if _active is self:
            _active = None
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True)

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(
                max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                initializer=_child_start, initargs=(os.getpid(),))
        return self._executor

    # -- calls -------------------------------------------------------------------

    def call(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        """``function(*args)`` in the child; the Deferred fires with its result or errbacks."""
        d = defer.Deferred()
        try:
            future = self._pool().submit(_run_logged, function, *args)
        except (BrokenProcessPool, RuntimeError) as e:
            self._executor = None              # the child is gone: the next call starts one
            d.errback(e)
            return d
        future.add_done_callback(lambda f: self._reactor.callFromThread(self._settle, f, d))
        return d

    def _settle(self, future: Future, d: defer.Deferred) -> None:
        error = future.exception()
        if error is not None:
            if isinstance(error, BrokenProcessPool):
                log.error("disk worker process died: {error}; starting a new one", error=error)
                self._executor = None
            d.errback(error)
            return
        result, lines = future.result()
        for namespace, level_name, text in lines:
            Logger(namespace=namespace).emit(LogLevel.levelWithName(level_name), "{text}", text=text)
        d.callback(result)


# -- in the child -----------------------------------------------------------------

def _child_start(server_pid: int) -> None:
    # Ctrl-C in a terminal reaches the whole process group: the server stops
    # the child itself, after the calls in flight
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # The child must not outlive a server that was killed (kill -9 gives it
    # no chance to stop us, and the executor's pipes keep us waiting): the
    # kernel's parent-death signal where there is one, and a watchdog.
    _die_with_parent()
    if os.getppid() != server_pid:
        os._exit(0)                        # the server is already gone
    threading.Thread(target=_watch_parent, args=(server_pid,), daemon=True,
                     name="pymta.diskworker.watchdog").start()


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _watch_parent(server_pid: int) -> None:
    while os.getppid() == server_pid:
        time.sleep(1.0)
    os._exit(0)


def _ready() -> bool:
    return True


def _run_logged(function: Callable[..., Any], *args: Any) -> tuple[Any, list[tuple[str, str, str]]]:
    """Run ``function``; return its result and what it logged (namespace, level, text)."""
    lines: list[tuple[str, str, str]] = []

    def collect(event: dict) -> None:
        text = formatEventAsClassicLogText(event, formatTime=lambda _: "")
        if text:
            # without the "[namespace#level] " prefix the formatter put after the empty time
            body = text.strip()
            prefix_end = body.find("] ")
            body = body[prefix_end + 2:] if body.startswith("[") and prefix_end > 0 else body
            lines.append((event.get("log_namespace", "pymta"), event["log_level"].name, body))

    globalLogPublisher.addObserver(collect)
    try:
        return function(*args), lines
    finally:
        globalLogPublisher.removeObserver(collect)


class _NoReactor:
    """The child's spools never schedule anything: their pipelines are not used."""

    def callFromThread(self, f, *args, **kwargs):  # pragma: no cover - never called
        f(*args, **kwargs)


_spools: dict[tuple[str, str], Any] = {}
_backends: dict[str, Any] = {}


def apply_spool_batch(directory: str, sync: str, kind: str, records: list[tuple]) -> dict[int, str]:
    """One batch of a spool pipeline ("commits", "updates" or "removals") in the child.

    ``records`` are the requests' plain fields (see
    :meth:`pymta.spool.store.Spool.records`); returns the errors of single
    requests by position.  Raising fails the whole batch.
    """
    from pymta.spool.store import Spool, requests_from_records
    spool = _spools.get((directory, sync))
    if spool is None:
        spool = _spools[(directory, sync)] = Spool(directory, reactor=_NoReactor(), sync=sync,
                                                   threadpool=object())
    requests = requests_from_records(kind, records)
    errors = spool.apply_batch(kind, requests)
    return {n: str(errors[id(request)].value) for n, request in enumerate(requests)
            if id(request) in errors}


def deliver_local(spec: tuple, jobs: list[tuple[Any, list]]) -> list[list]:
    """``backend.deliver_all(jobs)`` for the local backend described by ``spec`` in the child.

    ``spec``: (module, class name, options, hostname, domains, config dir),
    see :meth:`pymta.delivery.mailbox.LocalMailboxBackend.worker_spec`.
    """
    key = repr(spec)
    backend = _backends.get(key)
    if backend is None:
        import importlib
        from pymta.config.options import PluginContext
        module, name, options, hostname, domains, config_dir = spec
        cls = getattr(importlib.import_module(module), name)
        context = PluginContext(hostname=hostname, domains=domains, config_dir=config_dir)
        backend = _backends[key] = cls(dict(options), context)
    return backend.deliver_all(jobs)
