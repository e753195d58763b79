"""The greylist plugin (RFC 6647): decisions in memory and in Redis, exemptions, two nodes sharing one Redis."""

from __future__ import annotations

import smtplib
import time

import pytest

from conftest import BACKEND_TOML, wait_for_log
from pymta.authresults import AuthResult, add_auth_result
from pymta.config.errors import OptionError
from pymta.config.options import PluginContext
from pymta.policy.greylist import (SHARED_GREYLIST_SCRIPT, Greylist, GreylistRules, GreylistTable,
                                   client_network)
from pymta.session import Session, Transaction
from pymta.verdict import DUNNO, Kind
from rediskit import RedisServer

RULES = GreylistRules(delay=300, retry_window=3600, pass_ttl=86400, auto_whitelist=2)

#: (time, triplet, count this message?, decision, seconds since the first attempt)
STORY = [
    (0, "t1", True, "new", 0),
    (100, "t1", True, "early", 100),          # too soon: still deferred
    (400, "t1", True, "passed", 400),         # after the delay: passes, the client counts 1
    (450, "t1", False, "known", 450),         # the same message's next recipient: no count
    (500, "t2", True, "new", 0),
    (6000, "t2", True, "new", 0),             # retried after the window: starts again
    (6500, "t2", True, "passed", 500),        # the client counts 2: auto-whitelisted
    (6600, "t3", True, "whitelisted", 0),
]

#: the edges, with the auto-whitelist off: a retry exactly at the delay passes, one exactly
#: at the end of the window (delay + retry window after the first attempt) still passes
EDGES = [
    (0, "e1", True, "new", 0),
    (299, "e1", True, "early", 299),
    (300, "e1", True, "passed", 300),
    (1000, "e2", True, "new", 0),
    (4900, "e2", True, "passed", 3900),
    (5000, "e3", True, "new", 0),
    (8901, "e3", True, "new", 0),            # a second after the window: starts again
]
EDGE_RULES = GreylistRules(delay=300, retry_window=3600, pass_ttl=86400, auto_whitelist=0)


def memory_decider(rules=RULES):
    table = GreylistTable(rules)
    return lambda now, triplet, count: table.decide(triplet, "192.0.2.0/24", now, count)


