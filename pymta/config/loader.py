"""Load the TOML configuration into a :class:`pymta.config.model.Config`.

``load_config(path)`` reads a file; ``default_config()`` is what ``twistd -n
pymta`` runs with no ``--config``: the same rules applied to an empty file
whose directory is the current one.  Every problem is a
:class:`~pymta.config.errors.ConfigError` whose text is one line naming the
file, the dotted key and the problem, e.g.::

    /etc/pymta/pymta.toml: limits.max_recipients: expected an integer, got string 'abc'

This module reads the tables; the plugins and backends they name are
made and checked by :mod:`pymta.config.plugins`.  What a load changes
besides building the Config is done in two explicit steps of
:meth:`_ConfigBuilder.build`: ``[server] plugin_path`` is put on
``sys.path`` (:func:`~pymta.config.plugins.add_plugin_path`) and the shared
DNS resolver is made (:func:`make_resolver`), both before the plugins that
need them.  ``etc/pymta.toml`` documents every key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import re
import socket
import tomllib
from collections.abc import Iterator, Mapping
from typing import Any, NoReturn

from pymta.config.errors import ConfigError, OptionError, one_line
from pymta.config.model import Config, DNSSettings, Limits, Retry, Route
from pymta.config.listeners import ROLES, read_listeners, read_tls
from pymta.config.metrics import read_metrics
from pymta.config.control import read_control
from pymta.config.plugins import PluginLoader, add_plugin_path
from pymta.dns.resolver import DNSResolver, parse_nameserver
from pymta.addresses import normalize_domain
from pymta.config.options import Options, PluginContext, closest, describe_value, read_scope
from pymta.config.durations import format_duration
from pymta.filesync import SYNC_MODES
from pymta.logjson import LOG_FORMATS
from pymta.interfaces import IRemoteDelivery
from pymta.shared_state import SharedSettings, SharedState, parse_redis_url

__all__ = ["load_config", "default_config", "make_resolver", "EMBEDDED_SOURCE", "ROLES", "SPOOL_DISK_WORK"]

EMBEDDED_SOURCE = "<embedded default>"
#: where the spool's and local deliveries' file work runs (pymta.worker.process)
SPOOL_DISK_WORK = ("process", "threads")

DEFAULT_DOMAINS = ["localhost"]
DEFAULT_TRUSTED_NETWORKS = ["127.0.0.0/8", "::1/128"]
DEFAULT_SPOOL_DIR = "var/spool"
DEFAULT_BACKENDS = {"local": {"use": "maildir", "base": "var/mail"}}

# How each [limits] key is read; a Limits field missing here is read by the
# type of its default (so a field added to the model is configurable at once).
_COUNT = {"minimum": 1}
_LIMIT_READERS: dict[str, tuple[str, dict[str, Any]]] = {
    "max_message_size": ("int", _COUNT),
    "max_recipients": ("int", _COUNT),
    "max_connections": ("int", _COUNT),
    "max_connections_per_ip": ("int", _COUNT),
    "idle_timeout": ("duration", {"above": 0}),
    "data_timeout": ("duration", {"above": 0}),
    "max_errors": ("int", _COUNT),
    "bare_newlines": ("str", {"choices": ("reject", "normalize")}),
    "pregreet_wait": ("duration", {"minimum": 0}),
    "auth_failure_delay": ("duration", {"minimum": 0}),
    "plugin_timeout": ("duration", {"above": 0}),
}


def load_config(path: str, reactor: Any = None, previous: Config | None = None) -> Config:
    """Read, check and instantiate the configuration in the TOML file ``path``.

    ``previous``: the configuration in force (a reload); its DNS resolver,
    and the answers it cached, serve the new one when ``[dns]`` is unchanged.
    """
    raw = _read_toml(path)
    config_dir = os.path.dirname(os.path.abspath(path))
    return _ConfigBuilder(path, config_dir, reactor, previous).build(raw)


def default_config(reactor: Any = None, previous: Config | None = None) -> Config:
    """The embedded default: an empty config file in the current directory."""
    return _ConfigBuilder(EMBEDDED_SOURCE, os.getcwd(), reactor, previous).build({})


def make_resolver(settings: DNSSettings, reactor: Any) -> DNSResolver:
    """The shared DNS resolver of ``[dns]`` (plugins get it in their context)."""
    return DNSResolver(list(settings.nameservers), settings.timeout, settings.attempts,
                       reactor=reactor, cache_entries=settings.cache_entries,
                       failure_ttl=settings.failure_ttl)


# -- reading the file -------------------------------------------------------

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(path, "config file", "no such file") from None
    except IsADirectoryError:
        raise ConfigError(path, "config file", "is a directory, not a file") from None
    except OSError as e:
        raise ConfigError(path, "config file", f"cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(path, f"line {line}", "not valid UTF-8 (a TOML file must be UTF-8)") from None
    try:
        return tomllib.loads(text.removeprefix("\ufeff"))
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        found = _TOML_POSITION.search(message)
        if found:
            where = f"line {found[1]}, column {found[2]}"
            message = message[: found.start()]
        elif message.endswith("(at end of document)"):
            where = "end of file"
            message = message.removesuffix("(at end of document)").rstrip()
        else:
            where = "syntax"
        raise ConfigError(path, where, f"TOML syntax error: {message}") from None


# -- the builder --------------------------------------------------------------

class _ConfigBuilder:
    """Turns the parsed TOML (a dict) into a Config; one per load."""

    def __init__(self, source: str, config_dir: str, reactor: Any, previous: Config | None = None):
        self.source = source
        self.config_dir = config_dir
        self._reactor = reactor
        self._previous = previous
        self.context: PluginContext | None = None

    # -- error helpers ----------------------------------------------------
    def fail(self, key: str, problem: str) -> NoReturn:
        raise ConfigError(self.source, key, one_line(problem))

    @contextlib.contextmanager
    def section(self, prefix: str) -> Iterator[None]:
        """Turn an OptionError raised inside into a ConfigError under ``prefix``
        (and name the table read there for ``pymta check-config``)."""
        try:
            with read_scope(prefix):
                yield
        except OptionError as e:
            key = f"{prefix}.{e.key}" if prefix else e.key
            raise ConfigError(self.source, key, one_line(e.problem)) from None

    @property
    def reactor(self) -> Any:
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor

    def resolve(self, path: str) -> str:
        return os.path.normpath(os.path.join(self.config_dir, os.path.expanduser(path)))

    # -- the whole file -----------------------------------------------------
    def build(self, raw: dict[str, Any]) -> Config:
        with self.section(""):
            top = Options(raw)
            server = top.table("server", {})
            spool = top.table("spool", {})
            listeners = top.value("listeners", None)
            limits = top.table("limits", {})
            queue = top.table("queue", {})
            stages = top.table("stages", {})
            plugins = top.table("plugins", {})
            backends = top.table("backends", None)
            routes = top.value("routes", None)
            dns_table = top.table("dns", {})
            tls_table = top.table("tls", None)
            shared_table = top.table("shared", {})
            metrics_table = top.table("metrics", None)
            log_table = top.table("log", {})
            control = top.table("control", {})
            top.finish()

        hostname, domains, trusted, plugin_path = self._server(server)
        add_plugin_path(plugin_path)
        dns_settings = self._dns(dns_table)
        previous = self._previous
        if previous is not None and previous.resolver is not None and previous.dns == dns_settings:
            resolver = previous.resolver           # a reload: [dns] unchanged, its cache kept
        else:
            resolver = make_resolver(dns_settings, self.reactor)
        shared = self._shared(shared_table)
        if previous is not None and previous.shared_state is not None and previous.shared == shared:
            shared_state = previous.shared_state   # a reload: [shared] unchanged, one connection
        else:
            shared_state = SharedState(shared, self.reactor) if shared.redis is not None else None
        self.context = PluginContext(hostname, domains, self.config_dir, self.reactor, resolver,
                                     shared_state)
        plugin_loader = PluginLoader(self)
        spool_dir, spool_sync, spool_memory_limit, spool_disk_work = self._spool(spool)
        tls = read_tls(self, tls_table)
        control_socket = read_control(self, control, spool_dir)
        limits_obj = self._limits(limits)
        retry = self._queue(queue)
        backend_objs = plugin_loader.backends(DEFAULT_BACKENDS if backends is None else backends)
        route_list = self._routes(routes, domains, backend_objs)
        stage_map = plugin_loader.stages(stages, plugins)
        listener_list = read_listeners(self, listeners, tls, bool(stage_map.get("auth")))
        metrics_endpoint = read_metrics(self, metrics_table)
        log_format = self._log(log_table)
        return Config(
            source=self.source, hostname=hostname, domains=domains,
            trusted_networks=trusted, spool_dir=spool_dir, listeners=listener_list,
            limits=limits_obj, retry=retry, spool_sync=spool_sync,
            spool_memory_limit=spool_memory_limit, spool_disk_work=spool_disk_work, stages=stage_map,
            backends=backend_objs, routes=route_list, dns=dns_settings, resolver=resolver, tls=tls,
            shutdown_timeout=self.shutdown_timeout, shared=shared, shared_state=shared_state,
            metrics_endpoint=metrics_endpoint, log_format=log_format,
            control_socket=control_socket)

    # -- [server] -------------------------------------------------------------
    def _server(self, table: dict[str, Any]) -> tuple[str, tuple[str, ...], tuple[Any, ...], list[str]]:
        with self.section("server"):
            opts = Options(table)
            hostname = opts.str("hostname", default=None)
            domain_list = opts.list_str("domains", default=DEFAULT_DOMAINS)
            networks = opts.list_str("trusted_networks", default=DEFAULT_TRUSTED_NETWORKS)
            plugin_path = opts.list_str("plugin_path", default=[])
            self.shutdown_timeout = opts.duration("shutdown_timeout", 30.0, minimum=0)
            opts.finish()

            if hostname is None:
                hostname = socket.getfqdn()
            else:
                try:
                    hostname = normalize_domain(hostname)
                except ValueError as e:
                    problem = str(e).replace("invalid domain", "invalid host name", 1)
                    raise OptionError("hostname", problem) from None

            domains: list[str] = []
            for index, domain in enumerate(domain_list):
                try:
                    normalized = normalize_domain(domain)
                except ValueError as e:
                    raise OptionError(f"domains[{index}]", str(e)) from None
                if normalized not in domains:
                    domains.append(normalized)

            trusted = []
            for index, text in enumerate(networks):
                try:
                    trusted.append(ipaddress.ip_network(text.strip(), strict=True))
                except ValueError as e:
                    raise OptionError(f"trusted_networks[{index}]",
                                      f"not a network in CIDR notation: {e}") from None

            directories = []
            for index, entry in enumerate(plugin_path):
                directory = self.resolve(entry)
                if not os.path.isdir(directory):
                    raise OptionError(f"plugin_path[{index}]", f"no such directory: {directory}")
                directories.append(directory)
        return hostname, tuple(domains), tuple(trusted), directories

    # -- [spool] --------------------------------------------------------------
    def _spool(self, table: dict[str, Any]) -> tuple[str, str, int, str]:
        with self.section("spool"):
            opts = Options(table)
            directory = opts.path("directory", self.context, default=DEFAULT_SPOOL_DIR)
            sync = opts.str("sync", default="fsync", choices=SYNC_MODES)
            memory_limit = opts.int("memory_limit", Config.spool_memory_limit, minimum=0)
            disk_work = opts.str("disk_work", default=Config.spool_disk_work, choices=SPOOL_DISK_WORK)
            opts.finish()
        return directory, sync, memory_limit, disk_work

    # -- [shared] ---------------------------------------------------------------
    def _shared(self, table: dict[str, Any]) -> SharedSettings:
        with self.section("shared"):
            opts = Options(table)
            redis = opts.str("redis", default=None)
            timeout = opts.duration("timeout", default=SharedSettings.timeout, above=0, maximum=30)
            key_prefix = opts.str("key_prefix", default=SharedSettings.key_prefix, allow_empty=True)
            opts.finish()
            if redis is not None:
                try:
                    parse_redis_url(redis)
                except ValueError as e:
                    raise OptionError("redis", str(e)) from None
        return SharedSettings(redis, timeout, key_prefix)

    # -- [log] ------------------------------------------------------------------
    def _log(self, table: dict[str, Any]) -> str:
        with self.section("log"):
            opts = Options(table)
            log_format = opts.str("format", default=Config.log_format, choices=LOG_FORMATS)
            opts.finish()
        return log_format

    # -- [[listeners]] --------------------------------------------------------
    # -- [limits] and [queue] -------------------------------------------------
    def _limits(self, table: dict[str, Any]) -> Limits:
        values: dict[str, Any] = {}
        with self.section("limits"):
            opts = Options(table)
            for field in dataclasses.fields(Limits):
                default = field.default
                reader, bounds = _LIMIT_READERS.get(field.name) or _reader_for(field.name, default)
                values[field.name] = getattr(opts, reader)(field.name, default, **bounds)
            opts.finish()
        return Limits(**values)

    def _dns(self, table: dict[str, Any]) -> DNSSettings:
        defaults = DNSSettings()
        with self.section("dns"):
            opts = Options(table)
            servers = opts.list_str("nameservers", default=[])
            timeout = opts.duration("timeout", defaults.timeout, above=0)
            attempts = opts.int("attempts", defaults.attempts, minimum=1, maximum=10)
            reverse_lookup = opts.bool("reverse_lookup", defaults.reverse_lookup)
            hosts_file = opts.str("hosts_file", defaults.hosts_file, allow_empty=True)
            session_budget = opts.duration("session_budget", defaults.session_budget, minimum=0)
            cache_entries = opts.int("cache_entries", defaults.cache_entries, minimum=0)
            failure_ttl = opts.duration("failure_ttl", defaults.failure_ttl, minimum=0, maximum=3600)
            opts.finish()
            if hosts_file:
                hosts_file = self.resolve(hosts_file)
                if hosts_file != defaults.hosts_file:
                    try:
                        open(hosts_file, "rb").close()
                    except OSError as e:
                        problem = "no such file" if isinstance(e, FileNotFoundError) else \
                            f"cannot read it ({e.strerror})"
                        raise OptionError("hosts_file", f"{problem}: {hosts_file}") from None
            for index, server in enumerate(servers):
                try:
                    host, port = parse_nameserver(server)
                    ipaddress.ip_address(host)
                    if not 0 < port < 65536:
                        raise ValueError
                except ValueError:
                    raise OptionError(f"nameservers[{index}]", f"expected an IP address with an "
                                      f"optional :port, got {server!r}") from None
        return DNSSettings(tuple(servers), timeout, attempts, reverse_lookup, hosts_file,
                           session_budget, cache_entries, failure_ttl)

    def _queue(self, table: dict[str, Any]) -> Retry:
        defaults = Retry()
        with self.section("queue"):
            opts = Options(table)
            initial = opts.duration("retry_initial", defaults.initial, above=0)
            maximum = opts.duration("retry_max", defaults.maximum, above=0)
            lifetime = opts.duration("lifetime", defaults.lifetime, above=0)
            concurrency = opts.int("concurrency", defaults.concurrency, minimum=1)
            delay_warning = opts.duration("delay_warning", defaults.delay_warning, minimum=0)
            opts.finish()
        if maximum < initial:
            self.fail("queue.retry_max", f"must be at least retry_initial "
                                         f"({format_duration(initial)}), got {format_duration(maximum)}")
        return Retry(initial=initial, maximum=maximum, lifetime=lifetime, concurrency=concurrency,
                     delay_warning=delay_warning)

    # -- [backends.*] and [[routes]] --------------------------------------------
    def _routes(self, value: Any, domains: tuple[str, ...], backends: dict[str, Any]) -> tuple[Route, ...]:
        if value is None:
            if len(backends) > 1:
                self.fail("routes", "[[routes]] are required when more than one backend is "
                                    f"defined (backends: {', '.join(backends)})")
            routes = tuple(Route(domain, name) for name in backends for domain in domains)
        else:
            if not isinstance(value, list) or not all(isinstance(v, Mapping) for v in value):
                self.fail("routes", "expected an array of tables ([[routes]] sections), "
                                    f"got {describe_value(value)}")
            parsed = []
            for index, table in enumerate(value):
                prefix = f"routes[{index}]"
                with self.section(prefix):
                    opts = Options(table)
                    match = opts.str("match")
                    backend = opts.str("backend")
                    opts.finish()
                    match = _route_match(match)
                if backend not in backends:
                    hint = closest(backend, backends)
                    suggestion = f" (did you mean {hint!r}?)" if hint else ""
                    self.fail(f"{prefix}.backend", f"no backend named {backend!r}{suggestion}; "
                                                   f"defined: {', '.join(backends) or 'none'}")
                parsed.append(Route(match, backend))
            routes = tuple(parsed)
        for domain in domains:
            if not any(route.matches(f"postmaster@{domain}") for route in routes):
                self.fail("routes", f"no route for local domain {domain!r} (add a [[routes]] "
                                    f"entry with match = \"{domain}\" or \"*\")")
        self._check_local_domains_stay_local(value is None, domains, routes, backends)
        return routes

    def _check_local_domains_stay_local(self, implicit: bool, domains: tuple[str, ...],
                                        routes: tuple[Route, ...], backends: dict[str, Any]) -> None:
        """A local domain must not reach a relay/smarthost backend unless a route names it.

        "Names it" means a route whose match is the domain ("example.org" or
        "@example.org") or one address in it ("user@example.org"); "*" does
        not.  The route a domain's mail takes is the first "*" or domain
        route matching it (routes for single addresses take only those).
        The postmaster of every local domain is covered: it takes its own
        route if one names it, else the domain's.
        """
        if implicit:
            # no [[routes]]: every local domain goes to the only backend
            for name, backend in backends.items():
                if IRemoteDelivery.providedBy(backend) and domains:
                    self.fail("routes", f"local domain {domains[0]!r} would be relayed by backend "
                                        f"{name!r}, the only backend (no [[routes]]); add a local "
                                        "backend (maildir, mbox) and [[routes]]: the local domains "
                                        "to it, then match = \"*\" to this one")
            return
        for domain in domains:
            for index, route in enumerate(routes):
                if route.match != "*" and not route.match.startswith("@") and "@" in route.match:
                    continue                  # one address: named explicitly, whatever it is
                if not route.matches(f"postmaster@{domain}"):
                    continue
                if route.match == "*" and IRemoteDelivery.providedBy(backends[route.backend]):
                    self.fail(f"routes[{index}]",
                              f"local domain {domain!r} would be relayed: this route (match = "
                              f"\"*\") sends it to backend {route.backend!r}, which passes mail on "
                              "to other servers; add a route for it to a local backend before this one, "
                              f"or name it in a route (match = \"{domain}\") if relaying it is "
                              "intended")
                break

def _reader_for(name: str, default: Any) -> tuple[str, dict[str, Any]]:
    """How to read a Limits field this module does not know, from its default's type."""
    if isinstance(default, bool):
        return "bool", {}
    if isinstance(default, int):
        return "int", {"minimum": 0}
    if isinstance(default, float):
        if name.endswith(("timeout", "wait", "interval", "delay", "time")):
            return "duration", {"minimum": 0}
        return "float", {"minimum": 0}
    return "str", {}


def _route_match(match: str) -> str:
    """Check and normalize a route pattern: "*", "domain", "@domain" or "user@domain"."""
    text = match.strip()
    if text == "*":
        return text
    local, at, domain = text.rpartition("@")
    try:
        domain = normalize_domain(domain)
    except ValueError as e:
        raise OptionError("match", f"expected \"*\", \"domain\", \"@domain\" or "
                                   f"\"user@domain\": {e}") from None
    if at and local:
        return f"{local.lower()}@{domain}"
    return f"@{domain}" if at else domain
