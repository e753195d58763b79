"""pymta.shared_state: Redis addresses, the deadline, the pause after a failure and the log lines."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from pymta.config.errors import ConfigError
from pymta.config.loader import load_config
from pymta.shared_state import (RETRY_AFTER, RedisAddress, SharedSettings, SharedState,
                                SharedStateUnavailable, parse_redis_url)


def test_redis_urls():
    assert parse_redis_url("redis://127.0.0.1:6380/2") == RedisAddress("127.0.0.1", 6380, 2)
    assert parse_redis_url("redis://cache.example") == RedisAddress("cache.example", 6379, 0)
    address = parse_redis_url("redis://pymta:s%40cret@cache.example:6379/1")
    assert (address.username, address.password) == ("pymta", "s@cret")
    assert address.describe() == "redis://cache.example:6379/1"          # no password in the log
    for bad in ("http://x", "redis://", "redis://h:port/0", "redis://h/zero", "redis://h/0?x=1"):
        with pytest.raises(ValueError):
            parse_redis_url(bad)


def test_a_bad_shared_table_names_the_key_and_the_file(tmp_path):
    config = tmp_path / "pymta.toml"
    config.write_text('[shared]\nredis = "http://cache:6379"\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(config))
    assert str(e.value) == (f"{config}: shared.redis: expected a redis://host:port/db address, "
                            "got 'http://cache:6379'")


@pytest.mark.parametrize("url, problem", [
    ("rediss://:hunter2@cache:6379/0", "expected a redis://host:port/db address, "
                                       "got 'rediss://:********@cache:6379/0'"),
    ("redis://pymta:hunter2@cache:63x79/0", "bad port in 'redis://pymta:********@cache:63x79/0'"),
])
def test_a_bad_redis_address_is_named_without_its_password(tmp_path, url, problem):
    # the line goes to check-config's output and to the log of a refused reload
    config = tmp_path / "pymta.toml"
    config.write_text(f'[shared]\nredis = "{url}"\n')
    with pytest.raises(ConfigError) as e:
        load_config(str(config))
    assert str(e.value) == f"{config}: shared.redis: {problem}"


class FakeRedis:
    def __init__(self):
        self.calls = []
        self.answer: defer.Deferred | None = None

    def eval(self, script, keys, args):
        self.calls.append((script, keys, args))
        self.answer = defer.Deferred()
        return self.answer


@pytest.fixture
def logged():
    events = []
    globalLogPublisher.addObserver(events.append)
    yield lambda: [e["log_format"] for e in events if e.get("log_namespace") == "pymta.shared"]
    globalLogPublisher.removeObserver(events.append)


def test_a_silent_redis_fails_the_call_at_the_deadline_then_is_left_alone_then_asked_again(logged):
    clock, redis = Clock(), FakeRedis()
    shared = SharedState(SharedSettings("redis://127.0.0.1:6379/0", timeout=0.5), clock,
                         connect=lambda address: redis)
    d = shared.run("return 1", ["k"], [])
    failures = []
    d.addErrback(failures.append)
    clock.advance(0.4)
    assert not failures
    clock.advance(0.2)
    assert failures and failures[0].check(SharedStateUnavailable)
    assert "no answer within 0.5 s" in str(failures[0].value)
    assert [f for f in logged() if "unreachable" in f]
    # meanwhile no call reaches Redis: the plugins decide at once, from memory
    assert not shared.available
    shared.run("return 1", ["k"], []).addErrback(failures.append)
    assert len(redis.calls) == 1 and len(failures) == 2
    clock.advance(RETRY_AFTER)
    assert shared.available
    d = shared.run("return 1", ["k"], [])
    redis.answer.callback(1)
    assert d.result == 1 and len(redis.calls) == 2
    assert [f for f in logged() if "answers again" in f]


def test_a_redis_error_is_unavailability_too():
    redis = FakeRedis()
    shared = SharedState(SharedSettings("redis://127.0.0.1:6379/0"), Clock(), connect=lambda a: redis)
    d = shared.run("return 1", ["k"], [])
    redis.answer.errback(ConnectionError("Not connected"))
    failures = []
    d.addErrback(failures.append)
    assert failures[0].check(SharedStateUnavailable) and "Not connected" in str(failures[0].value)
