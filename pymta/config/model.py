"""The loaded configuration, as the rest of pymta sees it.

Produced by :func:`pymta.config.loader.load_config` (from a TOML file) or
:func:`pymta.config.loader.default_config` (the embedded default).  Plugins are
already instantiated and verified here.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from pymta.addresses import domain_key, ip_address
from pymta.shared_state import SharedSettings


@dataclass(frozen=True)
class Listener:
    name: str
    #: Twisted server endpoint string, e.g. "tcp:2525:interface=127.0.0.1"
    endpoint: str
    #: "mx" (port 25), "submission" (587), "submissions" (465)
    role: str = "mx"
    #: STARTTLS offered (needs [tls])
    starttls: bool = False
    #: TLS from the first byte (RFC 8314, port 465)
    implicit_tls: bool = False
    #: SMTP AUTH offered (needs [stages] auth checkers)
    auth: bool = False
    #: AUTH allowed before TLS (otherwise 538 5.7.11)
    auth_plaintext: bool = False
    #: MAIL refused (530) until STARTTLS / until AUTH
    require_tls: bool = False
    require_auth: bool = False
    #: a PROXY protocol header (v1 or v2) comes first on every connection, from a
    #: load balancer in proxy_networks; its client address is the session's
    proxy_protocol: bool = False
    proxy_networks: tuple[Any, ...] = ()
    #: how long to wait for that header before closing the connection
    proxy_timeout: float = 5.0


@dataclass(frozen=True)
class CertificatePaths:
    certificate: str
    key: str
    chain: str | None = None


@dataclass(frozen=True)
class TLSSettings:
    default: CertificatePaths
    #: server name (SNI) -> its own certificate
    sni: dict[str, CertificatePaths] = field(default_factory=dict)
    min_version: str = "TLSv1.2"
    ciphers: str | None = None   # None: pymta.server.tls.MODERN_CIPHERS


@dataclass(frozen=True)
class Limits:
    max_message_size: int = 50 * 1024 * 1024     # bytes, advertised in SIZE
    max_recipients: int = 1000                    # per message; 452 beyond
    max_connections: int = 1000                   # overall; 421 beyond
    max_connections_per_ip: int = 50              # 421 beyond
    idle_timeout: float = 300.0                   # seconds waiting for a command (RFC 5321 4.5.3.2.7)
    data_timeout: float = 600.0                   # seconds waiting for message data (4.5.3.2.6: 3 min per block)
    max_errors: int = 20                          # errors per session before 421 and close
    bare_newlines: str = "normalize"              # "normalize" | "reject"
    pregreet_wait: float = 0.0                    # seconds to listen before the banner
    auth_failure_delay: float = 1.0               # first failed AUTH from an IP waits this long; doubles, max 30 s
    plugin_timeout: float = 30.0                  # seconds a stage waits for its plugins; then 451 4.3.0


@dataclass(frozen=True)
class Retry:
    initial: float = 300.0          # first retry after this many seconds
    maximum: float = 4200.0         # backoff cap
    lifetime: float = 5 * 86400.0   # give up (bounce) after this long in the queue
    concurrency: int = 32           # deliveries (backend calls) in progress at once
    delay_warning: float = 4 * 3600.0   # "delayed" DSN after this long in the queue (0: never)


@dataclass(frozen=True)
class DNSSettings:
    #: "host" or "host:port" ("[v6]:port"); empty = the system's /etc/resolv.conf
    nameservers: tuple[str, ...] = ()
    timeout: float = 5.0        # seconds per attempt
    attempts: int = 2
    #: look up each client's name (PTR, confirmed by A/AAAA); False: every client is "unknown"
    reverse_lookup: bool = True
    #: read before DNS for client names; "" for none
    hosts_file: str = "/etc/hosts"
    #: seconds one SMTP session may wait for DNS in all (its lookups together); 0 = no bound
    session_budget: float = 10.0
    #: answers kept by the resolver's cache at most; 0 = no cache
    cache_entries: int = 10000
    #: seconds a failed lookup (timeout, SERVFAIL) is remembered; 0 = not at all
    failure_ttl: float = 30.0


@dataclass(frozen=True)
class Route:
    #: "*" (everything), "example.org" / "@example.org" (a domain), or "user@example.org"
    match: str
    #: key of the backend in Config.backends
    backend: str

    def matches(self, address: str) -> bool:
        m = self.match.lower()
        if m == "*":
            return True
        local, _, domain = address.rpartition("@")
        if "@" in m and not m.startswith("@"):
            m_local, _, m_domain = m.rpartition("@")
            return local.lower() == m_local and domain_key(domain) == domain_key(m_domain)
        return domain_key(domain) == domain_key(m.lstrip("@"))


@dataclass(frozen=True)
class PluginInstance:
    #: config name ([plugins.NAME]) and what it was created from (short name or dotted path)
    name: str
    use: str
    obj: Any


@dataclass
class Config:
    #: path of the TOML file, or "<embedded default>"
    source: str
    hostname: str
    domains: tuple[str, ...]
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    spool_dir: str
    listeners: tuple[Listener, ...]
    limits: Limits = field(default_factory=Limits)
    retry: Retry = field(default_factory=Retry)
    #: spool durability: "fsync" (per file + directory) or "syncfs" (one syncfs per batch)
    spool_sync: str = "fsync"
    #: bodies up to this many bytes stay in memory until their commit; larger
    #: ones (and every body, with 0) stream into a temp file in the spool
    #: (pymta.spool.writer.MEMORY_BODY_LIMIT is the same default)
    spool_memory_limit: int = 64 * 1024
    #: where the spool's and local deliveries' file work runs: "process" (a
    #: child process, pymta.worker.process) or "threads" (in this process)
    spool_disk_work: str = "process"
    #: stage name -> plugins in order ("connect", "helo", "mail", "rcpt", "data")
    stages: dict[str, tuple[PluginInstance, ...]] = field(default_factory=dict)
    #: backend name -> IDeliveryBackend provider
    backends: dict[str, Any] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    dns: DNSSettings = field(default_factory=DNSSettings)
    tls: TLSSettings | None = None
    #: the shared pymta.dns.resolver.DNSResolver built from ``dns``
    resolver: Any = None
    #: on stop (SIGTERM), how long transactions in flight may take to finish
    #: before their sessions are closed with 421 ([server] shutdown_timeout)
    shutdown_timeout: float = 30.0
    #: [shared]: state shared between nodes (Redis), and its client (None without redis)
    shared: SharedSettings = field(default_factory=SharedSettings)
    shared_state: Any = None
    #: where the Prometheus metrics are served (a Twisted server endpoint
    #: string, [metrics] endpoint), or None: no metrics
    metrics_endpoint: str | None = None
    #: the log's lines: "text" (twistd's format) or "json" (pymta.logjson) ([log] format)
    log_format: str = "text"
    #: the control socket of ``pymta queue`` ([control] socket; pymta.config.control)
    control_socket: str = ""

    def is_local_domain(self, domain: str) -> bool:
        return domain_key(domain) in self.domains

    def is_trusted(self, ip: str) -> bool:
        addr = ip_address(ip)
        if addr is None:
            return False
        return any(addr in net for net in self.trusted_networks)

    def route_for(self, address: str) -> str | None:
        for route in self.routes:
            if route.matches(address):
                return route.backend
        return None
