"""The server's metrics: one ``prometheus_client`` registry and the events that move it.

A :class:`ServerMetrics` is the server's events sink: the layers that see
an event happen (the SMTP adapter, the plugin chain, the scheduler, the
spool's pipelines) call one method of it, if they were given one.  With
metrics off they are given ``None`` and pay one ``is not None`` test.
The numbers are kept by :mod:`pymta.metrics.families` (no lock per
increment) and every method is called on the reactor thread.

Every server has a registry of its own (not ``prometheus_client``'s
global one), so tests and servers in one process never share counts.
Label values come from the configuration (listener, backend and plugin
names) or from short fixed lists (stages, outcomes, results), so the
number of series stays bounded.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.process_collector import ProcessCollector

from pymta.metrics.families import CounterFamily, FamiliesCollector, HistogramFamily

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


class ServerMetrics:
    """The server's registry, its metric families, and one method per event."""

    def __init__(self, registry: CollectorRegistry | None = None, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        if process:       # process_cpu_seconds_total, process_resident_memory_bytes, ...
            ProcessCollector(registry=self.registry)
        # counters are named without "_total": the exposition adds it
        self._connections = CounterFamily(
            "pymta_connections", "SMTP connections accepted, by listener", ["listener"])
        self._sessions = CounterFamily(
            "pymta_sessions", "SMTP sessions ended, by listener and how they ended",
            ["listener", "outcome"])
        self._rejected = CounterFamily(
            "pymta_smtp_rejected_commands", "Commands refused (the NOQUEUE: reject log lines, "
            "and failed AUTH), by stage and reply code class", ["stage", "code_class"])
        self._protocol_errors = CounterFamily(
            "pymta_smtp_protocol_errors", "Error replies of the protocol itself (syntax, "
            "sequence, line length, TLS or AUTH required), by listener", ["listener"])
        self._messages = CounterFamily(
            "pymta_messages_accepted", "Messages accepted (250 after end of data), by listener",
            ["listener"])
        self._bytes = CounterFamily(
            "pymta_received_bytes", "Bytes of accepted messages, by listener", ["listener"])
        self._tls = CounterFamily(
            "pymta_tls_handshakes", "Server TLS handshakes (STARTTLS and implicit TLS), by "
            "listener and result (ok, failed)", ["listener", "result"])
        self._auth = CounterFamily(
            "pymta_auth_attempts", "SMTP AUTH attempts, by mechanism and result "
            "(success, failure, error)", ["mechanism", "result"])
        self._plugin_seconds = HistogramFamily(
            "pymta_plugin_duration_seconds", "Time one plugin took to answer, by stage and plugin",
            ["stage", "plugin"], PLUGIN_BUCKETS)
        self._recipients = CounterFamily(
            "pymta_delivery_recipients", "Recipient delivery attempts, by backend and result "
            "(delivered, deferred, bounced)", ["backend", "status"])
        self._attempt_seconds = HistogramFamily(
            "pymta_delivery_attempt_duration_seconds", "Time one backend call took, by backend",
            ["backend"], ATTEMPT_BUCKETS)
        self._delay_seconds = HistogramFamily(
            "pymta_delivery_delay_seconds", "Time from a message's arrival to the delivery of a "
            "recipient, by backend", ["backend"], DELAY_BUCKETS)
        self._batch_changes = HistogramFamily(
            "pymta_spool_batch_changes", "Changes applied by one batch of the spool's group "
            "commit (in the disk worker), by kind (commits, updates, removals)", ["kind"],
            BATCH_BUCKETS)
        self._batch_seconds = HistogramFamily(
            "pymta_spool_batch_duration_seconds", "Time one spool batch took to apply, by kind",
            ["kind"], SPOOL_BUCKETS)
        self._commit_seconds = HistogramFamily(
            "pymta_spool_commit_duration_seconds", "Time from a message's commit request to it "
            "being durable (what the 250 waits for)", [], SPOOL_BUCKETS)
        self.registry.register(FamiliesCollector([
            self._connections, self._sessions, self._rejected, self._protocol_errors,
            self._messages, self._bytes,
            self._tls, self._auth, self._plugin_seconds, self._recipients, self._attempt_seconds,
            self._delay_seconds, self._batch_changes, self._batch_seconds, self._commit_seconds]))

    # -- SMTP sessions ---------------------------------------------------------
    def connection(self, listener: str) -> None:
        self._connections.inc((listener,))

    def session_ended(self, listener: str, outcome: str) -> None:
        self._sessions.inc((listener, outcome))

    def command_rejected(self, stage: str, code: int) -> None:
        self._rejected.inc((stage, "5xx" if code >= 500 else "4xx"))

    def protocol_errors(self, listener: str, count: int) -> None:
        self._protocol_errors.inc((listener,), count)

    def message_accepted(self, listener: str, size: int) -> None:
        self._messages.inc((listener,))
        self._bytes.inc((listener,), size)

    def tls_handshake(self, listener: str, ok: bool) -> None:
        self._tls.inc((listener, "ok" if ok else "failed"))

    def auth_attempt(self, mechanism: str, result: str) -> None:
        self._auth.inc((mechanism, result))

    def plugin_answered(self, stage: str, plugin: Any, outcome: Any, seconds: float) -> None:
        """A stage observer (pymta.server.chain.StageObserver): the plugin's time, by its name."""
        self._plugin_seconds.observe((stage, plugin.name), seconds)

    # -- delivery ------------------------------------------------------------------
    def delivery_attempt(self, backend: str, seconds: float) -> None:
        self._attempt_seconds.observe((backend,), seconds)

    def recipient_result(self, backend: str, status: str, delay: float) -> None:
        """One recipient's attempt ended with the scheduler's ``status`` (sent, deferred,
        bounced), ``delay`` seconds after its message arrived."""
        label = RECIPIENT_STATUS.get(status, "deferred")
        self._recipients.inc((backend, label))
        if label == "delivered":
            self._delay_seconds.observe((backend,), delay)

    # -- the spool -------------------------------------------------------------------
    def spool_batch(self, kind: str, changes: int, seconds: float) -> None:
        self._batch_changes.observe((kind,), changes)
        self._batch_seconds.observe((kind,), seconds)

    def spool_commit(self, seconds: float) -> None:
        self._commit_seconds.observe((), seconds)
