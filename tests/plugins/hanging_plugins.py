"""Site plugins that hang, answer late, or add bad header fields (plugin_timeout tests)."""

from __future__ import annotations

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from zope.interface import implementer

from pymta.plugin_api import (DUNNO, IConnectPolicy, IHeloPolicy, IMessageFilter, IRecipientPolicy,
                              ISenderPolicy, Kind, Verdict)

#: how long a "late" answer takes, in seconds (longer than the tests' plugin_timeout)
LATE = 1.5


def _never() -> Deferred:
    """A Deferred nobody will ever fire (and with no canceller)."""
    return Deferred()


def _late(verdict: Verdict) -> Deferred:
    """A Deferred fired after LATE seconds, whatever happened to it meanwhile.

    Firing a cancelled Deferred without a canceller is ignored by Twisted;
    the late verdict must not reach the session either way.
    """
    d = Deferred()
    reactor.callLater(LATE, lambda: d.callback(verdict))
    return d


def _by_word(word: str, verdict: Verdict):
    if word.startswith("hang"):
        return _never()
    if word.startswith("late"):
        return _late(verdict)
    return DUNNO


@implementer(ISenderPolicy, IRecipientPolicy, IMessageFilter)
class Hang:
    """``hang...@`` never answers; ``late...@`` answers (rejecting) after LATE seconds.

    At the data stage the same is asked of a message whose Subject is
    ``hang`` or ``late``; Subject ``bad-lf`` / ``bad-name`` / ``bad-long``
    get a header field that must never be written.
    """

    def __init__(self, options, context):
        pass

    def check_sender(self, session, transaction):
        return _by_word(transaction.sender.lower(), Verdict.reject("late sender", 550, "5.7.1"))

    def check_recipient(self, session, transaction, recipient):
        return _by_word(recipient.lower(), Verdict.reject("late recipient", 550, "5.7.1"))

    def check_message(self, session, transaction, message):
        subject = dict((name.lower(), value.strip()) for name, value in message.headers()).get("subject", "")
        bad = {"bad-lf": ("X-Bad", "one\nInjected: yes"),
               "bad-name": ("X Bad", "value"),
               "bad-long": ("X-Bad", "x" * 1000)}.get(subject)
        if bad is not None:
            return Verdict(Kind.DUNNO, headers=(bad,))
        return _by_word(subject, Verdict.reject("late message", 554, "5.7.1"))


@implementer(IConnectPolicy, IHeloPolicy)
class HangOnConnect:
    """The connect stage never answers for every second connection (the 2nd, 4th, ...;
    the first is the test harness's start-up probe); HELO ``hang...`` never answers."""

    def __init__(self, options, context):
        self.connections = 0

    def check_connect(self, session):
        self.connections += 1
        return _never() if self.connections % 2 == 0 else DUNNO

    def check_helo(self, session, hostname):
        return _by_word(hostname.lower(), Verdict.reject("late helo", 550, "5.7.1"))


@implementer(ICredentialsChecker)
class HangingChecker:
    """An SMTP AUTH checker (twisted.cred) that never answers for user ``hang``."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, options, context):
        pass

    def requestAvatarId(self, credentials):
        if credentials.username == b"hang":
            return _never()
        return fail(UnauthorizedLogin("unknown user"))
