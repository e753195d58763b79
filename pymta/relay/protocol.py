"""The Twisted side of an outbound SMTP session: a thin Protocol around ClientConnection.

:class:`ClientSession` feeds received bytes to the sans-I/O machine
(:mod:`pymta.smtp.client`), writes what it emits, applies the machine's
timeout for every state, switches the transport to TLS when the machine
says so, and streams message content from the spool with a push producer
(so that a slow server never makes us hold a whole message in memory).

Its :attr:`ClientSession.ready` Deferred fires with the session once it
can run transactions (greeting, EHLO, STARTTLS and EHLO again, AUTH, as the
:class:`SessionSettings` ask), or fails with :class:`SessionError`.
:meth:`ClientSession.send` runs one transaction and fires with the
machine's :class:`~pymta.smtp.client.TransactionDone`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

from twisted.internet import defer
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from zope.interface import implementer

from pymta import tls_description
from pymta.relay.tls import TLSPolicy
from pymta.smtp import client as C
from pymta.smtp import events as E
from pymta.spool.message import SpooledMessage, open_body_file

log = Logger()

#: octets read from the spool per write while sending content
CHUNK = 64 * 1024


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)
    #: send them without TLS too (only when the admin said so)
    allow_plaintext: bool = False


@dataclass(frozen=True)
class SessionSettings:
    helo_name: str
    timeouts: C.ClientTimeouts = field(default_factory=C.ClientTimeouts)
    tls: TLSPolicy = field(default_factory=TLSPolicy)
    auth: Credentials | None = None
    #: speak LMTP (RFC 2033) rather than SMTP (the ``lmtp`` backend)
    lmtp: bool = False


class SessionError(Exception):
    """A session to one host could not be set up; the next host may do better."""

    def __init__(self, text: str, reply: C.ServerReply | None = None, enhanced: str = "4.4.0",
                 tls_failed: bool = False) -> None:
        super().__init__(text)
        self.text = text
        self.reply = reply
        #: the RFC 3463 code to report (a 4.x.x: a session problem is always temporary)
        self.enhanced = enhanced
        #: the TLS handshake failed (opportunistic TLS may try again in plaintext)
        self.tls_failed = tls_failed


def _open_body(message: SpooledMessage) -> BinaryIO:
    """The body from the spool file, even when the spool still holds it in memory: a
    file removed behind the server's back (an admin ``rm``) must fail the attempt."""
    return open_body_file(message.body_path, message.envelope.size)


@implementer(IPushProducer)
class _ContentSender:
    """Writes one message (its prepended header fields, then its body) through the machine,
    as fast as the transport takes it."""

    def __init__(self, session: "ClientSession", message: SpooledMessage) -> None:
        self.session = session
        self.message = message
        self.file: BinaryIO | None = None
        self.paused = False
        self.done = False
        self._prepend_sent = False
        self._registered = False

    def start(self) -> None:
        self.session.transport.registerProducer(self, True)
        self._registered = True
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        session = self.session
        conn = session.conn
        try:
            while not self.paused and not self.done:
                if conn.state is not C.State.BODY:     # the session ended meanwhile
                    self._stop()
                    return
                if not self._prepend_sent:
                    self._prepend_sent = True
                    self.file = _open_body(self.message)
                    conn.send_body(self.message.prepend_bytes())      # may be empty
                else:
                    chunk = self.file.read(CHUNK)
                    if chunk:
                        conn.send_body(chunk)
                    else:
                        self._stop()
                        conn.end_body()
                session._flush()
        except (OSError, C.ClientError) as e:
            # the spool file went away or changed size under us: the framing
            # cannot be finished, so the transaction must not complete
            log.error("{peer}: cannot send message content: {error}", peer=session.peer, error=e)
            self._stop()
            session.abort(f"cannot read the message from the spool: {e}")
        session._drive()

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.done:
            return
        self.done = True
        if self.file is not None:
            self.file.close()
            self.file = None
        if self._registered:
            self._registered = False
            try:
                self.session.transport.unregisterProducer()
            except Exception:   # the connection is already gone
                pass


