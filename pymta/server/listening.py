"""The listening sockets, kept across configuration reloads.

Each ``[[listeners]]`` endpoint is one :class:`ListenerService` whose
factory, a :class:`ListenerEntrance`, stays with the socket for its whole
life: it hands every new connection to the configuration in force when the
connection arrives (the current :class:`pymta.server.generation.ServerGeneration`),
so a reload (SIGHUP) changes what new sessions get without closing the
socket, and the sessions already open keep the factory, and with it the
configuration, they started with.

:class:`ListenerSockets` is the set of them, keyed by endpoint string: at
a reload an endpoint that is still configured keeps its socket (its
listener's name and settings may change), a removed one stops listening
(its sessions go on), and a new one is bound, after the removed ones are
closed so that a changed address can take the same port.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from pymta.config.model import Listener
from pymta.server.proxy import ProxyHeaderFactory

log = Logger(namespace="pymta")

DEFAULT_BACKLOG = 1024   # Twisted's 50 drops connections in bursts (measured with smtp-source)


def with_backlog(endpoint: str) -> str:
    """A tcp/tcp6 endpoint string with a listen backlog, unless it names one."""
    kind = endpoint.split(":", 1)[0].strip().lower()
    if kind in ("tcp", "tcp6") and "backlog=" not in endpoint:
        return f"{endpoint}:backlog={DEFAULT_BACKLOG}"
    return endpoint


class ListenerService(StreamServerEndpointService):
    """A listening endpoint whose failure to bind stops start-up with one clear line."""

    _raiseSynchronously = True

    def __init__(self, listener, endpoint, factory, after=None) -> None:
        super().__init__(endpoint, factory)
        self.listener = listener
        self.setName(f"listener:{listener.name}")
        #: on stop, keep listening until this Deferred-returning call fires
        #: (the sessions' drain: new connections meanwhile get 421)
        self._after = after

    def stopService(self):
        if self._after is None:
            return super().stopService()
        return self._after().addCallback(lambda _: super(ListenerService, self).stopService())

    def privilegedStartService(self) -> None:
        if self._waitingForPort is not None:      # bound already (added during a reload)
            return
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            sys.__stderr__.write(f"pymta: cannot listen: listeners {self.listener.name!r} "
                                 f"({self.listener.endpoint}): {e.socketError}\n")
            raise SystemExit(1)

    def listen_now(self) -> None:
        """Bind at once (a listener added by a reload); raises CannotListenError."""
        StreamServerEndpointService.privilegedStartService(self)


class _CurrentSessionFactory:
    """What a PROXY header hands its connection to: the configuration in force then."""

    def __init__(self, entrance: "ListenerEntrance") -> None:
        self.entrance = entrance

    def buildProtocol(self, addr):
        factory = self.entrance.session_factory()
        return factory.buildProtocol(addr) if factory is not None else None

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


class ListenerEntrance(Factory):
    """A socket's factory: each new connection goes to the configuration in force.

    ``sockets.generation`` is that configuration; its factory for this
    listener (by name) builds the session, which keeps it to the end.  On
    a ``proxy_protocol`` listener the PROXY header is read first, and the
    configuration in force when it has arrived builds the session.
    """

    noisy = False

    def __init__(self, sockets: "ListenerSockets", listener: Listener) -> None:
        self.sockets = sockets
        self.listener = listener
        self._proxy: ProxyHeaderFactory | None = None
        self.retarget(listener)

    def retarget(self, listener: Listener) -> None:
        """This socket's listener from now on (a reload kept its endpoint)."""
        self.listener = listener
        self._proxy = (ProxyHeaderFactory(_CurrentSessionFactory(self), listener, self.sockets.reactor)
                       if listener.proxy_protocol else None)

    def session_factory(self):
        return self.sockets.generation.factory_for(self.listener.name)

    def logPrefix(self) -> str:
        """Twisted's "... starting on PORT" line names the listener."""
        return f"pymta listener {self.listener.name}"

    def buildProtocol(self, addr):
        if self._proxy is not None:
            return self._proxy.buildProtocol(addr)
        factory = self.session_factory()
        return factory.buildProtocol(addr) if factory is not None else None


class ListenerSockets:
    """The listening sockets of the server, by endpoint, and the configuration they serve.

    ``generation`` is the :class:`pymta.server.generation.ServerGeneration`
    whose factories build new sessions; a reload replaces it
    (:meth:`switch`).  ``after`` is called when a listener stops at server
    stop (the sessions' drain, see :class:`ListenerService`).
    """

    def __init__(self, parent: MultiService, reactor: Any, generation: Any, after=None) -> None:
        self.parent = parent
        self.reactor = reactor
        self.generation = generation
        self._after = after
        #: endpoint string (with its backlog) -> its service
        self.services: dict[str, ListenerService] = {}

    def _service(self, listener: Listener) -> ListenerService:
        key = with_backlog(listener.endpoint)
        endpoint = serverFromString(self.reactor, key)
        service = ListenerService(listener, endpoint, ListenerEntrance(self, listener), after=self._after)
        self.services[key] = service
        return service

    def add_at_start(self, listeners: tuple[Listener, ...]) -> None:
        """The listeners of the first configuration (bound by twistd, before a privilege drop)."""
        for listener in listeners:
            self._service(listener).setServiceParent(self.parent)

    def switch(self, generation: Any) -> defer.Deferred:
        """Serve ``generation`` from now on, with its listeners.

        Fires with a list of problems (one line each: a new listener that
        could not be bound); every other change is made.
        """
        self.generation = generation
        wanted = {with_backlog(listener.endpoint): listener for listener in generation.config.listeners}
        stopping = []
        for key in [key for key in self.services if key not in wanted]:
            service = self.services.pop(key)
            log.info("reload: listener {name} ({endpoint}) removed: no longer listening; "
                     "its sessions finish", name=service.listener.name, endpoint=service.listener.endpoint)
            service._after = None                   # no drain: only this socket closes
            stopping.append(defer.maybeDeferred(service.disownServiceParent))
        self._retarget({service: wanted[key] for key, service in self.services.items()})
        done = defer.gatherResults(stopping, consumeErrors=True)
        done.addErrback(lambda f: log.failure("reload: stopping a removed listener failed", f))
        return done.addCallback(lambda _: self._bind_new(
            [listener for key, listener in wanted.items() if key not in self.services]))

    def _bind_new(self, listeners: list[Listener]) -> list[str]:
        problems = []
        for listener in listeners:
            service = self._service(listener)
            try:
                service.listen_now()
            except Exception as e:
                del self.services[with_backlog(listener.endpoint)]
                error = e.socketError if isinstance(e, CannotListenError) else f"{type(e).__name__}: {e}"
                problem = f"cannot listen: listeners {listener.name!r} ({listener.endpoint}): {error}"
                if getattr(error, "errno", None) == errno.EACCES and os.geteuid() != 0:
                    problem += " (a port below 1024 needs the privileges pymta gave up at start; restart it)"
                problems.append(problem)
                continue
            service.setServiceParent(self.parent)
            log.info("reload: listener {name} ({endpoint}) added", name=listener.name,
                     endpoint=listener.endpoint)
        return problems

    def _retarget(self, kept: dict[ListenerService, Listener]) -> None:
        """The sockets that stay get their (maybe renamed or changed) listeners."""
        named = self.parent.namedServices       # a MultiService names its children once:
        for service in kept:                    # rename them in place, all at once (swaps)
            named.pop(service.name, None)
        for service, listener in kept.items():
            service.listener = listener
            service.factory.retarget(listener)
            service.name = f"listener:{listener.name}"
            named[service.name] = service