@pytest.fixture
def redis(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


def redis_decider(redis, rules=RULES):
    def decide(now, triplet, count):
        decision, age = redis.command(
            "EVAL", SHARED_GREYLIST_SCRIPT, "2", f"t:{triplet}", "c:192.0.2.0/24", repr(float(now)),
            repr(rules.delay), repr(rules.retry_window), repr(rules.pass_ttl),
            str(rules.auto_whitelist), "1" if count else "0")
        return decision, float(age)
    return decide


@pytest.mark.parametrize("where", ["memory", "redis"])
def test_the_table_and_the_redis_script_decide_alike(where, request):
    decide = memory_decider() if where == "memory" else redis_decider(request.getfixturevalue("redis"))
    assert [(now, triplet, *decide(now, triplet, count)) for now, triplet, count, _, _ in STORY] == \
        [(now, triplet, decision, float(age)) for now, triplet, _, decision, age in STORY]


@pytest.mark.parametrize("where", ["memory", "redis"])
def test_the_table_and_the_redis_script_agree_at_the_edges(where, request):
    decide = memory_decider(EDGE_RULES) if where == "memory" else \
        redis_decider(request.getfixturevalue("redis"), EDGE_RULES)
    assert [(now, triplet, *decide(now, triplet, count)) for now, triplet, count, _, _ in EDGES] == \
        [(now, triplet, decision, float(age)) for now, triplet, _, decision, age in EDGES]
    if where == "redis":        # Redis's own clock expires keys: each use renews pass_ttl
        redis = request.getfixturevalue("redis")
        redis.command("EXPIRE", "t:e1", "60")
        assert decide(400, "e1", True) == ("known", 400.0)
        assert redis.command("TTL", "t:e1") > 86400 - 60


def test_a_passed_triplet_is_forgotten_after_pass_ttl_and_memory_is_bounded():
    table = GreylistTable(GreylistRules(delay=10, retry_window=100, pass_ttl=1000, auto_whitelist=0),
                          max_entries=3)
    assert table.decide("a", "c", 0, True)[0] == "new"
    assert table.decide("a", "c", 20, True)[0] == "passed"
    assert table.decide("a", "c", 900, True)[0] == "known"        # each use renews pass_ttl
    assert table.decide("a", "c", 1800, True)[0] == "known"
    assert table.decide("a", "c", 2800, True)[0] == "known"       # exactly pass_ttl later
    assert table.decide("a", "c", 3801, True)[0] == "new"
    for n in range(5):
        table.decide(f"x{n}", "c", 4000, True)
    assert len(table) == 3


def test_client_networks():
    assert client_network("192.0.2.77") == "192.0.2.0/24"
    assert client_network("::ffff:192.0.2.77") == "192.0.2.0/24"
    assert client_network("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::/64"
    assert client_network("192.0.2.77", ipv4_prefix=32) == "192.0.2.77/32"


class Clock:
    def __init__(self, now=1_000_000.0):
        self.now = now

    def __call__(self):
        return self.now


def plugin(**options):
    greylist = Greylist({"delay": 300, **options}, PluginContext("mx.test", ("example.test",), "/"))
    greylist._clock = Clock()
    return greylist


def session(**kw):
    return Session(client_ip=kw.pop("ip", "198.51.100.7"), client_port=1234, **kw)


def test_first_attempt_is_deferred_with_451_4_7_1_and_a_retry_after_the_delay_passes():
    greylist = plugin()
    verdict = greylist.check_recipient(session(), Transaction("a@sender.test"), "bob@example.test")
    assert (verdict.kind, verdict.code, verdict.enhanced) == (Kind.DEFER, 451, "4.7.1")
    assert verdict.text == ("Greylisted: first delivery attempt from 198.51.100.0/24 for "
                            "<bob@example.test>; please try again in 300 seconds")
    greylist._clock.now += 60
    early = greylist.check_recipient(session(ip="198.51.100.8"), Transaction("A@sender.test"),
                                     "Bob@example.test")          # same /24, addresses case-blind
    assert early.code == 451 and "try again in 240 seconds" in early.text
    greylist._clock.now += 240
    assert greylist.check_recipient(session(), Transaction("a@sender.test"), "bob@example.test") is DUNNO
    # another sender is another triplet
    assert greylist.check_recipient(session(), Transaction("c@sender.test"), "bob@example.test").code == 451


def test_authenticated_trusted_listed_networks_and_spf_pass_domains_are_not_greylisted():
    greylist = plugin(skip_networks=["203.0.113.0/24"], skip_spf_pass=["Big.Example"])
    mail = Transaction("news@big.example")
    assert greylist.check_recipient(session(auth_user="alice"), mail, "bob@example.test") is DUNNO
    assert greylist.check_recipient(session(trusted=True), mail, "bob@example.test") is DUNNO
    assert greylist.check_recipient(session(ip="203.0.113.9"), mail, "bob@example.test") is DUNNO
    # big.example is listed, but only an SPF pass for this very sender counts
    assert greylist.check_recipient(session(), mail, "bob@example.test").code == 451
    add_auth_result(mail.notes, AuthResult("spf", "pass", (("smtp.mailfrom", "news@big.example"),)))
    assert greylist.check_recipient(session(), mail, "carol@example.test") is DUNNO
    other = Transaction("x@other.example")
    add_auth_result(other.notes, AuthResult("spf", "pass", (("smtp.mailfrom", "x@other.example"),)))
    assert greylist.check_recipient(session(), other, "bob@example.test").code == 451
    strict = plugin(exempt_trusted=False)
    assert strict.check_recipient(session(trusted=True), mail, "bob@example.test").code == 451


@pytest.mark.parametrize("options, key", [
    ({"delay": "soon"}, "delay"), ({"retry_window": 0}, "retry_window"),
    ({"skip_networks": ["10.0.0.1/8"]}, "skip_networks[0]"), ({"ipv4_prefix": 40}, "ipv4_prefix"),
    ({"auto_whitelist": -1}, "auto_whitelist"), ({"whitelist": []}, "whitelist"),
])
def test_option_errors_name_the_key(options, key):
    with pytest.raises(OptionError) as e:
        plugin(**options)
    assert e.value.key == key


# -- two real pymta nodes ------------------------------------------------------------------

def node_toml(redis_url: str | None, delay: float = 1, ratelimit: str = "") -> str:
    shared = f'\n[shared]\nredis = "{redis_url}"\n' if redis_url else ""
    stages = '["ratelimit"]' if ratelimit else "[]"
    return BACKEND_TOML + shared + f"""
[stages]
mail = {stages}
rcpt = ["greylist", "localdomain"]

[plugins.greylist]
delay = {delay}
{ratelimit}
"""


def send(server, sender="a@sender.test", rcpt="bob@example.test"):
    """The reply to RCPT (and to DATA when RCPT was accepted) of one message."""
    with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
        client.ehlo("client.test")
        code, text = client.mail(sender)
        if code != 250:
            return code, text.decode()
        code, text = client.rcpt(rcpt)
        if code != 250:
            return code, text.decode()
        code, text = client.data(b"Subject: greylist\r\n\r\nhello\r\n")
        return code, text.decode()


def nodes(make_server, redis_url, **kw):
    return [make_server(node_toml(redis_url, **kw), server_toml="trusted_networks = []")
            for _ in range(2)]


def test_two_nodes_share_one_greylist_through_redis(make_server, redis):
    first, second = nodes(make_server, redis.url)
    code, text = send(first)
    assert code == 451 and text.startswith("4.7.1 Greylisted")
    time.sleep(1.2)                    # the configured delay (1 s) is over
    code, _ = send(second)             # the other node knows the triplet from Redis
    assert code == 250
    assert len(second.delivered("bob@example.test")) == 1


def test_without_redis_each_node_keeps_its_own_greylist(make_server):
    first, second = nodes(make_server, None)
    assert send(first)[0] == 451
    time.sleep(1.2)
    assert send(second)[0] == 451      # never saw the triplet
    assert send(first)[0] == 250


def test_rate_limits_count_across_nodes_through_redis(make_server, redis):
    first, second = nodes(make_server, redis.url, delay=0,
                          ratelimit="[plugins.ratelimit]\nmessages_per_ip = 2\nexempt_trusted = false")
    assert send(first, rcpt="a@example.test")[0] == 451      # greylisted, but MAIL counted
    assert send(second, rcpt="a@example.test")[0] == 250
    code, text = send(first, rcpt="a@example.test")
    assert code == 451 and "Too many messages from [127.0.0.1] (at most 2 per 1m)" in text


def test_redis_stopped_mid_test_mail_is_still_accepted(make_server, redis):
    first, second = nodes(make_server, redis.url,
                          ratelimit="[plugins.ratelimit]\nmessages_per_ip = 50\nexempt_trusted = false")
    assert send(first)[0] == 451
    time.sleep(1.2)
    assert send(first)[0] == 250       # passed, in Redis and in this node's memory
    redis.stop()
    code, _ = send(first)              # Redis is gone: the node decides from its memory
    assert code == 250
    wait_for_log(first, r"shared state: redis://127\.0\.0\.1:\d+/0 is unreachable \(.+\); "
                        r"using each node's in-memory state")
    assert len(first.delivered("bob@example.test", count=2)) == 2
    # a node that never saw the triplet greylists it in memory: deferred, not refused
    assert send(second)[0] == 451
