"""SMTP AUTH through twisted.cred: the realm, the portal, the failure delay."""

from __future__ import annotations

from collections import OrderedDict
from time import perf_counter
from typing import Iterable

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import fail, maybeDeferred
from zope.interface import Interface, implementer

from pymta.config.model import PluginInstance
from pymta.interfaces import STAGES
from pymta.server.chain import StageDeadline, StageObserver, observed_answer, within

MAX_DELAY = 30.0
FORGET_AFTER = 900.0        # a client's failures are forgotten after 15 quiet minutes
TRACKED_CLIENTS = 10000     # memory bound
AUTH = STAGES["auth"]      # ICredentialsChecker.requestAvatarId


class IAuthenticatedUser(Interface):
    """The avatar of an authenticated SMTP session: its user name (str)."""


@implementer(IRealm)
class SubmissionRealm:
    def requestAvatar(self, avatar_id, mind, *interfaces):
        if IAuthenticatedUser not in interfaces:
            raise NotImplementedError("pymta only hands out IAuthenticatedUser avatars")
        return IAuthenticatedUser, avatar_id, lambda: None


@implementer(ICredentialsChecker)
class CheckerChain:
    """The configured checkers in order: the first that knows the user decides.

    (A twisted.cred Portal keeps one checker per credentials interface, so
    several ``[stages] auth`` plugins are chained here.)  A checker that says
    UnauthorizedLogin passes the question on; any other failure stops the
    chain (a temporary error, 454).  With a ``deadline`` the chain has the
    same time budget as any other stage (``[limits] plugin_timeout``): a
    checker still pending when it runs out is logged by name, cancelled,
    and the login fails with :class:`~pymta.server.chain.PluginTimeout`.
    With an ``observer`` (the metrics' plugin timing) each checker's answer
    is reported, as the plugins' of the other stages are.
    """

    def __init__(self, checkers: list, deadline: StageDeadline | None = None,
                 observer: StageObserver | None = None) -> None:
        self.plugins = [_as_plugin(c) for c in checkers]
        self.checkers = [p.obj for p in self.plugins]
        self.deadline = deadline
        self.observer = observer
        self.credentialInterfaces = (IUsernamePassword,)

    def requestAvatarId(self, credentials):
        candidates = [p for p in self.plugins
                      if any(i.providedBy(credentials) for i in p.obj.credentialInterfaces)]
        deadline = self.deadline
        ends = deadline.clock.seconds() + deadline.seconds if deadline is not None else None

        def attempt(index: int):
            if index >= len(candidates):
                return fail(UnauthorizedLogin("authentication failed"))
            plugin = candidates[index]
            started = perf_counter()
            d = maybeDeferred(getattr(plugin.obj, AUTH.method), credentials)
            if self.observer is not None:
                d.addBoth(observed_answer, self.observer, "auth", plugin, started)
            if deadline is not None:
                d = within(d, deadline.clock, ends - deadline.clock.seconds(), plugin, "auth",
                           AUTH.method, deadline.seconds)
            return d.addErrback(lambda f: f.trap(UnauthorizedLogin) and attempt(index + 1))

        return attempt(0)


def _as_plugin(checker) -> PluginInstance:
    if isinstance(checker, PluginInstance):
        return checker
    name = type(checker).__name__
    return PluginInstance(name, name, checker)


def build_portal(checkers: Iterable, deadline: StageDeadline | None = None,
                 observer: StageObserver | None = None) -> Portal | None:
    """A Portal over the configured checkers (tried in order), or None without any.

    ``checkers`` are the ``[stages] auth`` PluginInstances (or bare checker
    objects); with a ``deadline`` every login is bounded by it; ``observer``
    is told each checker's answer time.
    """
    checkers = list(checkers)
    if not checkers:
        return None
    if len(checkers) == 1 and deadline is None and observer is None:
        return Portal(SubmissionRealm(), [_as_plugin(checkers[0]).obj])
    return Portal(SubmissionRealm(), [CheckerChain(checkers, deadline, observer)])


def offered_mechanisms(checkers: Iterable, supported: tuple[str, ...]) -> tuple[str, ...]:
    """The SASL mechanisms to offer now: ``supported``, narrowed by checkers that say which
    they can check (a ``sasl_mechanisms()`` method: the ``dovecot`` checker offers what
    Dovecot offers).  A checker without that method, or one that does not know yet
    (None), can check any; with none left the full list stays (AUTH then answers 454)."""
    allowed: set[str] = set()
    for checker in checkers:
        obj = _as_plugin(checker).obj
        method = getattr(obj, "sasl_mechanisms", None)
        mechanisms = method() if method is not None else None
        if mechanisms is None:
            return supported
        allowed.update(m.upper() for m in mechanisms)
    narrowed = tuple(m for m in supported if m in allowed)
    return narrowed or supported


class AuthFailureDelay:
    """How long to wait before answering a failed AUTH: grows with failures per client IP."""

    def __init__(self, base: float) -> None:
        self.base = base
        self._clients: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def failed(self, ip: str, now: float) -> float:
        count, last = self._clients.pop(ip, (0, now))
        if now - last > FORGET_AFTER:
            count = 0
        count += 1
        self._clients[ip] = (count, now)
        while len(self._clients) > TRACKED_CLIENTS:
            self._clients.popitem(last=False)
        return min(self.base * 2 ** (count - 1), MAX_DELAY) if self.base > 0 else 0.0

    def succeeded(self, ip: str) -> None:
        self._clients.pop(ip, None)
