"""twistd glue: command-line options → the service tree.

    twistd -n pymta                  # embedded default (loopback :2525, ./var)
    twistd -n pymta --config FILE    # one TOML file
"""

from __future__ import annotations

import signal
import sys

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.python import usage

from pymta.config.errors import ConfigError
from pymta.config.model import Config
from pymta.dns.reverse import ClientNames
from pymta.logtext import speed_up_text_log
from pymta.worker.process import DiskWorker

log = Logger(namespace="pymta")


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
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            sys.__stderr__.write(f"pymta: cannot listen: listeners {self.listener.name!r} "
                                 f"({self.listener.endpoint}): {e.socketError}\n")
            raise SystemExit(1)


class TLSReload(Service):
    """SIGHUP re-reads the certificates; sessions in progress keep theirs."""

    def __init__(self, tls, reactor) -> None:
        self.tls = tls
        self.reactor = reactor
        self._previous = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self):
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
        return super().stopService()

    def _on_signal(self, signum, frame) -> None:
        self.reactor.callFromThread(self.reload)

    def reload(self) -> None:
        try:
            self.tls.reload()
        except Exception as e:
            log.error("TLS reload failed, keeping the previous certificates: {error}", error=e)
        else:
            log.info("TLS certificates reloaded")


def _dns_port_noise(event) -> bool:
    """A per-query UDP port of the DNS client opening or closing (twisted.names logs each)."""
    fmt = event.get("log_format") or ""
    text = fmt if "{" not in fmt else ""
    if not text and event.get("message"):
        text = " ".join(str(m) for m in event["message"])
    if text.startswith(("Starting protocol <twisted.names.dns.", "Stopping protocol <twisted.names.dns.")):
        return True
    return text.startswith(("(UDP Port ", "DNSDatagramProtocol starting on"))


class LogSetup(Service):
    """The log as twistd set it up, made faster and quieter (at start).

    twistd's text observer is replaced by :class:`pymta.logtext.ClassicTextObserver`
    (same lines, less work per line), and the two lines Twisted writes for
    every DNS query's UDP port are dropped.
    """

    def startService(self) -> None:
        super().startService()
        from twisted.logger import FilteringLogObserver, PredicateResult, globalLogPublisher

        speed_up_text_log(globalLogPublisher)

        def predicate(event):
            return PredicateResult.no if _dns_port_noise(event) else PredicateResult.maybe

        for observer in list(globalLogPublisher._observers):
            globalLogPublisher.removeObserver(observer)
            globalLogPublisher.addObserver(FilteringLogObserver(observer, [predicate]))


class ServerServices(MultiService):
    """The server's services, and its disk worker around them.

    The worker starts before the others (the scheduler recovers the spool
    and delivers at once) and stops only once all of them have: a
    MultiService stops its children together, and the scheduler and the
    sessions still draining need the worker for their last commits,
    updates and removals.
    """

    def __init__(self, worker=None) -> None:
        super().__init__()
        self.worker = worker

    def startService(self) -> None:
        if self.worker is not None:
            self.worker.start().addErrback(
                lambda f: log.failure("the disk worker process did not start", f))
        super().startService()

    def stopService(self):
        d = defer.maybeDeferred(super().stopService)
        if self.worker is not None:
            d.addBoth(lambda result: self.worker.stop().addCallback(lambda _: result))
        return d                       # twistd waits for the calls in flight


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = ("Run the pymta mail transfer agent. Without --config it listens on "
                "127.0.0.1:2525 and delivers mail for localhost into ./var/mail.")
    optParameters = [
        ["config", "c", None, "TOML configuration file (default: the embedded default)"],
    ]

    def opt_version(self) -> None:
        """Print pymta's version and exit."""
        from pymta import __version__
        print(f"pymta {__version__}")
        sys.exit(0)


DEFAULT_BACKLOG = 1024   # Twisted's 50 drops connections in bursts (measured with smtp-source)


def with_backlog(endpoint: str) -> str:
    """A tcp/tcp6 endpoint string with a listen backlog, unless it names one."""
    kind = endpoint.split(":", 1)[0].strip().lower()
    if kind in ("tcp", "tcp6") and "backlog=" not in endpoint:
        return f"{endpoint}:backlog={DEFAULT_BACKLOG}"
    return endpoint


def load(options) -> Config:
    from pymta.config.loader import default_config, load_config
    from twisted.internet import reactor
    path = options["config"]
    return load_config(path, reactor=reactor) if path else default_config(reactor=reactor)


