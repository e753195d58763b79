"""A message filter that takes its time (the graceful-stop tests)."""

from __future__ import annotations

import re

from twisted.internet import reactor
from twisted.internet.task import deferLater
from zope.interface import implementer

from pymta.plugin_api import IMessageFilter, Verdict


@implementer(IMessageFilter)
class SlowFilter:
    """Accepts a message after the delay its subject names: ``Subject: slow1500`` waits 1.5 s."""

    def __init__(self, options, context):
        self.reactor = getattr(context, "reactor", None) or reactor

    def check_message(self, session, transaction, message):
        with message.open() as f:
            match = re.search(rb"^Subject: slow(\d+)", f.read(4096), re.M)
        delay = int(match.group(1)) / 1000 if match else 0.0
        return deferLater(self.reactor, delay, Verdict.accept)
