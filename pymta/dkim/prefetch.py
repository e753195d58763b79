"""Ask DNS for several TXT records at once, asynchronously, before dkimpy runs.

dkimpy asks DNS itself, blocking, while it verifies; pymta asks first,
through its shared resolver (or a session's, within its DNS time budget),
and then gives dkimpy the answers (:class:`pymta.dkim.verifier.KeyRecords`).
"""

from __future__ import annotations

from typing import Iterable

from twisted.internet import defer
from twisted.internet.defer import Deferred

__all__ = ["fetch_txt"]


def fetch_txt(resolver, names: Iterable[str]) -> Deferred:
    """Fires with {name: [TXT texts]} where a lookup failed: {name: DNSError}, never fails."""
    names = sorted(set(names))
    if not names:
        return defer.succeed({})

    def one(name: str) -> Deferred:
        d = defer.maybeDeferred(resolver.txt, name)
        return d.addErrback(lambda failure: failure.value)

    d = defer.gatherResults([one(name) for name in names])
    return d.addCallback(lambda answers: dict(zip(names, answers)))
