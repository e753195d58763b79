"""twistd glue: command-line options → the service tree.

    twistd -n pymta                  # embedded default (loopback :2525, ./var)
    twistd -n pymta --config FILE    # one TOML file
"""

from __future__ import annotations

import sys

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import usage

from pymta.config.errors import ConfigError
from pymta.config.model import Config
from pymta.logtext import speed_up_text_log
from pymta.server.listening import ListenerService  # noqa: F401 (their home moved)
from pymta.worker.process import DiskWorker

log = Logger(namespace="pymta")


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
    every DNS query's UDP port are dropped.  With ``[log] format = "json"``
    the lines are JSON objects instead (:mod:`pymta.logjson`).
    """

    def __init__(self, log_format: str = "text") -> None:
        self.log_format = log_format

    def startService(self) -> None:
        super().startService()
        from twisted.logger import FilteringLogObserver, PredicateResult, globalLogPublisher

        if self.log_format == "json":
            from pymta.logjson import JSONLineObserver
            speed_up_text_log(globalLogPublisher, JSONLineObserver)
        else:
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
        #: pymta.reload.reloader.ConfigReloader (set by build_service)
        self.reloader = None

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


def load(options) -> Config:
    from pymta.config.loader import default_config, load_config
    from twisted.internet import reactor
    path = options["config"]
    return load_config(path, reactor=reactor) if path else default_config(reactor=reactor)


def build_service(config: Config, reactor) -> MultiService:
    """The service tree of one server; ``service.reloader`` reloads it (SIGHUP, see
    :mod:`pymta.reload.reloader`; its ``on_reload*`` hook lists are for other services)."""
    from pymta.server.factory import ConnectionCounter, SessionShutdown
    from pymta.bounce.notifier import DeliveryNotifier
    from pymta.server.auth import AuthFailureDelay
    from pymta.delivery.scheduler import DeliveryScheduler
    from pymta.reload.reloader import ConfigReloader, RunningServer, give_disk_worker
    from pymta.server.listening import ListenerSockets
    from pymta.spool.store import Spool

    metrics = _server_metrics(config)
    worker = DiskWorker(reactor) if config.spool_disk_work == "process" else None
    give_disk_worker(config.backends, worker)          # the local backends
    top = ServerServices(worker)
    spool = Spool(config.spool_dir, reactor=reactor, sync=config.spool_sync,
                  memory_limit=config.spool_memory_limit, worker=worker, events=metrics)
    scheduler = DeliveryScheduler(spool, config.backends, config.retry, reactor=reactor,
                                  notifier=DeliveryNotifier.from_config(config), events=metrics)
    scheduler.setServiceParent(top)          # started first: recovers the spool
    counter = ConnectionCounter()
    if metrics is not None:
        from pymta.metrics.http import metrics_service
        metrics_service(reactor, config.metrics_endpoint, metrics, scheduler,
                        lambda: counter.total).setServiceParent(top)
    shutdown = SessionShutdown(counter, reactor, config.shutdown_timeout)
    server = RunningServer(reactor, spool, scheduler, worker, shutdown, counter,
                           AuthFailureDelay(config.limits.auth_failure_delay), events=metrics)
    generation = server.generation(config, 1)     # what new sessions get; a reload replaces it
    sockets = ListenerSockets(top, reactor, generation, after=shutdown.drained)
    sockets.add_at_start(config.listeners)
    # requeue routes with the configuration in force (a reload replaces it)
    add_control_socket(config, scheduler, spool, reactor, top,
                       route_for=lambda address: sockets.generation.config.route_for(address))
    shutdown.setServiceParent(top)   # the sessions drain, then the listeners stop
    top.reloader = ConfigReloader(server, sockets)
    top.reloader.setServiceParent(top)   # SIGHUP: see pymta.reload.reloader
    LogSetup(config.log_format).setServiceParent(top)
    # More services go here (setServiceParent(top)); one that must follow a reload
    # appends to top.reloader.on_reload_start / on_reload / on_reload_end.
    notify_systemd(top, scheduler, counter, reactor)      # last: see its docstring
    log.info("pymta on {listeners} as {hostname}, domains {domains}, spool {spool}",
             listeners=", ".join(f"{l.name}={l.endpoint}" for l in config.listeners),
             hostname=config.hostname, domains=", ".join(config.domains), spool=config.spool_dir)
    return top


def _server_metrics(config: Config):
    """The server's metrics (its events sink) when ``[metrics] endpoint`` is set, else None."""
    if config.metrics_endpoint is None:
        return None
    from pymta.metrics.instruments import ServerMetrics
    return ServerMetrics()


def notify_systemd(top: MultiService, scheduler, counter, reactor) -> None:
    """systemd's Type=notify messages (pymta.systemd); nothing without NOTIFY_SOCKET.

    Added last: started once the spool is recovered and every listener
    listens (READY=1), the first told of a stop (STOPPING=1).  A reload
    says RELOADING=1 when it starts and READY=1 when it ends, whether the
    new file was put in force or refused.
    """
    from pymta.systemd import Notifier, NotifyService, queue_status, when_listening

    def listening():
        return [when_listening(service) for service in top if isinstance(service, ListenerService)]

    notify = NotifyService(Notifier.from_environment(), queue_status(scheduler, counter), reactor,
                           listening=listening)
    notify.setServiceParent(top)
    reloader = getattr(top, "reloader", None)
    if reloader is not None:
        reloader.on_reload_start.append(notify.reloading)
        reloader.on_reload_end.append(lambda ok: notify.ready())


def add_control_socket(config: Config, scheduler, spool, reactor, top: MultiService,
                       route_for=None) -> None:
    """The control socket of ``pymta queue`` ([control] socket), listening once started.

    ``route_for`` (default: ``config``'s) routes the messages ``requeue`` re-routes.
    """
    from pymta.control.service import ControlService, QueueControl
    if config.control_socket:
        control = QueueControl(scheduler, spool, route_for or config.route_for, reactor)
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
