"""Prometheus metrics of a running server (``[metrics] endpoint``; off by default).

- :mod:`pymta.metrics.instruments`: :class:`~pymta.metrics.instruments.ServerMetrics`,
  the server's own ``prometheus_client`` registry and the events that move
  its counters and histograms.  The server's layers get it as their
  ``events`` (``None`` when metrics are off: one ``is not None`` test is all
  they pay then) and never import this package.
- :mod:`pymta.metrics.families`: the counters and histograms as plain
  numbers (no lock per increment), turned into Prometheus families when a
  scrape asks.
- :mod:`pymta.metrics.queue`: what is read at scrape time instead of being
  counted (queue size by state and the oldest message's age, sessions
  open, deliveries in flight).
- :mod:`pymta.metrics.http`: the ``twisted.web`` resource and the service
  that listens on the endpoint.
"""
