"""What a scrape reads from the running server instead of counting it as it happens.

:class:`QueueCollector` is a ``prometheus_client`` custom collector: at each
scrape it walks the scheduler's messages once (on the reactor thread, where
the scrape is answered) and reports the queue by state and the age of its
oldest message, with the sessions open and the deliveries in flight.  The
hot path pays nothing for these.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

#: the scheduler's message states (DeliveryScheduler.message_states), as Postfix names its queues
QUEUE_STATES = ("incoming", "active", "deferred", "held")


class QueueCollector(Collector):
    """Queue size by state, oldest message age, sessions open, deliveries in flight."""

    def __init__(self, scheduler: Any, sessions_open: Callable[[], int],
                 now: Callable[[], float]) -> None:
        #: a pymta.delivery.scheduler.DeliveryScheduler
        self.scheduler = scheduler
        self.sessions_open = sessions_open
        self.now = now

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = dict.fromkeys(QUEUE_STATES, 0)
        oldest = None
        for state, envelope in self.scheduler.message_states():
            counts[state] = counts.get(state, 0) + 1
            if oldest is None or envelope.received_at < oldest:
                oldest = envelope.received_at
        messages = GaugeMetricFamily(
            "pymta_queue_messages", "Messages in the queue, by state: incoming (not tried yet), "
            "active (being delivered or due), deferred (waiting for a retry), held", labels=["state"])
        for state, count in counts.items():
            messages.add_metric([state], count)
        yield messages
        yield GaugeMetricFamily(
            "pymta_queue_oldest_message_age_seconds",
            "Age of the oldest message in the queue (0 when the queue is empty)",
            value=max(0.0, self.now() - oldest) if oldest is not None else 0.0)
        yield GaugeMetricFamily("pymta_deliveries_in_flight", "Backend calls in progress",
                                value=self.scheduler.in_flight)
        yield GaugeMetricFamily("pymta_sessions_open", "SMTP sessions open over all listeners",
                                value=self.sessions_open())

    def describe(self) -> list:
        return []       # not collected at registration (the scheduler may not be running yet)
