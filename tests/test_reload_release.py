"""What a reload releases, driven in-process: generations that end out of order.

A generation that ends (its last session over) releases what its
configuration holds; the DNS resolver and the Redis connection of
``[shared]`` are shared by consecutive configurations while their tables
are unchanged, so they may be closed only when no generation still in use
holds them, whichever generation ends first.
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from pymta.config.loader import load_config
from pymta.reload.reloader import ConfigReloader, RunningServer
from pymta.server.auth import AuthFailureDelay
from pymta.server.factory import ConnectionCounter


class Redis:
    """Stands in for a txredisapi connection: counts its disconnects."""

    disconnects = 0

    def disconnect(self):
        self.disconnects += 1


class Sockets:
    """ListenerSockets without sockets: only the generation in force."""

    def __init__(self, generation):
        self.generation = generation
        self.services = {}

    def switch(self, generation):
        self.generation = generation
        return defer.succeed([])


def reloader_over(tmp_path, tables: list[str]):
    """A reloader whose first configuration is ``tables[0]``; each reload loads the next."""
    reactor = MemoryReactorClock()
    path = tmp_path / "pymta.toml"

    def load(previous, _reactor):
        path.write_text(tables.pop(0))
        return load_config(str(path), reactor, previous=previous)

    first = load(None, reactor)
    server = RunningServer(reactor, spool=SimpleNamespace(memory_limit=0),
                           scheduler=SimpleNamespace(reconfigure=lambda *a: defer.succeed(None)),
                           worker=None, shutdown=SimpleNamespace(timeout=0),
                           counter=ConnectionCounter(), auth_failures=AuthFailureDelay(0))
    reloader = ConfigReloader(server, Sockets(server.generation(first, 1)), load=load)
    reloader.running = True           # no SIGHUP handler in a test process
    return reloader


SPOOL = '[spool]\ndirectory = "spool"\n'


def shared(db: int) -> str:
    return SPOOL + f'[shared]\nredis = "redis://127.0.0.1:6379/{db}"\n'


def test_a_redis_connection_still_used_by_an_older_generation_stays_open(tmp_path):
    reloader = reloader_over(tmp_path, [shared(0), shared(0), shared(1)])
    first = reloader.generation
    state = first.config.shared_state
    state._redis = redis = Redis()
    first.sessions = 1                                    # a session of the first configuration
    assert reloader.reload().result is True               # [shared] unchanged: the same connection
    assert reloader.config.shared_state is state
    assert reloader.reload().result is True               # [shared] changed: the second generation,
    assert reloader.config.shared_state is not state      # without sessions, is released now
    assert redis.disconnects == 0 and state._redis is redis   # the first one's session still uses it
    first.session_ended()
    assert redis.disconnects == 1 and state._redis is None


def test_a_redis_connection_of_a_released_configuration_is_closed_once(tmp_path):
    reloader = reloader_over(tmp_path, [shared(0), shared(0), shared(1)])
    state = reloader.config.shared_state
    state._redis = redis = Redis()
    reloader.reload()
    assert redis.disconnects == 0                         # kept: the new configuration uses it
    reloader.reload()
    assert redis.disconnects == 1
