"""Helpers for the scheduler tests: a fake reactor whose thread pool runs work at once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.task import Clock
from twisted.python.failure import Failure

#: the fake clock's time at the start of every test (a fixed, recent Unix time)
START = 1_700_000_000.0


class SyncThreadPool:
    """Runs 'threaded' work at once, on the calling thread."""

    def callInThreadWithCallback(self, on_result: Callable[[bool, Any], object],
                                 f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            result = f(*args, **kwargs)
        except BaseException:
            on_result(False, Failure())
        else:
            on_result(True, result)


class FakeReactor(Clock):
    """A Clock standing at :data:`START` whose thread work and callFromThread run at once."""

    def __init__(self) -> None:
        super().__init__()
        self.advance(START)

    def getThreadPool(self) -> SyncThreadPool:
        return SyncThreadPool()

    def callFromThread(self, f: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        f(*args, **kwargs)
