"""A scripted fake SMTP server and a fresh reactor per test, for the relay tests.

``run_reactor(test)`` runs ``test(reactor)`` (which returns a Deferred or a
value) on a new reactor instance and returns its result; a test never runs
longer than ``timeout`` seconds.

``FakeSMTP(reactor)`` listens on 127.0.0.1 (or ``interface``) and answers like
a minimal ESMTP server; a test changes what it says with :meth:`FakeSMTP.on`:
a reply (bytes), ``HANG`` (answer nothing any more), ``CLOSE`` (drop the connection) or
a callable ``(protocol, line) -> None``.  It records every command line and
every message it accepted (sender, recipients, content after unstuffing).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols import tls
from twisted.python.failure import Failure

HANG = object()
CLOSE = object()
#: for STARTTLS: say 220, then answer the TLS handshake with plaintext and close
BREAK_TLS = object()

DEFAULT_EHLO = ["fake.example", "PIPELINING", "SIZE 10240000", "8BITMIME", "ENHANCEDSTATUSCODES",
                "SMTPUTF8", "DSN", "CHUNKING"]


class ReactorTimeout(AssertionError):
    pass


def run_reactor(test: Callable[[Any], Any], timeout: float = 15.0) -> Any:
    reactor = EPollReactor()
    outcome: list[Any] = []
    # startTLS batches small TLS writes on "the" reactor's clock (the global
    # one); under this private reactor that clock must be this reactor.
    default_clock = tls._get_default_clock
    tls._get_default_clock = lambda: reactor

    def finish(result: Any) -> None:
        if not outcome:
            outcome.append(result)
        if reactor.running:
            reactor.stop()

    def start() -> None:
        d = defer.maybeDeferred(test, reactor)
        d.addBoth(finish)

    def too_slow() -> None:
        finish(Failure(ReactorTimeout(f"the test did not finish within {timeout} s")))

    reactor.callWhenRunning(start)
    guard = reactor.callLater(timeout, too_slow)
    try:
        reactor.run(installSignalHandlers=False)
    finally:
        tls._get_default_clock = default_clock
    if guard.active():
        guard.cancel()
    try:
        reactor.removeReader(reactor.waker)
        reactor.waker.connectionLost(None)
    except Exception:
        pass
    result = outcome[0]
    if isinstance(result, Failure):
        result.raiseException()
    return result


def sleep(reactor: Any, seconds: float) -> defer.Deferred:
    d = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


@dataclass
class ReceivedMessage:
    sender: str
    recipients: list[str]
    content: bytes
    via: str   # "DATA" or "BDAT"
    mail_params: str = ""
    rcpt_params: list[str] = field(default_factory=list)
    tls: bool = False


class FakeSMTPProtocol(Protocol):
    def __init__(self, server: "FakeSMTP") -> None:
        self.server = server
        self.buf = b""
        self.mode = "command"
        self.data = b""
        self.bdat_left = 0
        self.bdat_last = False
        self.sender: str | None = None
        self.mail_params = ""
        self.recipients: list[str] = []
        self.rcpt_params: list[str] = []
        self.chunks = b""
        self.tls = False
        self.closing = False
        self.breaking_tls = False

    def connectionMade(self) -> None:
        self.server.connections.append(self)
        greeting = self.server.greeting
        if greeting is not None:
            self.respond(greeting, "greeting")

    def connectionLost(self, reason: Any = None) -> None:
        self.server.closed += 1

    def send(self, data: bytes) -> None:
        if self.transport is not None and self.transport.connected and not self.closing:
            self.transport.write(data)

    def respond(self, action: Any, line: bytes) -> None:
        if action is HANG:
            self.closing = True          # answers nothing from now on, keeps the connection
            return
        if action is CLOSE:
            self.closing = True
            self.transport.loseConnection()
            return
        if callable(action):
            action(self, line)
            return
        self.send(action)

    def dataReceived(self, data: bytes) -> None:
        if self.breaking_tls:
            self.send(b"500 5.5.2 Error: command not recognized\r\n")
            self.closing = True
            self.transport.loseConnection()
            return
        self.buf += data
        while self.buf and not self.closing:
            if self.mode == "data":
                self.data += self.buf
                self.buf = b""
                end = self.data.find(b"\r\n.\r\n")
                if end < 0:
                    return
                raw = self.data[:end + 2]          # starts with the CRLF put in front at DATA
                self.buf = self.data[end + 5:]
                self.data = b""
                self.mode = "command"
                content = raw.replace(b"\r\n.", b"\r\n")[2:]
                self.message_done(content, "DATA", b".")
                continue
            if self.mode == "bdat":
                take = min(self.bdat_left, len(self.buf))
                self.chunks += self.buf[:take]
                self.buf = self.buf[take:]
                self.bdat_left -= take
                if self.bdat_left:
                    return
                self.mode = "command"
                if self.bdat_last:
                    content, self.chunks = self.chunks, b""
                    self.message_done(content, "BDAT", b"BDAT")
                else:
                    self.respond(self.server.action(b"BDAT", b"250 2.0.0 chunk ok\r\n"), b"BDAT")
                continue
            nl = self.buf.find(b"\r\n")
            if nl < 0:
                return
            line, self.buf = self.buf[:nl], self.buf[nl + 2:]
            self.command(line)

    def message_done(self, content: bytes, via: str, key: bytes) -> None:
        action = self.server.action(key, b"250 2.0.0 Ok: queued as FAKE\r\n")
        if self.sender is not None and self.recipients and isinstance(action, bytes) \
                and action.startswith(b"2"):
            self.server.messages.append(ReceivedMessage(self.sender, list(self.recipients), content,
                                                        via, self.mail_params, list(self.rcpt_params),
                                                        self.tls))
        self.respond(action, key)
        self.sender, self.recipients, self.rcpt_params = None, [], []

    def command(self, line: bytes) -> None:
        self.server.commands.append(line)
        verb = line.split(b" ", 1)[0].upper()
        upper = line.upper()
        if verb in (b"EHLO", b"HELO"):
            lines = self.server.ehlo_lines(self)
            reply = "".join(f"250{'-' if i < len(lines) - 1 else ' '}{text}\r\n"
                            for i, text in enumerate(lines)).encode()
            if verb == b"HELO":
                reply = b"250 fake.example\r\n"
            self.respond(self.server.action(verb, reply), line)
        elif upper.startswith(b"MAIL FROM:"):
            address, _, params = line[10:].partition(b" ")
            action = self.server.action(b"MAIL", b"250 2.1.0 Ok\r\n")
            if isinstance(action, bytes) and action.startswith(b"2"):
                self.sender = address.decode().strip("<>")
                self.mail_params = params.decode()
                self.recipients, self.rcpt_params = [], []
            self.respond(action, line)
        elif upper.startswith(b"RCPT TO:"):
            address, _, params = line[8:].partition(b" ")
            rcpt = address.decode().strip("<>")
            action = self.server.rcpt_actions.get(rcpt, self.server.action(b"RCPT", b"250 2.1.5 Ok\r\n"))
            if isinstance(action, bytes) and action.startswith(b"2") and self.sender is not None:
                self.recipients.append(rcpt)
                self.rcpt_params.append(params.decode())
            self.respond(action, line)
        elif verb == b"DATA":
            action = self.server.action(b"DATA", b"354 go ahead\r\n")
            if isinstance(action, bytes) and action.startswith(b"354"):
                self.mode = "data"
                # the content starts a line: a CRLF in front makes the terminator scan uniform
                self.data = b"\r\n"
            self.respond(action, line)
        elif verb == b"BDAT":
            parts = line.split()
            self.bdat_left = int(parts[1])
            self.bdat_last = len(parts) > 2
            self.mode = "bdat"
        elif verb == b"RSET":
            self.sender, self.recipients, self.rcpt_params, self.chunks = None, [], [], b""
            self.respond(self.server.action(b"RSET", b"250 2.0.0 Ok\r\n"), line)
        elif verb == b"QUIT":
            self.respond(self.server.action(b"QUIT", b"221 2.0.0 Bye\r\n"), line)
            self.transport.loseConnection()
        elif verb == b"STARTTLS":
            action = self.server.action(b"STARTTLS", None)
            if action is BREAK_TLS:
                self.send(b"220 2.0.0 Ready to start TLS\r\n")
                self.breaking_tls = True
                self.buf = b""
            elif action is None:
                self.send(b"220 2.0.0 Ready to start TLS\r\n")
                self.transport.startTLS(self.server.tls_options)
                self.tls = True
                self.buf = b""
            else:
                self.respond(action, line)
        elif verb == b"AUTH":
            self.respond(self.server.action(b"AUTH", b"235 2.7.0 Authentication successful\r\n"), line)
        elif verb == b"NOOP":
            self.send(b"250 2.0.0 Ok\r\n")
        else:
            self.respond(self.server.action(verb, b"502 5.5.1 unknown command\r\n"), line)


class FakeSMTP:
    def __init__(self, reactor: Any, interface: str = "127.0.0.1", port: int = 0,
                 ehlo: list[str] | None = None, tls_options: Any = None) -> None:
        self.reactor = reactor
        self.greeting: Any = b"220 fake.example ESMTP\r\n"
        self.ehlo = list(DEFAULT_EHLO if ehlo is None else ehlo)
        self.tls_options = tls_options
        if tls_options is not None and "STARTTLS" not in self.ehlo:
            self.ehlo.append("STARTTLS")
        self.actions: dict[bytes, Any] = {}
        self.rcpt_actions: dict[str, Any] = {}
        self.commands: list[bytes] = []
        self.messages: list[ReceivedMessage] = []
        self.connections: list[FakeSMTPProtocol] = []
        self.closed = 0
        factory = Factory.forProtocol(lambda: FakeSMTPProtocol(self))
        self.port = reactor.listenTCP(port, factory, interface=interface)
        self.port_number = self.port.getHost().port

    def ehlo_lines(self, protocol: FakeSMTPProtocol) -> list[str]:
        if protocol.tls:
            return [line for line in self.ehlo if line != "STARTTLS"]
        return self.ehlo

    def on(self, verb: str, action: Any) -> "FakeSMTP":
        """What to answer to ``verb`` (EHLO, MAIL, RCPT, DATA, "." for end of data, BDAT ...)."""
        self.actions[verb.upper().encode()] = action
        return self

    def on_rcpt(self, address: str, action: Any) -> "FakeSMTP":
        self.rcpt_actions[address] = action
        return self

    def action(self, key: bytes, default: Any) -> Any:
        return self.actions.get(key, default)

    def verbs(self) -> list[str]:
        return [c.split(b" ", 1)[0].decode().upper() for c in self.commands]

    def stop(self) -> defer.Deferred:
        for connection in self.connections:
            if connection.transport is not None:
                connection.transport.abortConnection()
        return defer.maybeDeferred(self.port.stopListening)
