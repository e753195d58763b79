"""A reload driven in-process: what it releases, whom it tells (systemd, the metrics).

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


def reloader_over(tmp_path, tables: list[str], events=None):
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
                           counter=ConnectionCounter(), auth_failures=AuthFailureDelay(0),
                           events=events)
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


def test_systemd_hears_reloading_then_ready_around_good_and_broken_reloads(tmp_path, monkeypatch):
    import socket
    import uuid

    from twisted.application.service import MultiService

    from pymta.tap import notify_systemd

    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"pymta-test-{uuid.uuid4().hex}"
    receiver.bind("\0" + name)
    receiver.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    reloader = reloader_over(tmp_path, [SPOOL, SPOOL, SPOOL + "[limits]\nno_such_key = 1\n"])
    top = MultiService()
    top.reloader = reloader
    queue = SimpleNamespace(held=list, queued=list, in_flight=0)
    notify_systemd(top, queue, ConnectionCounter(), reloader.server.reactor)
    top.startService()

    def heard() -> list[str]:
        found = []
        while True:
            try:
                found.append(receiver.recv(4096).decode().split("\n")[0])
            except BlockingIOError:
                return found

    heard()                                           # READY=1 of the start, if sent yet
    assert reloader.reload().result is True
    assert heard() == ["RELOADING=1", "READY=1"]
    assert reloader.reload().result is False          # refused: the old configuration stays
    assert heard() == ["RELOADING=1", "READY=1"]
    receiver.close()


def test_after_a_reload_the_metrics_still_time_the_plugins_and_auth(tmp_path):
    from pymta.metrics.instruments import ServerMetrics

    users = tmp_path / "users"
    users.write_text("")
    users.chmod(0o600)
    table = SPOOL + '[stages]\nauth = ["users"]\n[plugins.users]\nuse = "passwdfile"\nfile = "users"\n'
    events = ServerMetrics(process=False)
    reloader = reloader_over(tmp_path, [table, table], events=events)
    assert reloader.reload().result is True
    context = reloader.generation.context
    assert reloader.generation.number == 2 and context.events is events
    assert context.policy.observer == events.plugin_answered
    [chain] = context.portal.checkers.values()
    assert chain.observer == events.plugin_answered
