"""One SMTP session through the configured plugin chains, with nothing delivered or stored.

``pymta test-session`` (like ``exim -bh``): the server's own adapter
(:class:`pymta.server.protocol.SMTPServerProtocol`, with the sans-I/O
machine, the session policy and the plugin chains) is fed a dialogue line
by line over a :class:`DialogueTransport` instead of a socket.  What would
touch the disk or the network after the session is replaced:

* :class:`DryRunSpool` keeps each message in memory; its "commit" only
  remembers the message (no spool directory is opened or created);
* :class:`DryRunQueue` stands in for the delivery scheduler: it reports
  what would be queued, with the header fields prepended (Received, and
  those the data stage added), and delivers nothing.

Everything else is real: the client's name lookup, the plugins' DNS
queries, their files, the time limits.  Every reply, every plugin answer
(with its reason and how long it took) and every log line are written to
``out``, in the order they happen.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import sys
import threading
from typing import Any, BinaryIO, Callable

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.error import ConnectionDone
from twisted.logger import LogLevel, formatEvent, globalLogPublisher
from twisted.python.failure import Failure

from pymta.config.model import Config, Listener, PluginInstance
from pymta.envelope import Envelope
from pymta.server.policy import CORE_RULES
from pymta.spool.disk import Commit
from pymta.spool.queueid import new_queue_id
from pymta.spool.writer import SpoolWriter
from pymta.verdict import Verdict

__all__ = ["DrySession", "DryRunSpool", "DryRunQueue", "DialogueTransport", "InputLines",
           "dry_run_context", "describe_outcome", "pick_listener", "SIMULATED_TLS"]

#: what a session "over TLS" says about its TLS (nothing was negotiated)
SIMULATED_TLS = {"version": "TLSv1.3", "cipher": "none (simulated by pymta test-session)"}
#: the client's port in the session (there is no socket)
CLIENT_PORT = 0
#: lines of the message's own header printed with what would be queued
HEADER_LINES_SHOWN = 50

Output = Callable[[str], None]


# -- what stands in for the spool and the scheduler ------------------------------------

class _MemoryWriter(SpoolWriter):
    """A SpoolWriter that never spills to a file: the body stays in memory."""

    def spill(self) -> None:
        raise OSError("pymta test-session keeps messages in memory")


class DryRunSpool:
    """The spool's receiving side, in memory: nothing is written anywhere."""

    memory_limit = sys.maxsize

    def __init__(self) -> None:
        #: queue id -> the body as it would be committed
        self.bodies: dict[str, bytes] = {}

    def new_message(self) -> SpoolWriter:
        queue_id = new_queue_id()
        return _MemoryWriter(self, queue_id, f"(test-session: {queue_id} is not written)",
                             self.memory_limit)

    def commit(self, request: Commit) -> defer.Deferred:
        self.bodies[request.queue_id] = bytes(request.body_memory or b"")
        return defer.succeed(None)


class DryRunQueue:
    """Stands in for the delivery scheduler: says what would be queued, delivers nothing."""

    def __init__(self, spool: DryRunSpool, config: Config, out: Output) -> None:
        self.spool = spool
        self.config = config
        self.out = out
        self.queued: list[Envelope] = []

    def submit(self, envelope: Envelope) -> None:
        self.queued.append(envelope)
        body = self.spool.bodies.pop(envelope.queue_id, b"")
        out = self.out
        out(f"*** would queue {envelope.queue_id}: from=<{envelope.sender}>, size={envelope.size}, "
            f"nrcpt={len(envelope.recipients)} (test-session: nothing is queued or delivered)")
        for rcpt in envelope.recipients:
            original = f" (RCPT TO:<{rcpt.original}>)" if rcpt.original != rcpt.address else ""
            out(f"***   to=<{rcpt.address}>{original} via backend {rcpt.route}")
        out("***   the header as it would be stored (+ prepended by the server):")
        for field in envelope.prepend:
            for line in field.rstrip("\r\n").split("\r\n"):
                out(f"***   + {line}")
        head = body.split(b"\r\n\r\n", 1)[0] if not body.startswith(b"\r\n") else b""
        for line in head.split(b"\r\n")[:HEADER_LINES_SHOWN] if head else []:
            out(f"***   | {line.decode('utf-8', 'replace')}")

    def flush(self, node: str) -> int:
        self.out(f"*** ETRN {node}: the queue is not touched by test-session")
        return 0


def dry_run_context(config: Config, reactor: Any, out: Output):
    """The :class:`pymta.server.factory.ServerContext` of a session that stores nothing."""
    from pymta.server.auth import AuthFailureDelay
    from pymta.server.generation import session_context
    from pymta.server.policy import SessionPolicy

    spool = DryRunSpool()
    policy = SessionPolicy(config, reactor)
    policy.observer = PluginReport(out)
    return session_context(config, reactor=reactor, spool=spool,
                           scheduler=DryRunQueue(spool, config, out),
                           auth_failures=AuthFailureDelay(config.limits.auth_failure_delay),
                           policy=policy)


