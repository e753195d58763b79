"""State shared between pymta nodes: Redis, reached without blocking, never a reason to refuse mail.

With ``[shared] redis = "redis://host:port/db"`` the plugins that count
(``ratelimit``) or remember (``greylist``) keep their state in that Redis,
so that several nodes behind one MX name or load balancer enforce one
limit and share one greylist.  Each decision is one Lua script run
atomically by Redis (one round trip; two nodes cannot both take the last
allowed slot).

Redis going away must not stop mail.  Every call has a deadline
(``[shared] timeout``); a call that fails or misses it fails at once with
:class:`SharedStateUnavailable`, and the plugin then decides from its own
in-memory state, as it does without Redis.  After a failure Redis is left
alone for ``RETRY_AFTER`` seconds (no session waits for a dead server
meanwhile); the change each way is logged once.  The client is
``txredisapi`` (non-blocking, on the reactor); it connects on first use
and reconnects by itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import unquote, urlsplit, urlunsplit

from twisted.internet import defer
from twisted.logger import Logger

__all__ = ["SharedSettings", "SharedState", "SharedStateUnavailable", "parse_redis_url",
           "DEFAULT_TIMEOUT", "RETRY_AFTER"]

log = Logger(namespace="pymta.shared")

#: seconds a Redis call may take before the plugin decides without it
DEFAULT_TIMEOUT = 0.5
#: seconds Redis is left alone after a failed call
RETRY_AFTER = 5.0


class SharedStateUnavailable(Exception):
    """Redis cannot answer now: decide from the in-memory state."""


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int
    username: str | None = None
    password: str | None = None

    def describe(self) -> str:
        """The address without the password, for the log."""
        return f"redis://{self.host}:{self.port}/{self.db}"


def parse_redis_url(url: str) -> RedisAddress:
    """``redis://[[user]:password@]host[:port][/db]`` → :class:`RedisAddress`; ValueError names the problem."""
    parts = urlsplit(url)
    if parts.scheme != "redis":
        raise ValueError(f"expected a redis://host:port/db address, got {_shown(url)!r}")
    if parts.query or parts.fragment:
        raise ValueError("a redis:// address takes no ?query or #fragment")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"bad port in {_shown(url)!r}") from None
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in {url!r}")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database must be a number, got {path!r}")
    return RedisAddress(host, port, int(path or 0),
                        unquote(parts.username) if parts.username else None,
                        unquote(parts.password) if parts.password else None)


def _shown(url: str) -> str:
    """``url`` as an error line may show it: its password (if any) as ``********``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:********@{host}"))


@dataclass(frozen=True)
class SharedSettings:
    """The ``[shared]`` table."""

    #: redis:// address, or None: every node keeps its own state in memory
    redis: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    #: put before every key, so that several pymta installations can share one Redis
    key_prefix: str = "pymta:"


class SharedState:
    """One Redis connection for the plugins of one server, with a deadline and a memory of failure.

    ``connect`` (for tests) makes the txredisapi handler from a
    :class:`RedisAddress`; by default ``txredisapi.lazyConnection``.
    """

    def __init__(self, settings: SharedSettings, reactor: Any = None,
                 connect: Callable[[RedisAddress], Any] | None = None) -> None:
        if settings.redis is None:
            raise ValueError("SharedState needs a redis address")
        self.address = parse_redis_url(settings.redis)
        self.timeout = settings.timeout
        self.key_prefix = settings.key_prefix
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._reactor = reactor
        self._connect = connect or _lazy_connection
        self._redis: Any = None
        #: until this time (reactor clock) Redis is not asked
        self._down_until = 0.0
        self._down = False

    def key(self, *parts: str) -> str:
        return self.key_prefix + ":".join(parts)

    @property
    def available(self) -> bool:
        """Would a call be sent to Redis now (not in the pause after a failure)?"""
        return not self._down or self._now() >= self._down_until

    def run(self, script: str, keys: list[str], args: list[Any]) -> defer.Deferred:
        """Run a Lua ``script``; fires with its result, or fails with SharedStateUnavailable."""
        if not self.available:
            return defer.fail(SharedStateUnavailable("Redis is unreachable"))
        if self._redis is None:
            self._redis = self._connect(self.address)
        # not connected (yet, or any more): txredisapi keeps the call until it
        # is, and reconnects by itself; the deadline decides how long to wait
        d = defer.maybeDeferred(self._redis.eval, script, keys, args)
        d.addTimeout(self.timeout, self._reactor)
        d.addCallbacks(self._answered, self._call_failed)
        return d

    def close(self) -> defer.Deferred:
        redis, self._redis = self._redis, None
        if redis is None:
            return defer.succeed(None)
        return defer.maybeDeferred(redis.disconnect).addErrback(lambda _: None)

    # -- health ---------------------------------------------------------------
    def _now(self) -> float:
        seconds = getattr(self._reactor, "seconds", None)
        return seconds() if seconds is not None else time.monotonic()

    def _answered(self, result: Any) -> Any:
        if self._down:
            self._down = False
            log.info("shared state: {redis} answers again; limits and greylisting use it",
                     redis=self.address.describe())
        return result

    def _call_failed(self, failure) -> None:
        if failure.check(defer.TimeoutError, defer.CancelledError):
            why = f"no answer within {self.timeout:g} s"
        else:
            why = str(failure.value) or type(failure.value).__name__
        self._failed(why)
        raise SharedStateUnavailable(why)

    def _failed(self, why: str) -> None:
        self._down_until = self._now() + RETRY_AFTER
        if not self._down:
            self._down = True
            log.warn("shared state: {redis} is unreachable ({why}); using each node's "
                     "in-memory state until it answers again", redis=self.address.describe(), why=why)


def _lazy_connection(address: RedisAddress) -> Any:
    import txredisapi
    return txredisapi.lazyConnection(address.host, address.port, dbid=address.db,
                                     password=address.password, username=address.username,
                                     connectTimeout=2, convertNumbers=False)
