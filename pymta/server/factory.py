"""Listener factory: shared server context, connection limits, orderly shutdown."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from pymta.config.model import Config, Listener
from pymta.server.policy import SessionPolicy
from pymta.server.protocol import SMTPServerProtocol
from pymta.smtp.replies import Reply
from pymta.smtp.server import Features

log = Logger(namespace="pymta.smtpd")


@dataclass
class ServerContext:
    """What every session of every listener shares."""
    config: Config
    policy: SessionPolicy
    spool: Any          # pymta.spool.store.Spool
    scheduler: Any      # pymta.spool.scheduler.DeliveryScheduler
    reactor: Any
    tls: Any = None             # pymta.server.tls.ServerTLS when [tls] is configured
    portal: Any = None          # twisted.cred Portal when [stages] auth has checkers
    auth_failures: Any = None   # pymta.server.auth.AuthFailureDelay
    client_names: Any = None    # pymta.dns.reverse.ClientNames ([dns] reverse_lookup), or None


class _Refusal(Protocol):
    """Says one 421 line and hangs up (connection limits)."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def connectionMade(self) -> None:
        self.transport.write(self.reply.render())
        self.transport.loseConnection()


class ConnectionCounter:
    """Connections open over all listeners, overall and per client address."""

    def __init__(self) -> None:
        self.total = 0
        self.per_ip: Counter[str] = Counter()
        self.sessions: set[SMTPServerProtocol] = set()


class SMTPServerFactory(Factory):
    protocol = SMTPServerProtocol
    noisy = False

    def __init__(self, context: ServerContext, listener: Listener, counter: ConnectionCounter) -> None:
        self.context = context
        self.listener = listener
        self.counter = counter
        #: what every session of this listener offers (shared, immutable)
        self.features = Features(
            starttls=listener.starttls and context.tls is not None,
            tls_active=listener.implicit_tls,
            auth_mechanisms=("PLAIN", "LOGIN") if listener.auth and context.portal is not None else (),
            auth_plaintext=listener.auth_plaintext,
            require_tls=listener.require_tls, require_auth=listener.require_auth,
            etrn=True)

    def buildProtocol(self, addr):
        # ``addr`` is the client: the socket's peer, or on a proxy_protocol listener
        # the address from the PROXY header (pymta.server.proxy).  It is the one
        # source of the session's address: counted here, given to the session.
        limits = self.context.config.limits
        ip = getattr(addr, "host", "")
        hostname = self.context.config.hostname
        if self.counter.total >= limits.max_connections:
            log.warn("too many connections: refusing {ip} ({total} open)", ip=ip, total=self.counter.total)
            return _Refusal(Reply(421, "4.7.0", f"{hostname} Error: too many connections; try again later"))
        if self.counter.per_ip[ip] >= limits.max_connections_per_ip:
            log.warn("too many connections from {ip}: refusing ({n} open)", ip=ip, n=self.counter.per_ip[ip])
            return _Refusal(Reply(421, "4.7.0", f"{hostname} Error: too many connections from {ip}"))
        proto = super().buildProtocol(addr)
        self.counter.total += 1
        self.counter.per_ip[ip] += 1
        self.counter.sessions.add(proto)
        proto._counted_ip = ip
        proto.client_address = addr
        return proto

    def connection_closed(self, proto: SMTPServerProtocol) -> None:
        if proto in self.counter.sessions:
            self.counter.sessions.discard(proto)
            self.counter.total -= 1
            ip = proto._counted_ip
            self.counter.per_ip[ip] -= 1
            if self.counter.per_ip[ip] <= 0:
                del self.counter.per_ip[ip]


class SessionShutdown(Service):
    """On stop, idle sessions get 421 before the reactor drops them."""

    def __init__(self, counter: ConnectionCounter) -> None:
        self.counter = counter

    def stopService(self):
        for proto in list(self.counter.sessions):
            proto.shutdown()
        return super().stopService()
