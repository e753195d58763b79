"""The server's metrics: one ``prometheus_client`` registry and the events that move it.

A :class:`ServerMetrics` is the server's events sink: the layers that see
an event happen (the SMTP adapter, the plugin chain, the scheduler, the
spool's pipelines) call one method of it, if they were given one.  With
metrics off they are given ``None`` and pay one ``is not None`` test.

Every server has a registry of its own (not ``prometheus_client``'s
global one), so tests and servers in one process never share counts.
Label values come from the configuration (listener, backend and plugin
names) or from short fixed lists (stages, outcomes, results), so the
number of series stays bounded.  Labelled children are kept in plain
dicts: ``metric.labels(...)`` takes a lock and builds a key on every call.
"""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.process_collector import ProcessCollector

#: seconds a plugin takes (most answer from memory; DNS-bound ones take milliseconds)
PLUGIN_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0, 10.0, 30.0)
#: seconds one backend call takes (a local write to a remote SMTP transaction)
ATTEMPT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0, 120.0, 300.0)
#: seconds from arrival to delivery (Postfix's delay=): sub-second to the queue lifetime
DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
                 3600.0, 4 * 3600.0, 86400.0, 5 * 86400.0)
#: changes one batch of the spool's group commit applies
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: seconds a spool batch or a commit takes (an fsync or two)
SPOOL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

#: how a recipient's attempt ended: the scheduler's log status -> the label
RECIPIENT_STATUS = {"sent": "delivered", "deferred": "deferred", "bounced": "bounced"}


def _children(metric) -> Callable[..., Any]:
    """``metric.labels(*values)``, remembered per values (no lock after the first call)."""
    cache: dict[tuple, Any] = {}

    def child(*values):
        found = cache.get(values)
        if found is None:
            found = cache[values] = metric.labels(*values)
        return found
    return child


class ServerMetrics:
    """The server's registry, its instruments, and one method per event."""

    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        # no "<name>_created" sample beside every counter and histogram: it doubles
        # the series and scrapers of the text format keep it as a gauge of its own
        # (a switch of prometheus_client for the whole process: pymta's own)
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        if process:       # process_cpu_seconds_total, process_resident_memory_bytes, ...
            ProcessCollector(registry=r)
        # prometheus_client adds "_total" to a Counter's name
        self._connections = _children(Counter(
            "pymta_connections", "SMTP connections accepted, by listener", ["listener"], registry=r))
        self._sessions = _children(Counter(
            "pymta_sessions", "SMTP sessions ended, by listener and how they ended",
            ["listener", "outcome"], registry=r))
        self._rejected = _children(Counter(
            "pymta_smtp_rejected_commands",
            "Commands refused (the NOQUEUE: reject log lines, and failed AUTH), by stage and "
            "reply code class", ["stage", "code_class"], registry=r))
        self._messages = _children(Counter(
            "pymta_messages_accepted", "Messages accepted (250 after end of data), by listener",
            ["listener"], registry=r))
        self._bytes = _children(Counter(
            "pymta_received_bytes", "Bytes of accepted messages, by listener",
            ["listener"], registry=r))
        self._tls = _children(Counter(
            "pymta_tls_handshakes", "Server TLS handshakes (STARTTLS and implicit TLS), by "
            "listener and result (ok, failed)", ["listener", "result"], registry=r))
        self._auth = _children(Counter(
            "pymta_auth_attempts", "SMTP AUTH attempts, by mechanism and result "
            "(success, failure, error)", ["mechanism", "result"], registry=r))
        self._plugin_seconds = _children(Histogram(
            "pymta_plugin_duration_seconds", "Time one plugin took to answer, by stage and plugin",
            ["stage", "plugin"], buckets=PLUGIN_BUCKETS, registry=r))
        self._recipients = _children(Counter(
            "pymta_delivery_recipients", "Recipient delivery attempts, by backend and result "
            "(delivered, deferred, bounced)", ["backend", "status"], registry=r))
        self._attempt_seconds = _children(Histogram(
            "pymta_delivery_attempt_duration_seconds", "Time one backend call took, by backend",
            ["backend"], buckets=ATTEMPT_BUCKETS, registry=r))
        self._delay_seconds = _children(Histogram(
            "pymta_delivery_delay_seconds", "Time from a message's arrival to the delivery of a "
            "recipient, by backend", ["backend"], buckets=DELAY_BUCKETS, registry=r))
        self._batch_changes = _children(Histogram(
            "pymta_spool_batch_changes", "Changes applied by one batch of the spool's group "
            "commit (in the disk worker), by kind (commits, updates, removals)", ["kind"],
            buckets=BATCH_BUCKETS, registry=r))
        self._batch_seconds = _children(Histogram(
            "pymta_spool_batch_duration_seconds", "Time one spool batch took to apply, by kind",
            ["kind"], buckets=SPOOL_BUCKETS, registry=r))
        self._commit_seconds = Histogram(
            "pymta_spool_commit_duration_seconds", "Time from a message's commit request to it "
            "being durable (what the 250 waits for)", buckets=SPOOL_BUCKETS, registry=r)

    # -- SMTP sessions ---------------------------------------------------------
    def connection(self, listener: str) -> None:
        self._connections(listener).inc()

    def session_ended(self, listener: str, outcome: str) -> None:
        self._sessions(listener, outcome).inc()

    def command_rejected(self, stage: str, code: int) -> None:
        self._rejected(stage, f"{code // 100}xx").inc()

    def message_accepted(self, listener: str, size: int) -> None:
        self._messages(listener).inc()
        self._bytes(listener).inc(size)

    def tls_handshake(self, listener: str, ok: bool) -> None:
        self._tls(listener, "ok" if ok else "failed").inc()

    def auth_attempt(self, mechanism: str, result: str) -> None:
        self._auth(mechanism, result).inc()

    def plugin_time(self, stage: str, plugin: str, seconds: float) -> None:
        self._plugin_seconds(stage, plugin).observe(seconds)

    # -- delivery ------------------------------------------------------------------
    def delivery_attempt(self, backend: str, seconds: float) -> None:
        self._attempt_seconds(backend).observe(seconds)

    def recipient_result(self, backend: str, status: str, delay: float) -> None:
        """One recipient's attempt ended with the scheduler's ``status`` (sent, deferred,
        bounced), ``delay`` seconds after its message arrived."""
        label = RECIPIENT_STATUS.get(status, "deferred")
        self._recipients(backend, label).inc()
        if label == "delivered":
            self._delay_seconds(backend).observe(delay)

    # -- the spool -------------------------------------------------------------------
    def spool_batch(self, kind: str, changes: int, seconds: float) -> None:
        self._batch_changes(kind).observe(changes)
        self._batch_seconds(kind).observe(seconds)

    def spool_commit(self, seconds: float) -> None:
        self._commit_seconds.observe(seconds)