def build_service(config: Config, reactor) -> MultiService:
    from pymta.server.factory import (ConnectionCounter, ServerContext, SessionShutdown,
                                      SMTPServerFactory)
    from pymta.bounce.notifier import DeliveryNotifier
    from pymta.server.auth import AuthFailureDelay, build_portal
    from pymta.server.chain import StageDeadline
    from pymta.server.policy import SessionPolicy
    from pymta.server.proxy import ProxyHeaderFactory
    from pymta.server.tls import server_tls
    from pymta.delivery.scheduler import DeliveryScheduler
    from pymta.spool.store import Spool

    worker = DiskWorker(reactor) if config.spool_disk_work == "process" else None
    if worker is not None:
        for backend in config.backends.values():
            use_disk_worker = getattr(backend, "use_disk_worker", None)   # local backends
            if callable(use_disk_worker):
                use_disk_worker(worker)
    top = ServerServices(worker)
    spool = Spool(config.spool_dir, reactor=reactor, sync=config.spool_sync,
                  memory_limit=config.spool_memory_limit, worker=worker)
    scheduler = DeliveryScheduler(spool, config.backends, config.retry, reactor=reactor,
                                  notifier=DeliveryNotifier.from_config(config))
    scheduler.setServiceParent(top)          # started first: recovers the spool
    add_control_socket(config, scheduler, spool, reactor, top)
    tls = server_tls(config.tls) if config.tls is not None else None
    context = ServerContext(config=config, policy=SessionPolicy(config, reactor), spool=spool,
                            scheduler=scheduler, reactor=reactor, tls=tls,
                            portal=build_portal(config.stages.get("auth", ()),
                                                StageDeadline(reactor, config.limits.plugin_timeout)),
                            auth_failures=AuthFailureDelay(config.limits.auth_failure_delay),
                            client_names=(ClientNames(config.resolver, config.dns.hosts_file)
                                          if config.dns.reverse_lookup else None))
    if tls is not None:
        TLSReload(tls, reactor).setServiceParent(top)
    counter = ConnectionCounter()
    shutdown = SessionShutdown(counter, reactor, config.shutdown_timeout)
    for listener in config.listeners:
        endpoint = serverFromString(reactor, with_backlog(listener.endpoint))
        factory = SMTPServerFactory(context, listener, counter)
        if listener.implicit_tls:
            factory = TLSMemoryBIOFactory(tls, False, factory)
        if listener.proxy_protocol:        # the header comes first, before any TLS
            factory = ProxyHeaderFactory(factory, listener, reactor)
        ListenerService(listener, endpoint, factory, after=shutdown.drained).setServiceParent(top)
    shutdown.setServiceParent(top)   # the sessions drain, then the listeners stop
    LogSetup().setServiceParent(top)
    log.info("pymta on {listeners} as {hostname}, domains {domains}, spool {spool}",
             listeners=", ".join(f"{l.name}={l.endpoint}" for l in config.listeners),
             hostname=config.hostname, domains=", ".join(config.domains), spool=config.spool_dir)
    return top


def add_control_socket(config: Config, scheduler, spool, reactor, top: MultiService) -> None:
    """The control socket of ``pymta queue`` ([control] socket), listening once started."""
    from pymta.control.service import ControlService, QueueControl
    if config.control_socket:
        control = QueueControl(scheduler, spool, config.route_for, reactor)
        ControlService(config.control_socket, control, reactor).setServiceParent(top)


def prepare_run_as(options, config: Config):
    """The directories for the user twistd switches to (``--uid``), before anything opens them.

    Runs as root when twistd does the switch: before the spool is opened
    (which would create its directories as root), and before twistd
    daemonizes, so that a problem is one line on the terminal.  Returns
    the :class:`pymta.runas.RunAs`.
    """
    from pymta import runas
    run_as = runas.RunAs.from_twistd_options(options)
    runas.prepare_directories(config, run_as)
    return run_as


def warn_unreadable_later(config: Config, run_as) -> None:
    """A warning for each file read again later (on change, on SIGHUP) that the user cannot read."""
    from pymta import runas
    for what, path in runas.unreadable_later(_files_read_later(config), run_as):
        log.warn("{what} {path} is not readable by {user}, whom pymta runs as: "
                 "changes to it cannot be read after the start", what=what, path=path,
                 user=run_as.describe())


def _files_read_later(config: Config):
    """(what, path) of the files the running server reads again when they change."""
    from pymta.config.watched_file import WatchedFile
    for watched in WatchedFile.instances():
        yield watched.what, watched.path
    if config.tls is not None:
        for paths in (config.tls.default, *config.tls.sni.values()):
            yield "TLS certificate", paths.certificate
            yield "TLS key", paths.key
            if paths.chain:
                yield "TLS chain", paths.chain


def makeService(options) -> MultiService:
    from twisted.internet import reactor
    from pymta.runas import StartupPermissionError
    try:
        config = load(options)
    except ConfigError as e:
        sys.stderr.write(f"pymta: configuration error: {e}\n")
        raise SystemExit(1)
    try:
        run_as = prepare_run_as(options, config)
    except StartupPermissionError as e:
        sys.stderr.write(f"pymta: {e}\n")
        raise SystemExit(1)
    service = build_service(config, reactor)
    warn_unreadable_later(config, run_as)
    return service
