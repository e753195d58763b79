"""The disk worker: a child process for batched calls (the spool's and the local deliveries' file work).

In CPython every file-system call releases the GIL and takes it back.  With
the spool's flushes and the local deliveries in threads of the server
process, each of their ~20 calls per message handed the GIL to and from
the reactor thread, and each of the reactor thread's own calls (send,
recv, the log line) waited for it to come back (bench/README.md has the
measurements).  A child process has a GIL of its own: the reactor thread
hands it a batch, goes on, and hears back when the batch is on disk.

:class:`DiskWorker` starts the child with ``reactor.spawnProcess`` (a fresh
interpreter, not a copy of the running server) and talks to it over its
stdin and stdout: each call is one length-prefixed pickle ``(serial,
function, args)``, each answer one ``(serial, ok, result)``.  The reactor
reads the answers like any other connection, so the server process runs no
thread for this and each call costs it one write and one read.  The child
runs each call in a thread of its own pool (a commit batch never waits
behind a delivery batch) and answers as each finishes.

The worker knows neither the spool nor delivery: a caller names the
function to run, which travels by reference (its module and name) and is
imported by the child; the caller's side keeps such functions in its own
modules (:func:`pymta.spool.worker_calls.apply_spool_batch`,
:func:`pymta.delivery.worker_call.deliver_local`).  What the child logs
while running a call comes back with the answer and is logged by the
server, so nothing goes missing from the log file.

If the child dies, the calls in flight fail (the spool treats a failed
commit batch as not durable: 4xx to the clients, its files removed) and
the next call starts a new child.  The child ends when the server closes
its stdin, and also when the server dies (kill -9): parent-death signal and
a watchdog.
"""

from __future__ import annotations

import enum
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.process import ProcessWriter
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import LogLevel, Logger, formatEventAsClassicLogText, globalLogPublisher

from pymta.libc import die_with_parent as _die_with_parent

log = Logger()

#: calls the child runs at once: more than ever come (3 spool pipelines and
#: one per local backend, each with one call in flight), so none waits
CHILD_THREADS = 32
#: every frame: payload length, call serial
_HEADER = struct.Struct("!IQ")
#: a longer frame means the pipe is out of step (something else wrote to it)
MAX_FRAME = 1 << 30
#: seconds stop() waits for the calls in flight before it kills the child
STOP_TIMEOUT = 60.0

class DiskWorkerError(Exception):
    """The disk worker's child process ended with calls in flight."""


class _Life(enum.Enum):
    """Where the worker is in its life; each state says what a call and the child's end do."""

    #: no child: the next call starts one
    IDLE = "idle"
    #: a child runs and takes calls; if it ends, back to IDLE
    RUNNING = "running"
    #: stop() closed the child's input: it finishes the calls in flight, takes no new ones
    STOPPING = "stopping"
    #: for good: calls fail, no child is started again
    STOPPED = "stopped"


