"""SIGHUP: read the configuration file again and put it in force, or change nothing.

:meth:`ConfigReloader.reload` (SIGHUP, or any caller such as a control
command) works in this order:

1. the log files are reopened (logrotate's ``create``), so the reload's
   own lines are in the new file;
2. the file is read and checked exactly as at start-up
   (:func:`pymta.config.loader.load_config`: every key, the plugins loaded
   and ``verifyObject``-checked, their files read, the TLS files loaded);
   a problem is one error line naming the file and the key, and nothing
   changes;
3. a setting that only a restart can change (:mod:`pymta.reload.restart_only`)
   is named in the log and keeps its running value;
4. the next :class:`pymta.server.generation.ServerGeneration` is built and
   made current: new sessions get its plugins, limits, routes, maps and
   certificates, sessions in progress finish with theirs;
5. delivery attempts that start from now on use the new backends, routes
   and retry settings (:meth:`pymta.delivery.scheduler.DeliveryScheduler.reconfigure`);
   attempts in flight finish with the old backends; the spool, the
   scheduler and its queue are the same objects;
6. listeners are added, removed and changed
   (:meth:`pymta.server.listening.ListenerSockets.switch`); an endpoint that
   is still configured keeps its socket; one that cannot be bound (a port
   below 1024 after the privilege drop) is an error line, the rest of the
   reload stands;
7. once no session and no delivery uses the previous configuration, what
   its plugins hold is released (:func:`pymta.server.generation.release_plugins`).

Reloads run one at a time; a SIGHUP during one is done after it.

Hooks, for what other parts attach (systemd notifications, metrics): each
is a list of callables, called in order; one that raises is logged and the
others still run.

- ``on_reload_start``: ``fn()``, before the file is read (``RELOADING=1``);
- ``on_reload``: ``fn(config)``, once a new configuration is in force;
- ``on_reload_end``: ``fn(ok)``, after every reload, good (``True``) or
  refused (``False``) (``READY=1``).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.logger import Logger

from pymta.config.errors import ConfigError
from pymta.config.model import Config
from pymta.reload.logfiles import reopen_log_files
from pymta.reload.restart_only import hold_for_restart
from pymta.server.generation import ServerGeneration, release_plugins

log = Logger(namespace="pymta")


def give_disk_worker(backends: dict[str, Any], worker: Any) -> None:
    """Hand the disk worker to the backends that use one (the local ones)."""
    if worker is None:
        return
    for backend in backends.values():
        use_disk_worker = getattr(backend, "use_disk_worker", None)
        if callable(use_disk_worker):
            use_disk_worker(worker)


def load_again(previous: Config, reactor: Any) -> Config:
    """The configuration from the same source as ``previous`` (its file, or the embedded default)."""
    from pymta.config.loader import EMBEDDED_SOURCE, default_config, load_config
    if previous.source == EMBEDDED_SOURCE:
        return default_config(reactor=reactor, previous=previous)
    return load_config(previous.source, reactor=reactor, previous=previous)


@dataclass
class RunningServer:
    """What lives across reloads, made once at start."""
    reactor: Any
    spool: Any              # pymta.spool.store.Spool
    scheduler: Any          # pymta.delivery.scheduler.DeliveryScheduler
    worker: Any             # pymta.worker.process.DiskWorker, or None
    shutdown: Any           # pymta.server.factory.SessionShutdown
    counter: Any            # pymta.server.factory.ConnectionCounter
    auth_failures: Any      # pymta.server.auth.AuthFailureDelay
    #: the metrics' events sink (pymta.metrics.instruments.ServerMetrics), or None
    events: Any = None

    def generation(self, config: Config, number: int) -> ServerGeneration:
        return ServerGeneration(config, number, reactor=self.reactor, spool=self.spool,
                                scheduler=self.scheduler, counter=self.counter,
                                auth_failures=self.auth_failures, events=self.events)


def _call_hooks(hooks: list[Callable[..., Any]], *args: Any) -> None:
    for hook in list(hooks):
        try:
            hook(*args)
        except Exception:
            log.failure("reload: hook {hook!r} failed", hook=hook)


class ConfigReloader(Service):
    """Reloads the configuration on SIGHUP (see the module docstring)."""

    name = "reload"

    def __init__(self, server: RunningServer, sockets: Any,
                 load: Callable[[Config, Any], Config] = load_again) -> None:
        #: what lives across reloads
        self.server = server
        #: pymta.server.listening.ListenerSockets: the sockets and the generation they serve
        self.sockets = sockets
        self._load = load
        self.on_reload_start: list[Callable[[], Any]] = []
        self.on_reload: list[Callable[[Config], Any]] = []
        self.on_reload_end: list[Callable[[bool], Any]] = []
        self._pending: list[tuple[str, defer.Deferred]] = []
        self._busy = False
        self._previous_handler: Any = None
        #: the generations replaced by a reload and not released yet (sessions or deliveries go on)
        self._unreleased: list[ServerGeneration] = []

    @property
    def generation(self) -> ServerGeneration:
        """The generation new sessions get."""
        return self.sockets.generation

    @property
    def config(self) -> Config:
        """The configuration in force for new sessions and deliveries."""
        return self.generation.config

    # -- the signal -------------------------------------------------------------
    def startService(self) -> None:
        super().startService()
        self._previous_handler = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self):
        if self._previous_handler is not None:
            signal.signal(signal.SIGHUP, self._previous_handler)
            self._previous_handler = None
        return super().stopService()

    def _on_signal(self, signum, frame) -> None:
        self.server.reactor.callFromThread(self.reload, "SIGHUP")

    # -- reloading ------------------------------------------------------------------
    def reload(self, why: str = "request") -> defer.Deferred:
        """Reload once (after the reload in progress, if any); fires with True if the new
        configuration is in force, False if it was refused."""
        d = defer.Deferred()
        if not self.running:
            log.info("reload ({why}) ignored: the server is stopping", why=why)
            d.callback(False)
            return d
        self._pending.append((why, d))
        if not self._busy:
            self._next()
        return d

    def _next(self) -> None:
        if not self._pending:
            self._busy = False
            return
        self._busy = True
        why, d = self._pending.pop(0)
        done = defer.maybeDeferred(self._reload_once, why)
        done.addErrback(self._failed_unexpectedly)

        def finished(ok: bool) -> None:
            _call_hooks(self.on_reload_end, ok)
            d.callback(ok)
            self._next()
        done.addCallback(finished)

    def _failed_unexpectedly(self, failure) -> bool:
        log.failure("reload failed; the running configuration stays in force", failure)
        return False

    def _reload_once(self, why: str) -> defer.Deferred | bool:
        log_problems = reopen_log_files()
        _call_hooks(self.on_reload_start)
        previous = self.generation
        log.info("reload ({why}): reading {source}", why=why, source=previous.config.source)
        for problem in log_problems:
            log.warn("reload: {problem}", problem=problem)
        try:
            config = self._load(previous.config, self.server.reactor)
        except ConfigError as e:
            log.error("reload: configuration error: {error}; the running configuration stays "
                      "in force", error=str(e))
            return False
        config, restart = hold_for_restart(previous.config, config)
        try:
            generation = self.server.generation(config, previous.number + 1)
        except Exception:
            release_plugins(config, previous.config)
            raise
        for key in restart:
            log.warn("reload: {key} changed: needs a restart; the running value stays in force "
                     "until then", key=key)
        self._apply_live_settings(config)
        deliveries_done = self.server.scheduler.reconfigure(
            config.backends, config.retry, _notifier(config))
        d = self.sockets.switch(generation)      # new sessions get it from now on
        return d.addCallback(self._switched, previous, generation, deliveries_done)

    def _apply_live_settings(self, config: Config) -> None:
        """The settings of the long-lived parts that may change live."""
        server = self.server
        give_disk_worker(config.backends, server.worker)
        server.spool.memory_limit = config.spool_memory_limit
        server.shutdown.timeout = config.shutdown_timeout
        server.auth_failures.base = config.limits.auth_failure_delay

    def _switched(self, problems: list[str], previous: ServerGeneration,
                  generation: ServerGeneration, deliveries_done: defer.Deferred) -> bool:
        for problem in problems:
            log.error("reload: {problem}; the rest of the new configuration is in force",
                      problem=problem)
        config = generation.config
        listening = [service.listener for service in self.sockets.services.values()]
        log.info("reload: configuration {number} in force for new sessions and deliveries "
                 "({source}; listening: {listeners}); {sessions} session(s) finish with the "
                 "previous one", number=generation.number, source=config.source,
                 sessions=previous.sessions,
                 listeners=", ".join(f"{l.name}={l.endpoint}" for l in listening))
        self._release_when_unused(previous, deliveries_done)
        _call_hooks(self.on_reload, config)
        return True

    def _release_when_unused(self, previous: ServerGeneration, deliveries_done: defer.Deferred) -> None:
        self._unreleased.append(previous)

        def release(_) -> None:
            self._unreleased.remove(previous)
            in_use = [self.generation, *self._unreleased]
            closed = release_plugins(previous.config, *(generation.config for generation in in_use))
            log.info("reload: configuration {number} released: no session or delivery uses it "
                     "({closed})", number=previous.number,
                     closed=f"closed: {', '.join(closed)}" if closed else "nothing to close")

        done = defer.gatherResults([previous.retire(), deliveries_done], consumeErrors=True)
        done.addCallback(release)
        done.addErrback(lambda f: log.failure("reload: releasing configuration {number} failed", f,
                                              number=previous.number))


def _notifier(config: Config) -> Any:
    from pymta.bounce.notifier import DeliveryNotifier
    return DeliveryNotifier.from_config(config)
