"""The ``dovecot`` credentials checker: SMTP AUTH passwords checked by Dovecot.

As Postfix's ``smtpd_sasl_type = dovecot``: users and passwords stay in
Dovecot (any passdb it has: passwd-file, SQL, LDAP, PAM), and pymta asks
its ``auth-client`` UNIX socket, speaking Dovecot's authentication protocol
(:mod:`pymta.auth.dovecot_protocol`), asynchronously on the reactor.

Options::

    socket = "/run/dovecot/auth-client"   # the default; relative: to the config directory
    service = "smtp"                      # the service name Dovecot's passdb sees (%s)
    timeout = "30s"                       # an answer from Dovecot within this, or 454
    penalty = true                        # false: no Dovecot auth penalty (pymta's own
                                          # [limits] auth_failure_delay still applies)

Each login is one ``AUTH`` with ``service=smtp``, the client's and our
address (``rip``/``rport``, ``lip``/``lport``) and ``secured`` when the
session is encrypted (Dovecot refuses plaintext mechanisms on unsecured
sessions unless ``disable_plaintext_auth = no``).  The user name and
password go as ``PLAIN`` whichever mechanism the client used (``LOGIN``
when Dovecot offers only that).  Dovecot's answer decides: ``OK`` is a
login (as the user Dovecot names), ``OK`` with ``nologin`` (the passdb's
``nologin`` field) and ``FAIL`` are a failed login (its ``reason`` is
logged), ``FAIL`` with ``temp`` is a temporary failure (``454 4.7.0``).
Failed logins are delayed by Dovecot's auth penalty (per client address,
shared with IMAP and POP3) on top of pymta's ``[limits] auth_failure_delay``
unless ``penalty = false``.

The connection is opened at start-up and kept; when it is lost (Dovecot
restarted or stopped) the next login opens it again, and while Dovecot
cannot be reached every login gets ``454 4.7.0``.  pymta offers the
mechanisms of its own (PLAIN, LOGIN) that Dovecot offers: Dovecot's MECH
list is read at each handshake.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from pymta.auth.credentials import TemporaryAuthFailure
from pymta.auth.dovecot_protocol import (AuthClientConnection, AuthProtocolError, AuthRequest,
                                         Continue, Handshake, Result, plain_response)
from pymta.plugin_api import Options

log = Logger()

DEFAULT_SOCKET = "/run/dovecot/auth-client"
#: the mechanisms pymta's SMTP server offers, and so may pass on
SUPPORTED = ("PLAIN", "LOGIN")


@dataclass
class _Pending:
    done: defer.Deferred
    #: what to send for each CONT (LOGIN: the user name, then the password)
    steps: list = field(default_factory=list)
    timer: Any = None


class _AuthProtocol(Protocol):
    """One connection to the auth-client socket."""

    def __init__(self, checker: "DovecotAuthChecker") -> None:
        self.checker = checker
        self.conn = AuthClientConnection(os.getpid())
        self.ready: defer.Deferred = defer.Deferred()
        self.pending: dict[int, _Pending] = {}
        self.lost = False

    def connectionMade(self) -> None:
        self.transport.write(self.conn.data_to_send())

    def dataReceived(self, data: bytes) -> None:
        try:
            self.conn.receive_data(data)
            while (event := self.conn.next_event()) is not None:
                self._event(event)
        except AuthProtocolError as e:
            log.error("dovecot auth {socket}: {problem}; closing the connection",
                      socket=self.checker.socket, problem=e)
            self.transport.abortConnection()
            return
        out = self.conn.data_to_send()
        if out:
            self.transport.write(out)

    def _event(self, event: Any) -> None:
        if isinstance(event, Handshake):
            self.checker.handshake_done(event)
            if not self.ready.called:
                self.ready.callback(self)
            return
        pending = self.pending.get(event.request_id)
        if pending is None:
            return          # an answer to a request that timed out meanwhile
        if isinstance(event, Continue):
            if pending.steps:
                self.conn.respond(event.request_id, pending.steps.pop(0))
            else:
                self._settle(event.request_id, AuthProtocolError(
                    "more steps asked than the mechanism has"))
            return
        self._settle(event.request_id, event)

    def authenticate(self, request: AuthRequest, steps: list[bytes],
                     timeout: float) -> defer.Deferred:
        request_id = next(self.checker.ids)
        pending = _Pending(defer.Deferred(), steps)
        pending.timer = self.checker.reactor.callLater(
            timeout, self._settle, request_id,
            TemporaryAuthFailure(f"no answer from Dovecot ({self.checker.socket}) "
                                 f"within {timeout:g}s"))
        self.pending[request_id] = pending
        self.conn.request(request_id, request)
        self.transport.write(self.conn.data_to_send())
        return pending.done

    def _settle(self, request_id: int, outcome: Any) -> None:
        pending = self.pending.pop(request_id, None)
        if pending is None:
            return
        if pending.timer is not None and pending.timer.active():
            pending.timer.cancel()
        if isinstance(outcome, Exception):
            pending.done.errback(outcome)
        else:
            pending.done.callback(outcome)

    def handshake_timed_out(self, timeout: float) -> None:
        if self.ready.called:
            return
        problem = f"no handshake from Dovecot ({self.checker.socket}) within {timeout:g}s"
        log.warn("dovecot auth: {problem}; closing the connection", problem=problem)
        self.ready.errback(TemporaryAuthFailure(problem))
        self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        self.checker.connection_lost(self)
        problem = TemporaryAuthFailure(f"lost the connection to Dovecot ({self.checker.socket})")
        if not self.ready.called:
            self.ready.errback(problem)
        for request_id in list(self.pending):
            self._settle(request_id, problem)


@implementer(ICredentialsChecker)
class DovecotAuthChecker:
    """twisted.cred checker asking Dovecot's auth-client socket; see the module docstring."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, options: dict[str, Any], context: Any) -> None:
        opts = Options(options)
        self.socket = opts.path("socket", context, DEFAULT_SOCKET)
        self.service = opts.str("service", "smtp")
        self.timeout = opts.duration("timeout", 30.0, above=0)
        self.penalty = opts.bool("penalty", True)
        opts.finish()
        self.reactor = getattr(context, "reactor", None)
        if self.reactor is None:
            from twisted.internet import reactor
            self.reactor = reactor
        self.ids = itertools.count(1)
        #: Dovecot's mechanisms (upper case) from the last handshake; None before one
        self.offered: tuple[str, ...] | None = None
        self._protocol: _AuthProtocol | None = None
        #: logins waiting for the connection being opened
        self._waiting: list[defer.Deferred] = []
        self._down_logged = False
        # learn the MECH list early (a failure here is logged; logins try again)
        self.reactor.callWhenRunning(self._warm_up)

    # -- what the server asks -------------------------------------------------------
    def sasl_mechanisms(self) -> tuple[str, ...] | None:
        """The mechanisms to offer: pymta's that Dovecot offers (None: not known yet)."""
        if self.offered is None:
            return None
        return tuple(m for m in SUPPORTED if m in self.offered)

    def requestAvatarId(self, credentials: Any) -> defer.Deferred:
        d = self._connection()
        d.addCallback(self._authenticate, credentials)
        d.addCallback(self._decide, credentials)
        return d

    # -- the connection ---------------------------------------------------------------
    def _warm_up(self) -> None:
        self._connection().addErrback(lambda f: None)   # logged once by _connect

    def _connection(self) -> defer.Deferred:
        protocol = self._protocol
        if protocol is not None and not protocol.lost and protocol.ready.called:
            return defer.succeed(protocol)
        waiter: defer.Deferred = defer.Deferred()
        self._waiting.append(waiter)
        if len(self._waiting) == 1:
            self._connect().addBoth(self._connected)
        return waiter

    def _connected(self, outcome: Any) -> None:
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)

    @defer.inlineCallbacks
    def _connect(self):
        endpoint = UNIXClientEndpoint(self.reactor, self.socket, timeout=self.timeout)
        try:
            protocol = yield endpoint.connect(_OneProtocol(self))
        except Exception as e:
            problem = f"cannot connect to Dovecot's auth socket {self.socket}: {_why(e)}"
            if not self._down_logged:
                self._down_logged = True
                log.warn("dovecot auth: {problem}; SMTP AUTH answers 454 until it is back",
                         problem=problem)
            raise TemporaryAuthFailure(problem) from None
        # a server that accepts but never finishes its handshake (hung, or not
        # Dovecot's auth-client socket) must not keep every later login waiting
        timer = self.reactor.callLater(self.timeout, protocol.handshake_timed_out, self.timeout)
        try:
            protocol = yield protocol.ready
        finally:
            if timer.active():
                timer.cancel()
        if self._down_logged:
            log.info("dovecot auth: connected to {socket} again", socket=self.socket)
        self._down_logged = False
        self._protocol = protocol
        return protocol

    def handshake_done(self, handshake: Handshake) -> None:
        self.offered = tuple(handshake.mechanisms)

    def connection_lost(self, protocol: _AuthProtocol) -> None:
        if self._protocol is protocol:
            self._protocol = None

    # -- one login ----------------------------------------------------------------------
    def _authenticate(self, protocol: _AuthProtocol, credentials: Any) -> defer.Deferred:
        username = _text(credentials.username)
        password = _text(credentials.password)
        offered = self.offered or ()
        if "PLAIN" in offered or "LOGIN" not in offered:
            mechanism, initial, steps = "PLAIN", plain_response(username, password), []
        else:
            mechanism, initial = "LOGIN", None
            steps = [username.encode("utf-8"), password.encode("utf-8")]
        request = AuthRequest(
            mechanism, initial, service=getattr(credentials, "service", None) or self.service,
            local_ip=getattr(credentials, "local_ip", ""),
            local_port=getattr(credentials, "local_port", 0),
            remote_ip=getattr(credentials, "client_ip", ""),
            remote_port=getattr(credentials, "client_port", 0),
            secured=bool(getattr(credentials, "tls", False)), no_penalty=not self.penalty)
        return protocol.authenticate(request, steps, self.timeout)

    def _decide(self, result: Result, credentials: Any) -> str:
        username = _text(credentials.username)
        if result.ok and not result.nologin:
            return result.user or username
        why = result.reason or ("login not allowed" if result.nologin else "authentication failed")
        if result.temporary:
            raise TemporaryAuthFailure(f"Dovecot could not check the password of {username}: {why}")
        if result.reason or result.nologin:
            log.info("dovecot auth: {user}: {why}", user=username, why=why)
        raise UnauthorizedLogin(why)


class _OneProtocol(Factory):
    """Builds the protocol of one connection attempt."""

    noisy = False

    def __init__(self, checker: DovecotAuthChecker) -> None:
        self.checker = checker

    def buildProtocol(self, addr: Any) -> _AuthProtocol:
        return _AuthProtocol(self.checker)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _why(error: Exception) -> str:
    text = str(error)
    return text.split(": ", 1)[-1] if ": " in text else text or type(error).__name__
