"""The [metrics] table: where the Prometheus metrics are served (off without it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pymta.config.listeners import endpoint_problem
from pymta.config.options import Options


def read_metrics(builder, table: Mapping[str, Any] | None) -> str | None:
    """[metrics] endpoint: a Twisted server endpoint string, or None (no metrics)."""
    if table is None:
        return None
    with builder.section("metrics"):
        opts = Options(table)
        endpoint = opts.str("endpoint", default=None)
        opts.finish()
    if endpoint is None:
        return None
    problem = endpoint_problem(builder.reactor, endpoint)
    if problem:
        builder.fail("metrics.endpoint", problem)
    return endpoint
