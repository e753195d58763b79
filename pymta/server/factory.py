"""Listener factory: shared server context, connection limits, orderly shutdown."""

from __future__ import annotations

import signal
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from pymta.config.model import Config, Listener
from pymta.server.policy import SessionPolicy
from pymta.server.protocol import SMTPServerProtocol
from pymta.smtp.replies import SHUTDOWN, Reply
from pymta.smtp.server import Features, ProtocolLimits

log = Logger(namespace="pymta.smtpd")

#: the SASL mechanisms pymta's server speaks
AUTH_MECHANISMS = ("PLAIN", "LOGIN")


@dataclass
class ServerContext:
    """What every session of every listener shares."""
    config: Config
    policy: SessionPolicy
    spool: Any          # pymta.spool.store.Spool
    scheduler: Any      # pymta.delivery.scheduler.DeliveryScheduler
    reactor: Any
    tls: Any = None             # pymta.server.tls.ServerTLS when [tls] is configured
    portal: Any = None          # twisted.cred Portal when [stages] auth has checkers
    auth_failures: Any = None   # pymta.server.auth.AuthFailureDelay
    client_names: Any = None    # pymta.dns.reverse.ClientNames ([dns] reverse_lookup), or None
    #: the SASL mechanisms to offer now (the checkers may narrow them), or None: all
    auth_mechanisms: Any = None
    #: the events sink (pymta.metrics.instruments.ServerMetrics), or None: metrics are off
    events: Any = None


class _Refusal(Protocol):
    """Says one 421 line and hangs up (connection limits)."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def connectionMade(self) -> None:
        self.transport.write(self.reply.render())
        self.transport.loseConnection()


class ConnectionCounter:
    """Connections open over all listeners, overall and per client address,
    and the sessions' spool commits in flight."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: Counter[str] = Counter()
        self.sessions: set[SMTPServerProtocol] = set()
        self.commits: set[Deferred] = set()
        #: the server is stopping: new connections are refused with 421
        self.draining = False
        #: called when a session closes or a commit lands (set by SessionShutdown)
        self.changed: Callable[[], None] | None = None

    def _notify(self) -> None:
        if self.changed is not None:
            self.changed()


class SMTPServerFactory(Factory):
    protocol = SMTPServerProtocol
    noisy = False

    def __init__(self, context: ServerContext, listener: Listener, counter: ConnectionCounter) -> None:
        self.context = context
        self.listener = listener
        self.counter = counter
        #: (mechanisms, features) last made by session_features()
        self._narrowed: tuple = (None, None)
        #: what every session of this listener offers (shared, immutable)
        self.features = Features(
            starttls=listener.starttls and context.tls is not None,
            tls_active=listener.implicit_tls,
            auth_mechanisms=AUTH_MECHANISMS if listener.auth and context.portal is not None else (),
            auth_plaintext=listener.auth_plaintext,
            require_tls=listener.require_tls, require_auth=listener.require_auth,
            etrn=True)
        #: the protocol limits every session of this listener enforces (shared, immutable)
        limits = context.config.limits
        self.protocol_limits = ProtocolLimits(
            max_message_size=limits.max_message_size, max_recipients=limits.max_recipients,
            max_errors=limits.max_errors, bare_newlines=limits.bare_newlines,
            pregreet_wait=limits.pregreet_wait)

    def session_features(self) -> Features:
        """What a new session offers: the listener's features, with the SASL mechanisms
        the auth checkers can check now (``ServerContext.auth_mechanisms``)."""
        features = self.features
        current = self.context.auth_mechanisms
        if not features.auth_mechanisms or current is None:
            return features
        mechanisms = current()
        if mechanisms == features.auth_mechanisms:
            return features
        if self._narrowed[0] != mechanisms:
            self._narrowed = (mechanisms, replace(features, auth_mechanisms=mechanisms))
        return self._narrowed[1]

    def buildProtocol(self, addr):
        # ``addr`` is the client: the socket's peer, or on a proxy_protocol listener
        # the address from the PROXY header (pymta.server.proxy).  It is the one
        # source of the session's address: counted here, given to the session.
        limits = self.context.config.limits
        ip = getattr(addr, "host", "")
        hostname = self.context.config.hostname
        events = self.context.events
        if events is not None:
            events.connection(self.listener.name)
        if self.counter.draining:
            log.info("stopping: refusing {ip}: service shutting down", ip=ip)
            return self._refuse(SHUTDOWN.from_host(hostname), "shutdown")
        if self.counter.total >= limits.max_connections:
            log.warn("too many connections: refusing {ip} ({total} open)", ip=ip, total=self.counter.total)
            return self._refuse(Reply(421, "4.7.0", f"{hostname} Error: too many connections; "
                                                    "try again later"), "limit")
        if self.counter.per_ip[ip] >= limits.max_connections_per_ip:
            log.warn("too many connections from {ip}: refusing ({n} open)", ip=ip, n=self.counter.per_ip[ip])
            return self._refuse(Reply(421, "4.7.0", f"{hostname} Error: too many connections from {ip}"),
                                "limit")
        proto = super().buildProtocol(addr)
        self.counter.total += 1
        self.counter.per_ip[ip] += 1
        self.counter.sessions.add(proto)
        proto._counted_ip = ip
        proto.client_address = addr
        return proto

    def _refuse(self, reply: Reply, outcome: str) -> _Refusal:
        """A connection refused before its session starts (its one 421, then the close)."""
        events = self.context.events
        if events is not None:
            events.session_ended(self.listener.name, outcome)
        return _Refusal(reply)

    def connection_closed(self, proto: SMTPServerProtocol) -> None:
        if proto in self.counter.sessions:
            self.counter.sessions.discard(proto)
            self.counter.total -= 1
            ip = proto._counted_ip
            self.counter.per_ip[ip] -= 1
            if self.counter.per_ip[ip] <= 0:
                del self.counter.per_ip[ip]
            self.counter._notify()

    def commit_started(self, d: Deferred) -> None:
        """A session's spool commit is in flight: the stop waits for it to land."""
        commits = self.counter.commits
        commits.add(d)

        def landed(result):
            commits.discard(d)
            self.counter._notify()
            return result

        d.addBoth(landed)