# -- reporting -----------------------------------------------------------------------

def describe_outcome(outcome: Any) -> str:
    """A plugin's answer in words: ``reject 550 5.7.1 VIP recipients only``."""
    if outcome is None:
        return "dunno (returned None)"
    if isinstance(outcome, Failure):
        outcome = outcome.value
    if isinstance(outcome, defer.CancelledError):
        return "no answer in time: cancelled (plugin_timeout)"
    if isinstance(outcome, BaseException):
        return f"raised {type(outcome).__name__}: {outcome}"
    if not isinstance(outcome, Verdict):
        return f"returned {outcome!r}, not a Verdict"
    words = [outcome.kind.value]
    if outcome.code is not None:
        words.append(str(outcome.code))
    if outcome.enhanced:
        words.append(outcome.enhanced)
    if outcome.text:
        words.append(" / ".join(outcome.text.splitlines()))
    text = " ".join(words)
    if outcome.rewrite is not None:
        text += f"; rewrite to {', '.join(str(r) for r in outcome.rewrite)}"
    for name, value in outcome.headers:
        text += f"; add header {name}: {value.replace(chr(13) + chr(10), '')}"   # unfolded
    if outcome.drop_headers:
        text += f"; remove header fields {', '.join(map(str, outcome.drop_headers))}"
    return text


class PluginReport:
    """The stage observer: one line per plugin answer."""

    def __init__(self, out: Output) -> None:
        self.out = out

    def __call__(self, stage: str, plugin: PluginInstance, outcome: Any, seconds: float) -> None:
        if plugin is CORE_RULES:
            self.out(f"*** {stage}: core rules: {outcome}")
            return
        described = describe_login(outcome) if stage == "auth" else describe_outcome(outcome)
        self.out(f"*** {stage}: plugin {plugin.name} ({plugin.use}): {described} "
                 f"[{seconds * 1000:.1f} ms]")


def describe_login(outcome: Any) -> str:
    """An auth checker's answer in words: the user it authenticated, or its refusal."""
    if isinstance(outcome, Failure) and outcome.check(UnauthorizedLogin):
        return f"refused ({outcome.getErrorMessage()})"
    if isinstance(outcome, (str, bytes)):
        user = outcome.decode("utf-8", "replace") if isinstance(outcome, bytes) else outcome
        return f"authenticated {user}"
    return describe_outcome(outcome)


class LogReport:
    """Log events of the session as ``*** log:`` lines (pymta's, and others' warnings)."""

    def __init__(self, out: Output) -> None:
        self.out = out

    def __call__(self, event: dict) -> None:
        namespace = event.get("log_namespace") or ""
        level = event.get("log_level") or LogLevel.info
        if not namespace.startswith("pymta") and level < LogLevel.warn:
            return
        text = formatEvent(event) or ""
        failure = event.get("log_failure")
        if failure is not None:
            text += f": {failure.type.__name__}: {failure.getErrorMessage()}"
        for line in text.splitlines() or [""]:
            self.out(f"*** log: {line}")


# -- the connection ---------------------------------------------------------------------

class DialogueTransport:
    """The session's transport: what the server writes goes to the report."""

    disconnecting = False

    def __init__(self, session: "DrySession", peer: Any, host: Any) -> None:
        self._session = session
        self._peer = peer
        self._host = host
        self.paused = False

    def write(self, data: bytes) -> None:
        self._session.server_wrote(data)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self._session.server_closed()

    abortConnection = loseConnection

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._session.ready()

    def stopProducing(self) -> None:
        self.loseConnection()

    def registerProducer(self, producer, streaming) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def getPeer(self):
        return self._peer

    def getHost(self):
        return self._host

    def getHandle(self):
        return None

    def startTLS(self, context: Any) -> None:
        self._session.tls_started()


class InputLines:
    """The client's lines: all of a file (or pipe) at once, or as typed on a terminal."""

    def __init__(self, stream: BinaryIO, reactor: Any, interactive: bool) -> None:
        self.reactor = reactor
        self._lines: list[bytes | None] = []
        self._waiting: defer.Deferred | None = None
        if interactive:
            threading.Thread(target=self._read_terminal, args=(stream,), daemon=True,
                             name="test-session input").start()
        else:
            self._lines = stream.read().splitlines(keepends=True) + [None]

    def _read_terminal(self, stream: BinaryIO) -> None:
        # os.read, not the stream's readline: a thread blocked in a buffered
        # read holds its lock, and the interpreter cannot exit past it
        fd = stream.fileno()
        pending = b""
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self.reactor.callFromThread(self._arrived, line + b"\n")
            if not data:
                if pending:
                    self.reactor.callFromThread(self._arrived, pending)
                self.reactor.callFromThread(self._arrived, None)
                return

    def _arrived(self, line: bytes | None) -> None:
        self._lines.append(line)
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            waiting.callback(self._lines.pop(0))

    def next(self) -> defer.Deferred:
        """The next line as read (its line end as typed), or None at the end of input."""
        if self._lines:
            return defer.succeed(self._lines.pop(0))
        self._waiting = defer.Deferred()
        return self._waiting