class DiskWorker:
    """The child process and the calls in flight; see the module docstring."""

    #: see STOP_TIMEOUT
    stop_timeout = STOP_TIMEOUT

    def __init__(self, reactor) -> None:
        self._reactor = reactor
        self._life = _Life.IDLE
        #: the child, in RUNNING and STOPPING
        self._child: _ChildProtocol | None = None
        self._pending: dict[int, defer.Deferred] = {}
        self._serial = 0
        #: in STOPPING: fired when the child has ended, and the stop timer
        self._stop_waiters: list[defer.Deferred] = []
        self._killer = None

    # -- life cycle ------------------------------------------------------------

    def start(self) -> defer.Deferred:
        """Start the child; fires when it answers."""
        return self.call(_ready)

    def stop(self) -> defer.Deferred:
        """Close the child's input: it finishes the calls in flight and ends; fires then.

        For good: later calls fail rather than start a new child.
        """
        if self._life in (_Life.IDLE, _Life.STOPPED):
            self._life = _Life.STOPPED
            return defer.succeed(None)
        if self._life is _Life.RUNNING:
            self._life = _Life.STOPPING
            self._child.transport.closeStdin()
            # a child stuck (a hung disk, an NFS mount) must not hold up the
            # server's shutdown for ever: what it had in flight fails, and a
            # commit that did not answer is taken back like any failed batch
            self._killer = self._reactor.callLater(self.stop_timeout, self._kill, self._child)
        waiting = defer.Deferred()
        self._stop_waiters.append(waiting)
        return waiting

    @property
    def pid(self) -> int | None:
        """The child's process id, while it runs."""
        return self._child.transport.pid if self._child is not None else None

    def _spawn(self) -> "_ChildProtocol":
        child = _ChildProtocol(self)
        env = dict(os.environ)
        # the child imports what the server imports (and pickled functions by name)
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        code = "from pymta.worker.process import child_main; child_main()"
        self._reactor.spawnProcess(child, sys.executable, [sys.executable, "-c", code, str(os.getpid())],
                                   env=env, childFDs={0: "w", 1: "r", 2: "r"})
        return child

    # -- calls -------------------------------------------------------------------

    def call(self, function: Callable[..., Any], *args: Any) -> defer.Deferred:
        """``function(*args)`` in the child; the Deferred fires with its result or errbacks."""
        if self._life in (_Life.STOPPING, _Life.STOPPED):
            return defer.fail(DiskWorkerError("the disk worker is stopped"))
        try:
            frame = pickle.dumps((function, args), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:
            return defer.fail(e)
        if len(frame) > MAX_FRAME:
            return defer.fail(DiskWorkerError(f"call of {len(frame)} bytes is too large for the disk worker"))
        if self._life is _Life.IDLE:
            try:
                self._child = self._spawn()
            except OSError as e:               # fork failed (process or memory limits)
                log.error("cannot start the disk worker process: {error}", error=e)
                return defer.fail(DiskWorkerError(f"cannot start the disk worker process: {e}"))
            self._life = _Life.RUNNING
        self._serial += 1
        d = self._pending[self._serial] = defer.Deferred()
        self._send(_HEADER.pack(len(frame), self._serial), frame)
        return d

    def _send(self, header: bytes, frame: bytes) -> None:
        """Write one call to the child's stdin, at once when nothing is queued before it.

        The transport's ``write`` only queues: the bytes would leave on the
        reactor's next pass, after it has served every other ready
        connection, and the call (a commit batch that sessions wait on)
        with them.  Whatever the pipe does not take now goes through the
        transport as usual, so the order of bytes is the same either way.
        """
        transport = self._child.transport
        writer = transport.pipes.get(0)
        if (isinstance(writer, ProcessWriter) and writer.connected and not writer.disconnecting
                and not writer.dataBuffer and not writer._tempDataBuffer):
            try:
                sent = os.writev(writer.fd, (header, frame))
            except OSError:        # would block, or a broken pipe: the transport's path decides
                sent = 0
            if sent == len(header) + len(frame):
                return
            transport.writeSequence([header[sent:], frame] if sent < len(header)
                                    else [frame[sent - len(header):]])
            return
        transport.writeSequence([header, frame])

    def _kill(self, child: "_ChildProtocol") -> None:
        log.error("disk worker process did not end within {seconds} s of the stop; killing it",
                  seconds=self.stop_timeout)
        try:
            child.transport.signalProcess("KILL")
        except Exception:                      # already gone
            pass
        child._end("killed after the stop timeout")

    def _answer(self, serial: int, frame: bytes) -> None:
        d = self._pending.pop(serial, None)
        if d is None:
            return
        try:
            ok, payload, lines = pickle.loads(frame)
        except Exception as e:                 # the child checks; should not happen
            d.errback(DiskWorkerError(f"unreadable answer from the disk worker: {e!r}"))
            return
        for namespace, level_name, text in lines:
            Logger(namespace=namespace).emit(LogLevel.levelWithName(level_name), "{text}", text=text)
        if ok:
            d.callback(payload)
        else:
            d.errback(payload)

    def _ended(self, child: "_ChildProtocol", why: str) -> None:
        if self._child is not child:
            return
        # the new state first: the errbacks below may call again at once
        self._child = None
        ended_while = self._life
        self._life = _Life.IDLE if ended_while is _Life.RUNNING else _Life.STOPPED
        pending, self._pending = self._pending, {}
        if pending and ended_while is _Life.RUNNING:
            log.error("disk worker process ended ({why}) with {count} calls in flight; "
                      "the next call starts a new one", why=why, count=len(pending))
        for d in pending.values():
            d.errback(DiskWorkerError(f"the disk worker process ended ({why})"))
        if ended_while is _Life.RUNNING:
            return
        if self._killer is not None and self._killer.active():
            self._killer.cancel()
        self._killer = None
        waiters, self._stop_waiters = self._stop_waiters, []
        for waiting in waiters:
            waiting.callback(None)


class _ChildProtocol(ProcessProtocol):
    """The server's end of the child's pipes: answers on stdout, complaints on stderr."""

    def __init__(self, worker: DiskWorker) -> None:
        self.worker = worker
        self._buffer = bytearray()
        self._errors = b""
        self._done = False

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= _HEADER.size:
            length, serial = _HEADER.unpack_from(self._buffer)
            if length > MAX_FRAME:
                log.error("disk worker: its answers are out of step (frame of {length} bytes); "
                          "ending it", length=length)
                self._buffer.clear()
                self.transport.signalProcess("KILL")
                return
            if len(self._buffer) < _HEADER.size + length:
                return
            frame = bytes(self._buffer[_HEADER.size:_HEADER.size + length])
            del self._buffer[:_HEADER.size + length]
            self.worker._answer(serial, frame)

    def errReceived(self, data: bytes) -> None:
        *lines, self._errors = (self._errors + data).split(b"\n")
        for line in lines:
            if line.strip():
                log.warn("disk worker: {line}", line=line.decode("utf-8", "replace"))

    def outConnectionLost(self) -> None:
        self._end("its output closed")

    def processEnded(self, reason) -> None:
        self._end(str(reason.value))

    def _end(self, why: str) -> None:
        if not self._done:
            self._done = True
            self.worker._ended(self, why)


# -- in the child -----------------------------------------------------------------

def child_main() -> None:
    """The child's loop: read calls from stdin, run them in threads, answer on stdout."""
    global _in_child
    _in_child = True
    server_pid = int(sys.argv[1])
    _child_start(server_pid)
    calls = sys.stdin.buffer
    answers = os.fdopen(os.dup(1), "wb")
    # nothing else may write to the answer pipe: not print(), not C code, not a subprocess
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()
    globalLogPublisher.addObserver(_collect)

    def run(serial: int, function: Callable[..., Any], args: tuple) -> None:
        frame = _answer_frame(function, args)
        with lock:
            answers.write(_HEADER.pack(len(frame), serial) + frame)
            answers.flush()

    with ThreadPoolExecutor(CHILD_THREADS, thread_name_prefix="pymta.diskworker") as pool:
        while True:
            header = calls.read(_HEADER.size)
            if len(header) < _HEADER.size:
                break                          # the server closed our input (or died)
            length, serial = _HEADER.unpack(header)
            frame = calls.read(length)
            if len(frame) < length:
                break
            function, args = pickle.loads(frame)
            pool.submit(run, serial, function, args)


def _answer_frame(function: Callable[..., Any], args: tuple) -> bytes:
    """The pickled ``(ok, result or exception, log lines)`` of one call.

    An exception goes back as itself if the server can unpickle it again,
    else as a DiskWorkerError naming it (with its traceback).
    """
    _collected.lines = []
    try:
        ok, payload = True, function(*args)
    except BaseException as e:
        ok, payload = False, e
    finally:
        lines, _collected.lines = _collected.lines, None
    try:
        frame = pickle.dumps((ok, payload, lines), protocol=pickle.HIGHEST_PROTOCOL)
        if not ok:
            pickle.loads(frame)                # some exceptions pickle but do not unpickle
        return frame
    except Exception as e:
        if ok:
            payload = DiskWorkerError(f"the result of {getattr(function, '__name__', function)} "
                                      f"cannot be sent back: {e!r}")
        else:
            detail = "".join(traceback.format_exception(payload)).rstrip()
            payload = DiskWorkerError(f"{type(payload).__name__}: {payload}\n{detail}")
        return pickle.dumps((False, payload, lines), protocol=pickle.HIGHEST_PROTOCOL)


def _child_start(server_pid: int) -> None:
    # Signals for the whole process group (Ctrl-C, a hang-up, systemd's
    # SIGTERM to the control group) are for the server: it stops the child
    # itself, after the calls in flight, by closing its input.
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    # The child must not outlive a server that was killed: the kernel's
    # parent-death signal where there is one, and a watchdog.
    _die_with_parent()
    if os.getppid() != server_pid:
        os._exit(0)                        # the server is already gone
    threading.Thread(target=_watch_parent, args=(server_pid,), daemon=True,
                     name="pymta.diskworker.watchdog").start()


def _watch_parent(server_pid: int) -> None:
    while os.getppid() == server_pid:
        time.sleep(1.0)
    os._exit(0)


def in_child() -> bool:
    """Is this process a disk worker's child?"""
    return _in_child


def _ready() -> bool:
    return True


_collected = threading.local()
#: is this process the disk worker's child?
_in_child = False


def _collect(event: dict) -> None:
    """Keep what a call logs, for its answer (the calling thread's list)."""
    lines = getattr(_collected, "lines", None)
    if lines is None:
        return
    text = formatEventAsClassicLogText(event, formatTime=lambda _: "")
    if text:
        # without the "[namespace#level] " prefix the formatter put after the
        # empty time, nor the tabs it put after each newline (the server's
        # log writer puts them again)
        body = text.strip().replace("\n\t", "\n")
        prefix_end = body.find("] ")
        body = body[prefix_end + 2:] if body.startswith("[") and prefix_end > 0 else body
        lines.append((event.get("log_namespace", "pymta"), event["log_level"].name, body))
