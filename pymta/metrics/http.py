"""The metrics over HTTP: a ``twisted.web`` resource on ``[metrics] endpoint``.

``GET /metrics`` answers in Prometheus' text format (or OpenMetrics when the
scraper asks for it in ``Accept``), generated on the reactor thread: the
collectors read the scheduler, which only that thread may touch.  Every
other path is 404.  Scrapes are not logged (a scraper every 15 s would fill
the log).  There is no authentication: bind it to loopback, or to an
address only the scraper reaches.
"""

from __future__ import annotations

import sys
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from twisted.application.internet import StreamServerEndpointService
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Site

from pymta.metrics.instruments import ServerMetrics
from pymta.metrics.queue import QueueCollector

log = Logger(namespace="pymta.metrics")


class MetricsResource(Resource):
    """``/metrics``: the registry in the exposition format the scraper accepts."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request) -> bytes:
        accept = request.getHeader("accept") or ""
        encoder, content_type = choose_encoder(accept)
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        return encoder(self.registry)

    render_HEAD = render_GET


class QuietSite(Site):
    """A Site that writes no access-log line per request and no factory start/stop lines."""

    noisy = False

    def log(self, request) -> None:
        pass


def metrics_site(registry: CollectorRegistry) -> Site:
    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    return QuietSite(root)


class MetricsService(StreamServerEndpointService):
    """Listens on ``[metrics] endpoint``; a port it cannot bind stops start-up with one line."""

    _raiseSynchronously = True

    def __init__(self, reactor, endpoint: str, registry: CollectorRegistry) -> None:
        super().__init__(serverFromString(reactor, endpoint), metrics_site(registry))
        self.description = endpoint
        self.setName("metrics")

    def startService(self) -> None:
        super().startService()
        log.info("metrics served on {endpoint} at /metrics", endpoint=self.description)

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            sys.__stderr__.write(f"pymta: cannot listen: metrics.endpoint ({self.description}): "
                                 f"{e.socketError}\n")
            raise SystemExit(1)


def metrics_service(reactor, endpoint: str, metrics: ServerMetrics, scheduler: Any,
                    sessions_open) -> MetricsService:
    """The service serving ``metrics`` on ``endpoint``, the queue read from ``scheduler``
    and the open sessions from ``sessions_open()`` at each scrape."""
    metrics.registry.register(QueueCollector(scheduler, sessions_open, reactor.seconds))
    return MetricsService(reactor, endpoint, metrics.registry)
