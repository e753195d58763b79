"""A session's DNS time budget: all its lookups together wait at most ``[dns] session_budget``.

Each SMTP session gets a :class:`SessionResolver` (``session.dns``): the
shared :class:`pymta.dns.resolver.DNSResolver` seen through a budget.  The
budget is spent while at least one lookup of the session is waiting for its
answer (lookups in parallel spend it once, not once each; the time between
lookups is free).  When it is used up, every lookup still waiting, and every
lookup asked afterwards, fails at once with a temporary
:class:`pymta.dns.resolver.DNSError` ("DNS time budget of this session used
up"), which each check turns into its usual answer for a DNS error: the
client's name is ``unknown``, a DNSBL is skipped, SPF gives temperror.

The queries themselves are not cancelled: they go on in the shared resolver
for the other sessions that ask the same names, and their answer (or
failure) is cached for the next session.

One timer per session, and only while a lookup is waiting.  When the
session ends (:meth:`SessionResolver.close`) the timer goes; a lookup still
waiting gets its answer when the shared resolver has it, and a lookup asked
afterwards (a check still running for a client that left) fails at once,
without a query.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from pymta.dns.resolver import DNSError
from pymta.handoff import handed_off

__all__ = ["SessionResolver", "BUDGET_USED_UP", "SESSION_CLOSED"]

log = Logger(namespace="pymta.dns")

BUDGET_USED_UP = "DNS time budget of this session used up"
SESSION_CLOSED = "the session is closed"


class SessionResolver:
    """The lookups of :class:`pymta.dns.resolver.DNSResolver`, within one session's budget.

    ``resolver``: the shared resolver; ``budget``: seconds; ``reactor``: for
    the clock and the timer; ``label``: names the session in the log line
    written when the budget runs out.
    """

    # one per session: no instance dict
    __slots__ = ("resolver", "budget", "reactor", "label", "spent", "_waiting", "_busy_since",
                 "_timer", "_exhausted", "_closed")

    def __init__(self, resolver, budget: float, reactor, label: str = "") -> None:
        self.resolver = resolver
        self.budget = budget
        self.reactor = reactor
        self.label = label
        #: seconds of the budget spent by lookups that are no longer waiting
        self.spent = 0.0
        self._waiting: list[tuple[Deferred, str, str]] = []
        self._busy_since = 0.0
        self._timer = None
        self._exhausted = False
        self._closed = False

    # -- the budget -------------------------------------------------------------
    def remaining(self) -> float:
        """Seconds of the budget left now."""
        used = self.spent
        if self._waiting:
            used += self.reactor.seconds() - self._busy_since
        return max(0.0, self.budget - used)

    @property
    def exhausted(self) -> bool:
        return self._exhausted or self.remaining() <= 0

    def _start(self, d: Deferred, name: str, rtype: str) -> None:
        if not self._waiting:
            self._busy_since = self.reactor.seconds()
            # every waiting lookup spends the budget at the same rate: it runs
            # out at one moment, known now
            self._timer = self.reactor.callLater(self.budget - self.spent, self._run_out)
        self._waiting.append((d, name, rtype))

    def _finish(self, d: Deferred) -> None:
        before = len(self._waiting)
        self._waiting = [w for w in self._waiting if w[0] is not d]
        if before and not self._waiting:
            self.spent += self.reactor.seconds() - self._busy_since
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _run_out(self) -> None:
        self._timer = None
        self._exhausted = True
        waiting, self._waiting = self._waiting, []
        self.spent = self.budget
        log.info("{label}DNS time budget of {budget:g}s used up; {count} lookup(s) given up, "
                 "further lookups of this session fail at once",
                 label=f"{self.label}: " if self.label else "", budget=self.budget, count=len(waiting))
        for d, name, rtype in waiting:
            if not d.called:
                d.errback(DNSError(name, rtype, BUDGET_USED_UP))

    def close(self) -> None:
        """The session is over: no timer left behind, no new query (see the module)."""
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- lookups ----------------------------------------------------------------
    def _lookup(self, method: str, name: str, rtype: str) -> Deferred:
        if self._closed:
            return _failed(DNSError(name, rtype, SESSION_CLOSED))
        if self.exhausted:
            self._exhausted = True
            return _failed(DNSError(name, rtype, BUDGET_USED_UP))
        inner = getattr(self.resolver, method)(name)
        if inner.called:                     # cached: no wait, no budget spent
            return inner
        out = handed_off(inner, canceller=self._finish, before=lambda: self._finish(out))
        self._start(out, name, rtype)
        return out

    def mx(self, name: str) -> Deferred:
        return self._lookup("mx", name, "MX")

    def a(self, name: str) -> Deferred:
        return self._lookup("a", name, "A")

    def a_with_ttl(self, name: str) -> Deferred:
        return self._lookup("a_with_ttl", name, "A")

    def aaaa(self, name: str) -> Deferred:
        return self._lookup("aaaa", name, "AAAA")

    def txt(self, name: str) -> Deferred:
        return self._lookup("txt", name, "TXT")

    def txt_with_ttl(self, name: str) -> Deferred:
        return self._lookup("txt_with_ttl", name, "TXT")

    def ptr(self, name: str) -> Deferred:
        return self._lookup("ptr", name, "PTR")


def _failed(error: Exception) -> Deferred:
    d: Deferred = Deferred()
    d.errback(error)
    return d