class DrySession:
    """One session through the server's adapter; :meth:`run` fires when it is over."""

    def __init__(self, config: Config, reactor: Any, out: Output, *, client_ip: str,
                 listener: Listener, tls: bool = False, auth_user: str | None = None,
                 echo: bool = True) -> None:
        from pymta.server.factory import ConnectionCounter, SMTPServerFactory

        self.config = config
        self.reactor = reactor
        self.out = out
        self.echo = echo
        self.tls = tls
        self.auth_user = auth_user
        if tls:   # as if the client had connected with implicit TLS (or done STARTTLS)
            listener = dataclasses.replace(listener, implicit_tls=True, starttls=False,
                                           require_tls=False)
        self.listener = listener
        self.context = dry_run_context(config, reactor, out)
        self.factory = SMTPServerFactory(self.context, listener, ConnectionCounter())
        version = ipaddress.ip_address(client_ip).version
        address = IPv6Address if version == 6 else IPv4Address
        self.peer = address("TCP", client_ip, CLIENT_PORT)
        self.protocol = None
        self.transport: DialogueTransport | None = None
        self._greeted = False
        self._closed = False
        self._reading = False
        self._done: defer.Deferred = defer.Deferred()
        self._lines: InputLines | None = None
        self._pending = b""

    # -- running -------------------------------------------------------------------------
    def run(self, lines: InputLines) -> defer.Deferred:
        self._lines = lines
        log_report = LogReport(self.out)
        globalLogPublisher.addObserver(log_report)
        self._done.addBoth(lambda result: (globalLogPublisher.removeObserver(log_report), result)[1])
        self._describe()
        self.protocol = self.factory.buildProtocol(self.peer)
        self.transport = DialogueTransport(self, self.peer,
                                           IPv4Address("TCP", "127.0.0.1", 25))
        self.protocol.makeConnection(self.transport)
        session = self.protocol.session
        if self.tls:
            session.tls = dict(SIMULATED_TLS)
        if self.auth_user is not None:
            session.auth_user = self.auth_user
            self.protocol.conn.auth_user = self.auth_user
        return self._done

    def _describe(self) -> None:
        config, listener = self.config, self.listener
        trusted = config.is_trusted(self.peer.host)
        relay = "yes" if trusted or self.auth_user else "no"
        self.out(f"*** test-session of {config.source}: nothing is delivered, nothing is written "
                 "to the spool")
        self.out(f"*** listener {listener.name} (role {listener.role}); client {self.peer.host}: "
                 f"{'in' if trusted else 'not in'} trusted_networks; TLS: "
                 f"{'yes (simulated)' if self.tls else 'no'}; authenticated: "
                 f"{self.auth_user or 'no'}; may relay: {relay}")

    def ready(self) -> None:
        """The server waits for the client: send the next line."""
        if self._closed or not self._greeted or self._reading or self.transport.paused:
            return
        self._reading = True
        self._lines.next().addCallback(self._send)

    def _send(self, line: bytes | None) -> None:
        self._reading = False
        if self._closed:
            return
        if line is None:
            self.out("*** end of input: the client disconnects")
            self._lose(ConnectionDone("end of input"))
            return
        line = line.rstrip(b"\r\n") + b"\r\n"
        if self.echo:
            self.out("C: " + line[:-2].decode("utf-8", "replace"))
        self.protocol.dataReceived(line)
        if not self._closed and not self.transport.paused:
            self.reactor.callLater(0, self.ready)

    # -- what the server does ------------------------------------------------------------
    def server_wrote(self, data: bytes) -> None:
        self._pending += data
        *lines, self._pending = self._pending.split(b"\r\n")
        for line in lines:
            self.out("S: " + line.decode("utf-8", "replace"))
        if not self._greeted:
            self._greeted = True
            self.reactor.callLater(0, self.ready)

    def server_closed(self) -> None:
        if self._pending:
            self.server_wrote(b"\r\n")
        self.out("*** the server closed the connection")
        self._lose(ConnectionDone("closed by the server"))

    def tls_started(self) -> None:
        self.out("*** STARTTLS: no handshake in test-session; the session goes on as if "
                 "encrypted")
        self.protocol.session.tls = dict(SIMULATED_TLS)

    def _lose(self, reason: Exception) -> None:
        if self._closed:
            return
        self._closed = True
        self.transport.disconnecting = True
        # as a real transport does: the protocol hears of it on the next turn
        self.reactor.callLater(0, self._connection_lost, reason)

    def _connection_lost(self, reason: Exception) -> None:
        self.protocol.connectionLost(Failure(reason))
        self._done.callback(None)


def pick_listener(config: Config, name: str | None) -> Listener:
    """The listener named ``name``, or the first one; ValueError naming the choices."""
    if name is None:
        return config.listeners[0]
    for listener in config.listeners:
        if listener.name == name:
            return listener
    raise ValueError(f"no listener named {name!r}; the config has "
                     f"{', '.join(l.name for l in config.listeners)}")
