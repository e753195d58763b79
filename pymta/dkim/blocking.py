"""Running the blocking DKIM/ARC work (file reads, hashing, dkimpy) off the reactor thread."""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool

from pymta.dkim.message import read_header_section

__all__ = ["in_thread_pool", "on_body"]


def in_thread_pool(reactor: Any, f: Callable, *args: Any) -> defer.Deferred:
    """``f(*args)`` in the reactor's thread pool (at once when there is no reactor: unit tests)."""
    if reactor is None:
        return defer.maybeDeferred(f, *args)
    return deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


def on_body(message: Any, f: Callable, *args: Any) -> Any:
    """``f(fp, *args)`` with ``fp`` the message's body: the file after its header section."""
    with message.open() as fp:
        read_header_section(fp)
        return f(fp, *args)