class SessionShutdown(Service):
    """The graceful stop of the SMTP sessions (SIGTERM, as Postfix does).

    On stop: new connections get ``421 4.3.2`` (the listeners stay open
    until the drain is over, see :meth:`drained`); idle sessions get 421 and
    are closed at once; a session with a transaction in flight finishes it
    (its 250 or refusal) and is closed then.  At ``timeout`` the sessions
    left get 421 and whatever they half received is discarded; a message
    whose spool commit is already in flight still gets its answer.  A second
    SIGTERM or SIGINT during the drain ends it at once the same way.  The
    stop completes when every session is closed and every commit landed, so
    the disk worker (stopped after all services) still serves those commits.
    """

    #: after the deadline, how long the 421s get to reach clients that do not
    #: read before their connections are aborted
    ABORT_AFTER = 5.0

    def __init__(self, counter: ConnectionCounter, reactor, timeout: float = 30.0) -> None:
        self.counter = counter
        self.reactor = reactor
        self.timeout = timeout
        self._waiters: list[Deferred] = []
        self._finished = False
        self._calls: list = []
        self._previous_handlers: dict = {}
        self._draining_any = False
        self._expired = False

    def drained(self) -> Deferred:
        """Fires once the stop is over: every session closed, every commit landed."""
        d = Deferred()
        if self._finished:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    def startService(self) -> None:
        super().startService()
        self._finished = self._expired = False
        self.counter.draining = False

    def stopService(self):
        super().stopService()
        counter = self.counter
        counter.draining = True
        counter.changed = self._check
        self._draining_any = bool(counter.sessions or counter.commits)
        if counter.sessions:
            log.info("stopping: {n} session(s) open; transactions in flight get up to "
                     "{timeout:g}s to finish", n=len(counter.sessions), timeout=self.timeout)
        for proto in list(counter.sessions):
            proto.drain()
        if not self._check():
            self._calls.append(self.reactor.callLater(self.timeout, self._expire, "shutdown_timeout reached"))
            for number in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[number] = signal.signal(number, self._on_signal)
        return self.drained()

    def _on_signal(self, signum, frame) -> None:
        self.reactor.callFromThread(self._expire, f"signal {signal.Signals(signum).name} again")

    def _expire(self, why: str) -> None:
        if self._finished or self._expired:
            return
        self._expired = True
        log.warn("stopping: {why}: closing {n} session(s) with 421", why=why,
                 n=len(self.counter.sessions))
        for proto in list(self.counter.sessions):
            proto.shutdown()
        if not self._check():
            self._calls.append(self.reactor.callLater(self.ABORT_AFTER, self._abort))

    def _abort(self) -> None:
        for proto in list(self.counter.sessions):
            if not proto._committing:
                proto.transport.abortConnection()
        if not self._check():
            self._calls.append(self.reactor.callLater(self.ABORT_AFTER, self._abort))

    def _check(self) -> bool:
        if self._finished:
            return True
        if self.counter.sessions or self.counter.commits:
            return False
        self._finished = True
        self.counter.changed = None
        if self._draining_any:
            log.info("stopping: every session closed, every commit landed")
        for call in self._calls:
            if call.active():
                call.cancel()
        self._calls.clear()
        for number, previous in self._previous_handlers.items():
            if previous is not None:
                signal.signal(number, previous)
        self._previous_handlers.clear()
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)
        return True
