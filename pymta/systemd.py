"""Telling systemd how the server is doing: the notification socket of sd_notify(3).

A unit with ``Type=notify`` (``etc/pymta.service``) gives the server the
address of a datagram socket in ``NOTIFY_SOCKET``; the server sends it
newline-separated ``KEY=value`` assignments.  The protocol is one
``sendto`` of a few bytes, so it is written here rather than taken from a
library (sd_notify(3) describes it; the ``sdnotify`` package does the same):

* ``READY=1`` (with ``MAINPID=`` and a ``STATUS=``) once every listener is
  listening and the spool is recovered: ``systemctl start`` returns then,
  and units ordered ``After=pymta.service`` start then.  ``MAINPID=``
  matters only for a twistd that daemonizes (no ``--nodaemon``): the
  process that reports is then not the one systemd started, and the unit
  needs ``NotifyAccess=all``;
* ``STATUS=`` with the size of the queue, every :data:`STATUS_INTERVAL`
  seconds (``systemctl status pymta`` shows it);
* ``STOPPING=1`` when a stop begins (the sessions drain afterwards);
* ``RELOADING=1`` with ``MONOTONIC_USEC=`` when a reload begins, and
  ``READY=1`` when it is over (:meth:`NotifyService.reloading`,
  :meth:`NotifyService.ready`), so that ``systemctl reload`` waits for it;
* ``WATCHDOG=1`` at half the unit's ``WatchdogSec=``, from the reactor
  thread, so that a server whose reactor hangs is restarted.

Without ``NOTIFY_SOCKET`` (not started by systemd, or ``Type=simple``)
every call does nothing.  ``NOTIFY_SOCKET`` and the watchdog variables are
taken out of the environment when read, as ``sd_notify(unset_environment=1)``
does, so that the processes the server starts (the disk worker, programs a
delivery backend runs) do not speak for it.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Callable, MutableMapping

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.logger import Logger

log = Logger(namespace="pymta.systemd")

__all__ = ["Notifier", "NotifyService", "STATUS_INTERVAL", "socket_address"]

#: seconds between two STATUS= updates
STATUS_INTERVAL = 30.0
#: seconds a notification waits for room in the manager's queue (a busy systemd
#: reads it soon; libsystemd's sd_notify waits without a limit) before it is dropped
SEND_TIMEOUT = 2.0


def socket_address(value: str) -> str:
    """The address ``socket.sendto`` takes for a ``NOTIFY_SOCKET`` value.

    An absolute path is a socket file; ``@name`` is a socket in the
    abstract namespace (a NUL byte first).  Anything else (a relative path,
    systemd 254's ``vsock:`` addresses) is a ValueError.
    """
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    raise ValueError(f"NOTIFY_SOCKET={value!r}: expected an absolute path or @abstract-name")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock of ``MONOTONIC_USEC=``."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify messages to one socket, or nowhere (``address`` None)."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        #: the unit's WatchdogSec= in microseconds, when it applies to this process
        self.watchdog_usec = watchdog_usec
        self._socket: socket.socket | None = None
        self._failed = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] | None = None) -> "Notifier":
        """The notifier ``NOTIFY_SOCKET`` asks for; the variables are removed from ``environ``."""
        environ = os.environ if environ is None else environ
        value = environ.pop("NOTIFY_SOCKET", "")
        usec = environ.pop("WATCHDOG_USEC", "")
        watchdog_pid = environ.pop("WATCHDOG_PID", "")
        address = None
        if value:
            try:
                address = socket_address(value)
            except ValueError as e:
                log.warn("systemd: {error}; not sending notifications", error=e)
        watchdog_usec = None
        if address is not None and usec.isdigit() and int(usec) > 0 \
                and watchdog_pid in ("", str(os.getpid())):
            watchdog_usec = int(usec)
        return cls(address, watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines as one datagram; True if it went out.

        A full queue at the manager (a datagram socket holds few messages)
        is waited for, up to :data:`SEND_TIMEOUT` seconds: READY=1 or
        STOPPING=1 dropped would leave systemd waiting.  A failure (no such
        socket, the manager gone or stuck) is logged once and never raised:
        the server runs on without its manager's attention.
        """
        if self.address is None:
            return False
        message = "\n".join(assignments).encode("utf-8")
        try:
            if self._socket is None:     # made at the first use: after twistd's fork, if any
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._socket.settimeout(SEND_TIMEOUT)
            self._socket.sendto(message, self.address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                log.warn("systemd: cannot notify {address}: {error}", address=self._shown(),
                         error=e.strerror or e)
            return False
        self._failed = False
        return True

    def _shown(self) -> str:
        address = self.address or ""
        return "@" + address[1:] if address.startswith("\0") else address

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _status_line(text: str) -> str:
    return "STATUS=" + " ".join(text.split())      # one line: a newline would end the value


class NotifyService(Service):
    """Tells systemd when the server is ready, how big its queue is, and when it stops.

    Add it to the server's MultiService after every other service: a
    MultiService starts its children in order (this one starts when the
    scheduler has recovered the spool and the listeners listen) and stops
    them in reverse order (this one is the first told of a stop).
    """

    def __init__(self, notifier: Notifier, status: Callable[[], str], reactor,
                 listening: Callable[[], list[defer.Deferred]] = list,
                 status_interval: float = STATUS_INTERVAL) -> None:
        self.setName("systemd-notify")
        self.notifier = notifier
        #: one line describing the server (the queue size), for STATUS=
        self.status = status
        #: Deferreds that fire when the listeners listen
        self._listening = listening
        self._reactor = reactor
        self._interval = status_interval
        self._loops: list[task.LoopingCall] = []

    def startService(self) -> None:
        super().startService()
        if not self.notifier.enabled:
            return
        d = defer.gatherResults(self._listening(), consumeErrors=True)
        d.addCallback(lambda _: self._when_reactor_runs(self._ready_at_start))
        d.addErrback(lambda f: log.failure("systemd: not ready", f))

    def _when_reactor_runs(self, call: Callable[[], object]) -> None:
        """``call`` once the reactor runs (at once if it does).

        twistd starts the services before ``reactor.run()``, which installs
        the SIGTERM handler of a clean stop: systemd told READY=1 earlier
        could stop the server with a SIGTERM that kills it on the spot.
        """
        when_running = getattr(self._reactor, "callWhenRunning", None)
        if when_running is None:          # a test clock
            call()
        else:
            when_running(call)

    def _ready_at_start(self) -> None:
        if not self.running:
            return
        self.notifier.send("READY=1", f"MAINPID={os.getpid()}", _status_line(self._status()))
        self._every(self._interval, self.update_status)
        if self.notifier.watchdog_usec:
            self._every(self.notifier.watchdog_usec / 2e6, lambda: self.notifier.send("WATCHDOG=1"))

    def _every(self, seconds: float, call: Callable[[], object]) -> None:
        loop = task.LoopingCall(call)
        loop.clock = self._reactor
        loop.start(seconds, now=False)
        self._loops.append(loop)

    def stopService(self):
        if self.notifier.enabled:
            self.notifier.send("STOPPING=1", "STATUS=stopping: sessions finish their transactions")
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops.clear()
        return super().stopService()

    def update_status(self) -> None:
        """Send STATUS= with what :attr:`status` says now."""
        self.notifier.send(_status_line(self._status()))

    def reloading(self) -> None:
        """A reload (SIGHUP) begins: ``systemctl reload`` waits for :meth:`ready`."""
        if not self.running:             # stopping: STOPPING=1 was the last word
            return
        self.notifier.send("RELOADING=1", "STATUS=reloading the configuration",
                           f"MONOTONIC_USEC={monotonic_usec()}")

    def ready(self) -> None:
        """A reload is over (applied or refused): ready again, with the status line."""
        if not self.running:             # the stop began during the reload
            return
        self.notifier.send("READY=1", _status_line(self._status()))

    def _status(self) -> str:
        try:
            return self.status()
        except Exception as e:       # a status line must never stop a notification
            log.failure("systemd: status line failed")
            return f"running (status unavailable: {e})"


def when_listening(service) -> defer.Deferred:
    """A Deferred that fires once a StreamServerEndpointService listens (its port bound).

    Twisted's service keeps that Deferred as ``_waitingForPort`` (set in
    ``privilegedStartService``); a service without one is taken as listening.
    """
    waiting = getattr(service, "_waitingForPort", None)
    if not isinstance(waiting, defer.Deferred):
        return defer.succeed(None)
    listening: defer.Deferred = defer.Deferred()

    def bound(port):
        listening.callback(None)
        return port

    def failed(failure):
        listening.errback(failure)
        return failure

    waiting.addCallbacks(bound, failed)
    return listening


def queue_status(scheduler, counter=None) -> Callable[[], str]:
    """The STATUS= line of a running server: its queue and its sessions."""

    def status() -> str:
        held = len(scheduler.held())
        queued = len(scheduler.queued())
        text = (f"{queued + held} message(s) in the queue ({held} held), "
                f"{scheduler.in_flight} being delivered")
        if counter is not None:
            text += f"; {counter.total} connection(s)"
        return text

    return status
