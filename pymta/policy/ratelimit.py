"""The ``ratelimit`` plugin: connections, messages and recipients per client and user.

List one instance in the stages it should count (connect, mail, rcpt; put it
before the recipient validators in rcpt)::

    [plugins.ratelimit]
    window = "1m"
    connections_per_ip = 60      # connect stage: 421 4.7.0 and the connection is closed
    messages_per_ip = 100        # MAIL: 451 4.7.1
    messages_per_user = 500      #   (authenticated sessions count per user, not per IP)
    recipients_per_ip = 500      # RCPT: 451 4.5.3
    recipients_per_user = 2000

A limit of 0 (the default) means unlimited.  Counting is a sliding window
(the previous fixed window's count weighted by how much of it still
overlaps, plus the current one's): at most N accepted events in any span of
``window``, give or take the approximation, with two numbers per key.  Only
events the plugin lets through are counted, so a refused client that keeps
trying is not locked out for longer.  Keys whose windows are over are
dropped on the next sweep (at most once per window), and at most
``max_keys`` keys are kept (the least recently used go first), so memory
stays bounded.  Trusted networks are exempt unless ``exempt_trusted = false``.

With ``[shared] redis`` set, the counts are kept in Redis, so that every
node behind one MX name counts against one limit (two numbers per key and
window, with a TTL; one atomic script per decision).  While Redis cannot
answer, each node decides from its own counts, which it keeps all along
(see :mod:`pymta.shared_state`): mail is never refused because Redis is down.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pymta.plugin_api import (DUNNO, IConnectPolicy, IRecipientPolicy, ISenderPolicy, Options,
                              Session, Transaction, Verdict, format_duration)

__all__ = ["RateLimit", "SlidingWindowCounter", "SHARED_WINDOW_SCRIPT"]

log = Logger(namespace="pymta.ratelimit")


class SlidingWindowCounter:
    """Events per key in a sliding window of ``window`` seconds, memory bounded."""

    def __init__(self, window: float, max_keys: int = 100_000, clock=time.monotonic) -> None:
        if window <= 0:
            raise ValueError("window must be positive")
        self.window = window
        self.max_keys = max_keys
        self.clock = clock
        #: key -> [window index, count in that window, count in the one before]
        self._counts: OrderedDict[Any, list] = OrderedDict()
        self._last_sweep = -1

    def __len__(self) -> int:
        return len(self._counts)

    def _index(self, now: float) -> int:
        return math.floor(now / self.window)

    def current(self, key: Any) -> float:
        """The estimated number of events for ``key`` in the window ending now."""
        now = self.clock()
        index = self._index(now)
        slot = self._counts.get(key)
        if slot is None:
            return 0.0
        self._roll(slot, index)
        overlap = 1.0 - (now / self.window - index)
        return slot[2] * overlap + slot[1]

    def allow(self, key: Any, limit: int) -> bool:
        """Count one event for ``key`` unless that would exceed ``limit``; say whether it did."""
        self._sweep()
        if self.current(key) + 1 > limit:
            return False
        index = self._index(self.clock())
        slot = self._counts.get(key)
        if slot is None:
            slot = self._counts[key] = [index, 0, 0]
        self._roll(slot, index)
        slot[1] += 1
        self._counts.move_to_end(key)
        while len(self._counts) > self.max_keys:
            self._counts.popitem(last=False)
        return True

    @staticmethod
    def _roll(slot: list, index: int) -> None:
        if slot[0] == index:
            return
        slot[2] = slot[1] if slot[0] == index - 1 else 0
        slot[1] = 0
        slot[0] = index

    def _sweep(self) -> None:
        """Drop keys whose last event is more than a window behind (once per window)."""
        index = self._index(self.clock())
        if index == self._last_sweep:
            return
        self._last_sweep = index
        stale = [key for key, slot in self._counts.items() if slot[0] < index - 1]
        for key in stale:
            del self._counts[key]


#: one sliding-window decision in Redis: KEYS = this window's count, the previous
#: window's; ARGV = weight of the previous window, limit, TTL.  1 = counted, 0 = over.
SHARED_WINDOW_SCRIPT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local previous = tonumber(redis.call('GET', KEYS[2]) or '0')
if previous * tonumber(ARGV[1]) + current + 1 > tonumber(ARGV[2]) then
  return 0
end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return 1
"""


