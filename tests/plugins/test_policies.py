"""Plugins used by the loopback tests (loaded through plugin_path + dotted paths)."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.task import deferLater
from zope.interface import implementer

from pymta.plugin_api import (DeliveryResult, IDeliveryBackend, IMessageFilter, IRecipientPolicy,
                              Kind, Verdict)


@implementer(IRecipientPolicy)
class SlowRecipients:
    """Answers after a delay given by the local part: ``slow200-...`` waits 200 ms.

    Local parts starting with ``no`` are rejected, the others accepted, so a
    pipelined batch gets replies whose order differs from their timing.
    """

    def __init__(self, options, context):
        self.reactor = getattr(context, "reactor", None) or reactor

    def check_recipient(self, session, transaction, recipient):
        local = recipient.partition("@")[0].lower()
        delay = 0.0
        if local.startswith("slow"):
            delay = int("".join(c for c in local[4:] if c.isdigit()) or "0") / 1000
        verdict = (Verdict.reject(f"{recipient} refused by test", 550, "5.7.1")
                   if local.startswith("no") else Verdict.accept())
        return deferLater(self.reactor, delay, lambda: verdict)


@implementer(IMessageFilter)
class RejectSubject:
    """Rejects a message whose body contains 'REJECT-ME'; tags the others."""

    def __init__(self, options, context):
        pass

    def check_message(self, session, transaction, message):
        with message.open() as f:
            if b"REJECT-ME" in f.read():
                return Verdict.reject("content refused by test", 554, "5.7.1")
        return Verdict(Kind.DUNNO, headers=(("X-Test-Filter", "passed"),))


class NotAPlugin:
    """Provides no interface: loading it must fail at start-up."""

    def __init__(self, options, context):
        pass


@implementer(IDeliveryBackend)
class DeferAll:
    """A backend that never delivers: messages stay in the spool."""

    def __init__(self, options, context):
        pass

    def deliver(self, message, recipients):
        return [DeliveryResult.deferred("held by the test backend") for _ in recipients]


@implementer(IDeliveryBackend)
class RefuseAll:
    """A backend that fails every recipient permanently (550 5.1.1)."""

    def __init__(self, options, context):
        pass

    def deliver(self, message, recipients):
        return [DeliveryResult.failed("no such user here (test backend)") for _ in recipients]
