"""Opening a session to a next hop: each host in turn until one is ready.

For every host of a :class:`~pymta.relay.routing.NextHop` (MX hosts in
order, or the smarthost), :class:`SessionOpener` connects with
``HostnameEndpoint`` (IPv6 and IPv4 addresses from the shared resolver,
raced as RFC 8305 says) and waits until the session is set up.  A refused
or timed-out connection, a host without addresses, a 4xx or 5xx greeting, a
refused EHLO, a required TLS that fails and a failed AUTH all mean: try the
next host.  With opportunistic TLS (``may``) a failed handshake is retried
once on the same host in plaintext, as Postfix does.  When no host works
the result is a temporary failure naming what went wrong.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet import defer, error
from twisted.internet.endpoints import HostnameEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from pymta.delivery.result import DeliveryResult
from pymta.relay.hostnames import DNSHostnameResolver, resolving_reactor
from pymta.relay.protocol import ClientSession, SessionError, SessionFactory, SessionSettings
from pymta.relay.routing import NextHop
from pymta.relay.tls import TLSPolicy

log = Logger()

#: how many host errors a "no host worked" text lists
_ERRORS_SHOWN = 3


class HopFailure(Exception):
    """No host of a next hop could be used; ``result`` is for every recipient waiting for it."""

    def __init__(self, result: DeliveryResult) -> None:
        super().__init__(result.summary())
        self.result = result


def _connect_problem(failure: Any, host: str, port: int, names: DNSHostnameResolver) -> str:
    where = f"connect to {host}:{port}"
    if failure.check(error.DNSLookupError):
        problem = names.problems.get(host, "no A or AAAA record")
        return f"{where}: host not found ({problem})"
    if failure.check(error.ConnectionRefusedError):
        return f"{where}: Connection refused"
    if failure.check(error.TimeoutError, defer.TimeoutError):
        return f"{where}: Connection timed out"
    if failure.check(error.NoRouteError):
        return f"{where}: No route to host"
    return f"{where}: {failure.getErrorMessage()}"


def failure_result(errors: list[SessionError]) -> DeliveryResult:
    """The temporary failure reported when every host failed."""
    last = errors[-1]
    shown = [e.text for e in errors[-_ERRORS_SHOWN:]]
    if len(errors) > _ERRORS_SHOWN:
        shown.insert(0, f"({len(errors) - _ERRORS_SHOWN} more)")
    code, enhanced = 451, last.enhanced
    if last.reply is not None and last.reply.temporary:
        code = last.reply.code
        enhanced = last.reply.enhanced or enhanced
    return DeliveryResult.deferred("; ".join(shown), code, "4" + enhanced[1:])


class SessionOpener:
    """Connects to the hosts of a next hop, in order, until one session is ready."""

    def __init__(self, reactor: Any, resolver: Any) -> None:
        self.reactor = reactor
        self.names = DNSHostnameResolver(resolver)
        self._endpoint_reactor = resolving_reactor(reactor, self.names)

    @defer.inlineCallbacks
    def open(self, hop: NextHop, settings: SessionSettings):
        errors: list[SessionError] = []
        for host, port in hop.hosts:
            attempt_settings = settings
            while True:
                try:
                    session = yield self._connect(host, port, attempt_settings)
                    return session
                except SessionError as e:
                    log.info("{destination}: {problem}", destination=hop.destination, problem=e.text)
                    errors.append(e)
                    if e.tls_failed and attempt_settings.tls.level == "may":
                        attempt_settings = dataclasses.replace(settings, tls=TLSPolicy("none"))
                        continue
                    break
        if not errors:
            errors.append(SessionError(f"no host to connect to for {hop.destination}"))
        raise HopFailure(failure_result(errors))

    @defer.inlineCallbacks
    def _connect(self, host: str, port: int, settings: SessionSettings):
        endpoint = HostnameEndpoint(self._endpoint_reactor, host, port,
                                    timeout=settings.timeouts.connect)
        factory = SessionFactory(lambda: ClientSession(settings, host, self.reactor))
        try:
            session = yield endpoint.connect(factory)
        except Exception:
            raise SessionError(_connect_problem(Failure(), host, port, self.names),
                               enhanced="4.4.1") from None
        session = yield session.ready
        return session
