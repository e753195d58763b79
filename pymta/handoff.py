"""A Deferred of one's own for another Deferred's result.

Several callers may wait on one piece of work (a DNS query shared by the
sessions asking the same name) or stop waiting before it ends (a plugin
call past its stage's deadline, a session's DNS budget used up).  Each gets
a Deferred of its own from :func:`handed_off`: it fires with the work's
result unless it has fired already, and cancelling it never cancels the
work, whose outcome still reaches the others (and the caches).
"""

from __future__ import annotations

from typing import Callable

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

__all__ = ["handed_off"]


def handed_off(source: Deferred, canceller: Callable[[Deferred], None] | None = None,
               before: Callable[[], None] | None = None) -> Deferred:
    """A new Deferred that fires with ``source``'s result, unless it has fired already.

    ``canceller`` is the new Deferred's own (``source`` is never cancelled
    through it); ``before`` runs just before the result is passed on.  A
    result that arrives after the new Deferred has fired (it was cancelled,
    or answered otherwise) ends here, failures included.
    """
    out = Deferred(canceller)

    def deliver(result):
        if not out.called:
            if before is not None:
                before()
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
        return None

    source.addBoth(deliver)
    return out