@implementer(IConnectPolicy, ISenderPolicy, IRecipientPolicy)
class RateLimit:
    def __init__(self, options: dict[str, Any], context: Any) -> None:
        opts = Options(options)
        self.window = opts.duration("window", default=60.0, above=0)
        self.limits = {name: opts.int(name, default=0, minimum=0) for name in (
            "connections_per_ip", "messages_per_ip", "messages_per_user",
            "recipients_per_ip", "recipients_per_user")}
        self.exempt_trusted = opts.bool("exempt_trusted", default=True)
        max_keys = opts.int("max_keys", default=100_000, minimum=1)
        opts.finish()
        clock = getattr(context.reactor, "seconds", None) or time.monotonic
        self.counters = {kind: SlidingWindowCounter(self.window, max_keys, clock)
                         for kind in ("connections", "messages", "recipients")}
        #: pymta.shared_state.SharedState when [shared] redis is set
        self.shared = getattr(context, "shared", None)
        self._wall_clock = time.time

    def _allow(self, kind: str, key: Any, limit: int) -> bool | defer.Deferred:
        """Count one event (see SlidingWindowCounter.allow); through Redis when shared."""
        if self.shared is None or not self.shared.available:
            return self.counters[kind].allow(key, limit)
        now = self._wall_clock()
        index = math.floor(now / self.window)
        weight = 1.0 - (now / self.window - index)
        who = f"{key[0]}:{key[1]}"
        keys = [self.shared.key("rl", kind, who, str(index)),
                self.shared.key("rl", kind, who, str(index - 1))]
        ttl = int(math.ceil(2 * self.window)) + 1
        d = self.shared.run(SHARED_WINDOW_SCRIPT, keys, [repr(weight), str(limit), str(ttl)])

        def counted(result: Any) -> bool:
            allowed = int(result) == 1
            if allowed:          # kept here too: the node's own counts, should Redis go away
                self.counters[kind].allow(key, 1 << 62)
            return allowed
        return d.addCallbacks(counted, lambda _failure: self.counters[kind].allow(key, limit))

    def _exempt(self, session: Session) -> bool:
        return self.exempt_trusted and session.trusted

    def _limit(self, kind: str, session: Session) -> tuple[Any, int, str]:
        """(key, limit, who) for this session: per user when authenticated, else per IP."""
        if session.auth_user:
            return ("user", session.auth_user), self.limits[f"{kind}_per_user"], \
                f"user {session.auth_user}"
        return ("ip", session.client_ip), self.limits[f"{kind}_per_ip"], f"[{session.client_ip}]"

    def _window_text(self) -> str:
        return format_duration(self.window)

    def check_connect(self, session: Session) -> Verdict:
        limit = self.limits["connections_per_ip"]
        if not limit or self._exempt(session):
            return DUNNO
        return _then(self._allow("connections", ("ip", session.client_ip), limit),
                     lambda: self._too_many_connections(session, limit))

    def _too_many_connections(self, session: Session, limit: int) -> Verdict:
        log.info("ratelimit: too many connections from [{ip}]", ip=session.client_ip)
        return Verdict.disconnect(f"Too many connections from [{session.client_ip}] "
                                  f"(at most {limit} per {self._window_text()}); try again later",
                                  421, "4.7.0")

    def check_sender(self, session: Session, transaction: Transaction) -> Verdict:
        key, limit, who = self._limit("messages", session)
        if not limit or self._exempt(session):
            return DUNNO
        return _then(self._allow("messages", key, limit),
                     lambda: self._too_many("messages", who, limit, "4.7.1"))

    def check_recipient(self, session: Session, transaction: Transaction, recipient: str) -> Verdict:
        key, limit, who = self._limit("recipients", session)
        if not limit or self._exempt(session):
            return DUNNO
        return _then(self._allow("recipients", key, limit),
                     lambda: self._too_many("recipients", who, limit, "4.5.3"))

    def _too_many(self, what: str, who: str, limit: int, enhanced: str) -> Verdict:
        log.info("ratelimit: too many {what} from {who}", what=what, who=who)
        return Verdict.defer(f"Too many {what} from {who} (at most {limit} per "
                             f"{self._window_text()}); try again later", 451, enhanced)


def _then(allowed: bool | defer.Deferred, refusal) -> Verdict | defer.Deferred:
    """DUNNO when the event was counted, else ``refusal()``; the same through a Deferred."""
    if isinstance(allowed, defer.Deferred):
        return allowed.addCallback(lambda ok: DUNNO if ok else refusal())
    return DUNNO if allowed else refusal()
