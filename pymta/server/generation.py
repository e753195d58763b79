"""What one configuration builds for the SMTP sessions: a generation.

The server starts with generation 1; every successful reload (SIGHUP)
builds the next from the new :class:`pymta.config.model.Config` and makes it
current.  A generation holds the session policy (the plugin chains), the
AUTH portal, the TLS certificates, the limits and the factory of each
listener; new connections go to the current generation
(:class:`pymta.server.listening.ListenerEntrance`), and a session keeps the
generation it started with to its end.  What lives longer than one
configuration (the spool, the scheduler, the connection counts, the AUTH
failure delays) is shared by all generations.

A generation that is no longer current is *retired*: :meth:`retire` fires
once its last session has ended; then what its plugins hold is released
(:func:`release_plugins`).
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from pymta.config.model import Config, Listener
from pymta.dns.reverse import ClientNames
from pymta.interfaces import IClosable
from pymta.server.auth import build_portal, offered_mechanisms
from pymta.server.chain import StageDeadline
from pymta.server.factory import AUTH_MECHANISMS, ConnectionCounter, ServerContext, SMTPServerFactory
from pymta.server.policy import SessionPolicy
from pymta.server.protocol import SMTPServerProtocol
from pymta.server.tls import server_tls

log = Logger(namespace="pymta")


def session_context(config: Config, *, reactor: Any, spool: Any, scheduler: Any, auth_failures: Any,
                    policy: SessionPolicy | None = None, events: Any = None) -> ServerContext:
    """What the sessions of ``config`` share: policy, AUTH portal and mechanisms, TLS, client names.

    Also the dry run's (``pymta test-session``), with its own spool, queue and policy.
    ``events``: the metrics' events sink, or None.
    """
    auth = config.stages.get("auth", ())
    policy = policy or SessionPolicy(config, reactor, events=events)
    return ServerContext(
        config=config, policy=policy, spool=spool,
        scheduler=scheduler, reactor=reactor, events=events,
        tls=server_tls(config.tls) if config.tls is not None else None,
        # the auth stage's checkers are told to the policy's stage observer too
        portal=build_portal(auth, StageDeadline(reactor, config.limits.plugin_timeout), policy.observer),
        auth_failures=auth_failures,
        client_names=(ClientNames(config.resolver, config.dns.hosts_file)
                      if config.dns.reverse_lookup else None),
        auth_mechanisms=partial(offered_mechanisms, auth, AUTH_MECHANISMS))


class _SessionFactory(SMTPServerFactory):
    """A listener's session factory in one generation: counts the generation's sessions."""

    def __init__(self, generation: "ServerGeneration", listener: Listener,
                 counter: ConnectionCounter) -> None:
        super().__init__(generation.context, listener, counter)
        self.generation = generation

    def buildProtocol(self, addr):
        proto = super().buildProtocol(addr)
        if isinstance(proto, SMTPServerProtocol):
            self.generation.sessions += 1
        return proto

    def connection_closed(self, proto: SMTPServerProtocol) -> None:
        counted = proto in self.counter.sessions
        super().connection_closed(proto)
        if counted:
            self.generation.session_ended()


class ServerGeneration:
    """The sessions' side of one configuration (see the module docstring)."""

    def __init__(self, config: Config, number: int, *, reactor: Any, spool: Any, scheduler: Any,
                 counter: ConnectionCounter, auth_failures: Any, events: Any = None) -> None:
        self.config = config
        self.number = number
        self.context = session_context(config, reactor=reactor, spool=spool, scheduler=scheduler,
                                       auth_failures=auth_failures, events=events)
        #: listener name -> the factory of its sessions (TLS first on implicit-TLS listeners)
        self.factories = {listener.name: self._factory(listener, counter)
                          for listener in config.listeners}
        #: sessions of this generation open now
        self.sessions = 0
        self._retired: list[defer.Deferred] | None = None

    def _factory(self, listener: Listener, counter: ConnectionCounter):
        factory = _SessionFactory(self, listener, counter)
        if listener.implicit_tls:
            factory = TLSMemoryBIOFactory(self.context.tls, False, factory)
        return factory

    def factory_for(self, listener_name: str):
        """The factory of that listener's new sessions; None if this generation has no such listener."""
        return self.factories.get(listener_name)

    def session_ended(self) -> None:
        self.sessions -= 1
        if self.sessions <= 0 and self._retired is not None:
            waiters, self._retired = self._retired, []
            for d in waiters:
                d.callback(self)

    def retire(self) -> defer.Deferred:
        """No longer current: fires (with self) once its last session has ended."""
        if self._retired is None:
            self._retired = []
        if self.sessions <= 0:
            return defer.succeed(self)
        d = defer.Deferred()
        self._retired.append(d)
        return d


def release_plugins(config: Config, *in_use: Config) -> list[str]:
    """Release what ``config``'s plugins and backends hold (a reload replaced it).

    Called once no session and no delivery uses them: every plugin and
    backend that provides :class:`pymta.interfaces.IClosable` is closed,
    and the DNS resolver and the Redis connection unless a configuration
    still ``in_use`` (the one in force, and older ones whose sessions go on)
    shares them.  Returns the names of what was closed.  A close that fails
    is logged; the others go on.
    """
    closed = []
    objects: dict[int, tuple[str, Any]] = {}
    for instances in config.stages.values():
        for plugin in instances:
            objects[id(plugin.obj)] = (f"plugins.{plugin.name}", plugin.obj)
    for name, backend in config.backends.items():
        objects[id(backend)] = (f"backends.{name}", backend)
    for what, obj in objects.values():
        if IClosable.providedBy(obj):
            try:
                obj.close()
            except Exception:
                log.failure("reload: closing {what} of the previous configuration failed", what=what)
            else:
                closed.append(what)
    still_shared = [obj for other in in_use for obj in (other.resolver, other.shared_state)]
    for what, shared in (("dns resolver", config.resolver), ("shared state", config.shared_state)):
        if shared is not None and not any(shared is obj for obj in still_shared):
            close = getattr(shared, "close", None)
            if callable(close):
                close()
                closed.append(what)
    return closed
