"""Which backends a reload may close: the backend calls in flight, by the backends they started with.

A reload (:meth:`pymta.delivery.scheduler.DeliveryScheduler.reconfigure`)
gives the scheduler new backends; the deliveries in flight finish with the
ones they started with, which may be closed only once none of them is in
flight any more.  :class:`BackendsInUse` counts the calls in flight per
backends mapping and fires a Deferred when a replaced one is unused.
"""

from __future__ import annotations

import collections
from typing import Any

from twisted.internet import defer


class BackendsInUse:
    """Backend calls in flight per backends mapping (by identity)."""

    def __init__(self) -> None:
        #: id(backends dict) -> backend calls in flight started with it
        self._calls: collections.Counter[int] = collections.Counter()
        #: id(backends dict) -> Deferreds to fire with it once it is unused
        self._waiting: dict[int, list[defer.Deferred]] = {}

    def started(self, backends: Any) -> None:
        """A backend call starts with ``backends``."""
        self._calls[id(backends)] += 1

    def ended(self, backends: Any) -> None:
        """A call started with ``backends`` ended; fires the waits for it if it was the last."""
        key = id(backends)
        self._calls[key] -= 1
        if not self._calls[key]:
            del self._calls[key]
            for d in self._waiting.pop(key, ()):
                d.callback(backends)

    def unused(self, previous: Any, current: Any) -> defer.Deferred:
        """Fires with ``previous`` (replaced by ``current``) once no call started with it is in flight."""
        d = defer.Deferred()
        if previous is current or not self._calls[id(previous)]:
            self._calls.pop(id(previous), None)
            d.callback(previous)
        else:
            self._waiting.setdefault(id(previous), []).append(d)
        return d