class TLSStage(enum.Enum):
    """Where a relay connection is with TLS (one value, not a flag per step)."""
    PLAINTEXT = "plaintext"       # no STARTTLS asked for (yet)
    HANDSHAKING = "handshaking"   # the server granted STARTTLS: the handshake, then EHLO again
    ENCRYPTED = "encrypted"       # ready over TLS
    DECLINED = "declined"         # the server refused STARTTLS: plaintext from now on


class ClientSession(Protocol):
    """One outbound SMTP connection."""

    def __init__(self, settings: SessionSettings, host: str, reactor: Any) -> None:
        self.settings = settings
        #: the host name we connected to (TLS verification, logs, Remote-MTA)
        self.host = host
        self.reactor = reactor
        self.conn = C.ClientConnection(settings.helo_name, settings.timeouts, lmtp=settings.lmtp)
        self.ready: defer.Deferred = defer.Deferred()
        self.peer = host
        self.messages = 0
        self.created = reactor.seconds()
        self._ready_fired = False
        self._pending: defer.Deferred | None = None
        self._message: SpooledMessage | None = None
        self._sender: _ContentSender | None = None
        self._timer: Any = None
        self._timer_key: Any = None
        self._deadline: float | None = None
        self._close_timer: Any = None
        #: where this connection is with TLS
        self.tls = TLSStage.PLAINTEXT
        self._close_callbacks: list[Callable[["ClientSession"], None]] = []
        self.connected = False
        self._driving = False

    # -- properties ------------------------------------------------------------
    @property
    def extensions(self) -> dict[str, str]:
        return self.conn.extensions

    @property
    def usable(self) -> bool:
        """Connected, set up, and idle: a transaction may start."""
        return (self.connected and self._ready_fired and self._pending is None
                and self.conn.state is C.State.READY)

    def on_close(self, callback: Callable[["ClientSession"], None]) -> None:
        self._close_callbacks.append(callback)

    # -- Protocol ----------------------------------------------------------------
    def connectionMade(self) -> None:
        self.connected = True
        peer = self.transport.getPeer()
        if hasattr(peer, "host"):
            self.peer = f"{self.host}[{peer.host}]:{peer.port}"
        # else a UNIX socket (LMTP): its path is the host
        self._rearm()

    def dataReceived(self, data: bytes) -> None:
        self.conn.receive_data(data)
        self._drive()

    def connectionLost(self, reason: Any = None) -> None:
        self.connected = False
        text = reason.getErrorMessage() if reason is not None else "connection lost"
        if self.tls is TLSStage.HANDSHAKING:
            text = f"TLS handshake failed: {text}"
        if self._sender is not None:
            self._sender.stopProducing()
        self.conn.connection_lost(f"lost connection ({text})")
        self._drive()
        self._cancel_timer()
        if self._close_timer is not None and self._close_timer.active():
            self._close_timer.cancel()
        if not self._ready_fired:
            self._fail(SessionError(f"lost connection with {self.peer}: {text}", enhanced="4.4.2",
                                    tls_failed=self.tls is TLSStage.HANDSHAKING))
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            callback(self)

    # -- the caller's side ----------------------------------------------------------
    def send(self, transaction: C.MailTransaction, message: SpooledMessage) -> defer.Deferred:
        """Run one transaction sending ``message``; fires with TransactionDone."""
        if not self.usable:
            raise C.ClientError(f"session to {self.peer} cannot start a transaction now "
                                f"(state {self.conn.state.value})")
        self.messages += 1
        self._pending = defer.Deferred()
        self._message = message
        pending = self._pending
        self.conn.start_transaction(transaction)
        self._drive()
        return pending

    def quit(self) -> None:
        """Close politely (QUIT when idle); never waits long for the server."""
        if self.conn.state is C.State.READY:
            self.conn.quit()
            self._drive()
        elif not self.conn.closed:
            self.abort("closed by the client")

    def abort(self, reason: str) -> None:
        self.conn.connection_lost(reason)
        self._drive()
        if self.transport is not None and self.connected:
            self.transport.abortConnection()

    # -- driving the machine --------------------------------------------------------
    def _drive(self) -> None:
        if self._driving:
            return
        self._driving = True
        try:
            while True:
                event = self.conn.next_event()
                if event is E.NEED_DATA or event is E.CLOSED:
                    break
                handler = _HANDLERS.get(type(event))
                if handler is not None:
                    handler(self, event)
        finally:
            self._driving = False
        self._flush()
        if self.conn.closed:
            self._close()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.connected:
            self.transport.write(data)
        self._rearm()

    def _close(self) -> None:
        self._cancel_timer()
        if self.connected and self._close_timer is None:
            self.transport.loseConnection()
            # a server that does not read cannot keep us waiting
            self._close_timer = self.reactor.callLater(self.settings.timeouts.quit,
                                                       self._force_close)

    def _force_close(self) -> None:
        if self.connected:
            self.transport.abortConnection()

    def _rearm(self) -> None:
        """Apply the machine's timeout to what it waits for now.

        Progress only moves a deadline; one timer per session checks it
        when it fires (timeouts are minutes, progress is microseconds), so
        no timer is cancelled and created per command.
        """
        timeout = self.conn.timeout if not self.conn.closed else None
        key = (self.conn.progress, timeout)
        if key == self._timer_key:
            return
        self._timer_key = key
        if timeout is None or not self.connected:
            self._deadline = None
            return
        deadline = self.reactor.seconds() + timeout
        self._deadline = deadline
        timer = self._timer
        if timer is None or not timer.active():
            self._timer = self.reactor.callLater(timeout, self._timer_fired)
        elif timer.getTime() > deadline:
            timer.reset(timeout)

    def _timer_fired(self) -> None:
        self._timer = None
        if self._deadline is None or not self.connected:
            return
        left = self._deadline - self.reactor.seconds()
        if left > 0:
            self._timer = self.reactor.callLater(left, self._timer_fired)
            return
        self._timed_out()

    def _cancel_timer(self) -> None:
        self._deadline = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._deadline = None
        log.info("{peer}: timeout {situation}", peer=self.peer, situation=self.conn.situation)
        if self._sender is not None:
            self._sender.stopProducing()
        self.conn.timed_out()
        self._drive()
        if self.connected:
            self.transport.abortConnection()

    def _succeed(self) -> None:
        if not self._ready_fired:
            self._ready_fired = True
            self.ready.callback(self)

    def _fail(self, error: SessionError) -> None:
        if not self._ready_fired:
            self._ready_fired = True
            self.ready.errback(error)
        if not self.conn.closed:
            if self.conn.state is C.State.READY:
                self.conn.quit()
            else:
                self.conn.connection_lost(error.text)

    # -- events -------------------------------------------------------------------
    def _on_ready(self, event: C.Ready) -> None:
        settings = self.settings
        if event.tls:
            self.tls = TLSStage.ENCRYPTED
            # as Postfix's smtp(8) logs it: the protocol and cipher of each outbound TLS session
            log.info("{peer}: TLS connection established: {tls}", peer=self.peer,
                     tls=tls_description.as_text(tls_description.describe(self.transport.getHandle())))
        if not event.tls and settings.tls.wanted and self.tls is not TLSStage.DECLINED:
            if "STARTTLS" in event.extensions:
                self.conn.start_tls()
                return
            if settings.tls.required:
                self._fail(SessionError(f"TLS is required, but was not offered by host {self.peer}",
                                        enhanced="4.7.4"))
                return
        auth = settings.auth
        if auth is not None and not self.conn.authenticated and "AUTH" in event.extensions:
            if not event.tls and not auth.allow_plaintext:
                self._fail(SessionError(f"not sending credentials to {self.peer} without TLS "
                                        "(set auth_without_tls = true to allow it)", enhanced="4.7.0"))
                return
            offered = event.extensions["AUTH"].upper().split()
            mechanism = "PLAIN" if "PLAIN" in offered else "LOGIN" if "LOGIN" in offered else None
            if mechanism is None:
                self._fail(SessionError(f"host {self.peer} offers no SASL mechanism we support "
                                        f"(PLAIN, LOGIN): {event.extensions['AUTH']}",
                                        enhanced="4.7.0"))
                return
            self.conn.authenticate(mechanism, auth.username, auth.password)
            return
        self._succeed()

    def _on_tls_granted(self, event: C.TLSGranted) -> None:
        self.tls = TLSStage.HANDSHAKING
        self.transport.startTLS(self.settings.tls.connection_creator(self.host))
        self.conn.tls_started()

    def _on_tls_refused(self, event: C.TLSRefused) -> None:
        if self.settings.tls.required:
            self._fail(SessionError(f"host {self.peer} refused STARTTLS: {event.reply.summary()}",
                                    event.reply, enhanced="4.7.4"))
            return
        self.tls = TLSStage.DECLINED
        self._on_ready(C.Ready(self.conn.esmtp, dict(self.conn.extensions), False))

    def _on_authenticated(self, event: C.Authenticated) -> None:
        self._succeed()

    def _on_auth_rejected(self, event: C.AuthRejected) -> None:
        self._fail(SessionError(f"SASL authentication failed with {self.peer}: "
                                f"{event.reply.summary()}", event.reply, enhanced="4.7.8"))

    def _on_session_failed(self, event: C.SessionFailed) -> None:
        if self.tls is TLSStage.HANDSHAKING:
            error = SessionError(f"TLS with {self.peer} failed: {event.reason}", event.reply,
                                 enhanced="4.7.5", tls_failed=True)
        elif event.reply is not None:
            verb = "refused to talk to me" if event.stage == "greeting" else f"refused {event.stage}"
            error = SessionError(f"host {self.peer} {verb}: {event.reply.summary()}", event.reply,
                                 enhanced="4.4.0" if event.stage == "greeting" else "4.5.0")
        else:
            error = SessionError(f"conversation with {self.peer}: {event.reason}", enhanced="4.4.2")
        self._fail(error)

    def _on_body_wanted(self, event: C.BodyWanted) -> None:
        message = self._message
        prepend = message.prepend_bytes()
        if len(prepend) + message.envelope.size <= CHUNK:
            # small: all of it at once, no producer needed
            try:
                with _open_body(message) as fp:
                    body = fp.read(CHUNK + 1)
                self.conn.send_body(prepend)
                self.conn.send_body(body)
                self.conn.end_body()
            except (OSError, C.ClientError) as e:
                log.error("{peer}: cannot send message content: {error}", peer=self.peer, error=e)
                self.abort(f"cannot read the message from the spool: {e}")
            return
        self._sender = _ContentSender(self, message)
        self._sender.start()

    def _on_transaction_done(self, event: C.TransactionDone) -> None:
        if self._sender is not None:
            self._sender.stopProducing()
            self._sender = None
        pending, self._pending = self._pending, None
        self._message = None
        if pending is not None:
            pending.callback(event)

    def _on_closed(self, event: C.Closed) -> None:
        if not self._ready_fired:
            self._fail(SessionError(f"conversation with {self.peer}: {event.reason}", enhanced="4.4.2"))


_HANDLERS: dict[type, Callable[[ClientSession, Any], None]] = {
    C.Ready: ClientSession._on_ready,
    C.TLSGranted: ClientSession._on_tls_granted,
    C.TLSRefused: ClientSession._on_tls_refused,
    C.Authenticated: ClientSession._on_authenticated,
    C.AuthRejected: ClientSession._on_auth_rejected,
    C.SessionFailed: ClientSession._on_session_failed,
    C.BodyWanted: ClientSession._on_body_wanted,
    C.TransactionDone: ClientSession._on_transaction_done,
    C.Closed: ClientSession._on_closed,
}


class SessionFactory(Factory):
    """Builds the one ClientSession an endpoint connection attempt is for."""

    noisy = False

    def __init__(self, make: Callable[[], ClientSession]) -> None:
        self._make = make

    def buildProtocol(self, addr: Any) -> ClientSession:
        return self._make()
