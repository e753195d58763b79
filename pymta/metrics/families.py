"""Counters and histograms kept as plain numbers, turned into Prometheus families at scrape time.

``prometheus_client``'s own Counter and Histogram take a lock on every
increment (they may be shared between threads): 2 µs an increment on this
machine, about 70 µs a message for the ten or so events a message makes,
7 % of the server's CPU per message.  Every pymta event happens on the
reactor thread, so these keep a dict of numbers per family instead (a
dict update, a ``bisect`` for a histogram) and build the
``CounterMetricFamily`` / ``HistogramMetricFamily`` only when a scrape
asks, also on the reactor thread (see :mod:`pymta.metrics.http`).
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class CounterFamily:
    """A counter with labels: ``inc(values)``, ``values`` a tuple in ``labels`` order."""

    __slots__ = ("name", "documentation", "labels", "counts")

    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        #: without "_total": the exposition adds it
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        #: label values -> count; a counter without labels is there from the start (0)
        self.counts: dict[tuple[str, ...], float] = {} if self.labels else {(): 0}

    def inc(self, values: tuple[str, ...], amount: float = 1) -> None:
        counts = self.counts
        counts[values] = counts.get(values, 0) + amount

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, count in self.counts.items():
            family.add_metric(values, count)
        return family


class HistogramFamily:
    """A histogram with labels: ``observe(values, amount)``."""

    __slots__ = ("name", "documentation", "labels", "bounds", "series")

    def __init__(self, name: str, documentation: str, labels: Sequence[str],
                 buckets: Sequence[float]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        #: upper bounds, ascending (+Inf is implied)
        self.bounds = tuple(float(b) for b in buckets)
        #: label values -> [count per bucket (not cumulative), ..., count above the last, sum]
        #: (a histogram without labels is there from the start, empty)
        self.series: dict[tuple[str, ...], list[float]] = {} if self.labels else {(): self._row()}

    def _row(self) -> list[float]:
        return [0] * (len(self.bounds) + 1) + [0.0]

    def observe(self, values: tuple[str, ...], amount: float) -> None:
        row = self.series.get(values)
        if row is None:
            row = self.series[values] = self._row()
        row[bisect_left(self.bounds, amount)] += 1      # the first bound >= amount
        row[-1] += amount

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        edges = [floatToGoString(b) for b in self.bounds] + ["+Inf"]
        for values, row in self.series.items():
            cumulative, buckets = 0, []
            for edge, count in zip(edges, row):
                cumulative += count
                buckets.append((edge, cumulative))
            family.add_metric(values, buckets, sum_value=row[-1])
        return family


class FamiliesCollector(Collector):
    """A registry's view of some families (read on the reactor thread, like their updates)."""

    def __init__(self, families: Sequence[CounterFamily | HistogramFamily]) -> None:
        self.families = tuple(families)

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.family()
