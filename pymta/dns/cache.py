"""The resolver's answer cache: positive and negative answers for their TTL, failures briefly.

One :class:`AnswerCache` per :class:`pymta.dns.resolver.DNSResolver`, keyed by
(query type, lower-cased name).  What it keeps:

* an answer with records, for the smallest TTL of those records;
* "no such name" / "no such record", for the negative TTL of the zone
  (RFC 2308 5, worked out by the resolver);
* a temporary failure (timeout, SERVFAIL, refused), for ``failure_ttl``
  seconds, so that while the nameservers are unreachable the sessions that
  ask for the same name do not each wait a full timeout for it (as unbound
  and Postfix's resolver caches remember a failed server or a SERVFAIL for a
  short while).

A TTL of 0 is not cached; no entry is kept longer than :data:`MAX_TTL`.
The cache holds at most ``entries`` entries: when full, the least recently
used one goes.  Expired entries are dropped when they are next asked for,
or when they reach the old end of the queue; no timers.

Why not ``twisted.names.cache.CacheResolver``: it keeps positive answers
only (a negative answer has TTL 0 there), never failures, has no size bound,
and starts one reactor timer per entry.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

__all__ = ["AnswerCache", "MAX_TTL"]

#: the longest any answer is kept, whatever its TTL (a day, as unbound's cache-max-ttl)
MAX_TTL = 86400


@dataclass(frozen=True)
class _Entry:
    expires: float
    #: the cached values (a list), or None for a failure
    values: list | None
    #: for a failure: the DNSError to raise again
    error: Exception | None = None


class AnswerCache:
    """Answers and failures by (rtype, name), for their TTL, at most ``entries`` of them."""

    def __init__(self, clock: Callable[[], float], entries: int = 10000,
                 failure_ttl: float = 30.0) -> None:
        self.clock = clock
        self.entries = entries
        self.failure_ttl = failure_ttl
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, rtype: str, name: str) -> tuple[list, int] | Exception | None:
        """(values, seconds left) for a cached answer, the error for a cached
        failure, or None when nothing (unexpired) is cached."""
        key = (rtype, name.lower())
        entry = self._entries.get(key)
        if entry is None:
            return None
        left = entry.expires - self.clock()
        if left <= 0:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        if entry.values is None:
            return entry.error
        return list(entry.values), max(1, int(left))

    def put(self, rtype: str, name: str, values: list, ttl: float) -> None:
        """Keep ``values`` (an answer, [] for "no such name/record") for ``ttl`` seconds."""
        self._put(rtype, name, _Entry(0, list(values)), ttl)

    def put_failure(self, rtype: str, name: str, error: Exception) -> None:
        """Remember a temporary failure for ``failure_ttl`` seconds."""
        self._put(rtype, name, _Entry(0, None, error), self.failure_ttl)

    def _put(self, rtype: str, name: str, entry: _Entry, ttl: float) -> None:
        ttl = min(ttl, MAX_TTL)
        if ttl <= 0 or self.entries <= 0:
            return
        key = (rtype, name.lower())
        now = self.clock()
        self._entries[key] = _Entry(now + ttl, entry.values, entry.error)
        self._entries.move_to_end(key)
        while len(self._entries) > self.entries:
            self._entries.popitem(last=False)
        # drop expired entries at the old end (cheap: stops at the first live one)
        while self._entries:
            oldest_key, oldest = next(iter(self._entries.items()))
            if oldest.expires > now:
                break
            del self._entries[oldest_key]
