"""The sender_login policy: authenticated users send only as the addresses they own."""

from __future__ import annotations

import pytest
from twisted.logger import formatEvent, globalLogPublisher
from zope.interface.verify import verifyObject

from pymta.config.errors import OptionError
from pymta.config.options import PluginContext
from pymta.interfaces import ISenderPolicy
from pymta.policy.sender_login import SenderLoginPolicy, parse_sender_logins
from pymta.session import Session, Transaction
from pymta.verdict import DUNNO, Verdict

MAP = """\
# sender: logins
alice@example.org:   alice
info@example.org:    alice, Bob        # shared
sales@example.org:   carol
                     dave  erin
@example.net:        netadmin
b\u00fccher@example.org: jürgen
x@bücher.example:    jürgen
"""


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def context(tmp_path):
    return PluginContext("mx.example.org", ("example.org",), str(tmp_path))


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def policy(tmp_path, context, text: str = MAP, **options):
    (tmp_path / "logins").write_text(text)
    clock = Clock()
    return SenderLoginPolicy({"map": "logins", **options}, context, clock=clock), clock


def check(plugin, sender: str, login: str | None) -> Verdict:
    session = Session(client_ip="192.0.2.1", client_port=40000, role="submission", auth_user=login)
    return plugin.check_sender(session, Transaction(sender=sender))


def not_owned(sender: str, login: str) -> Verdict:
    return Verdict.reject(f"<{sender}>: Sender address rejected: not owned by user {login}", 553, "5.7.1")


def not_logged_in(sender: str) -> Verdict:
    return Verdict.reject(f"<{sender}>: Sender address rejected: not logged in", 553, "5.7.1")


@pytest.mark.parametrize("sender, login", [
    ("alice@example.org", "alice"),
    ("Alice@EXAMPLE.org", "ALICE"),            # addresses and logins compare case-insensitively
    ("alice+lists@example.org", "alice"),      # the +extension of an owned address
    ("info@example.org", "alice"),
    ("info@example.org", "bob"),
    ("sales@example.org", "dave"),             # from a continuation line
    ("sales@example.org", "erin"),
    ("anyone@example.net", "netadmin"),        # @domain
    ("anyone@Example.NET.", "netadmin"),
    ("bücher@example.org", "Jürgen"),
    ("x@xn--bcher-kva.example", "jürgen"),     # IDNA forms are the same domain
])
def test_owner_passes(tmp_path, context, sender, login):
    plugin, _ = policy(tmp_path, context)
    assert verifyObject(ISenderPolicy, plugin)
    assert check(plugin, sender, login) is DUNNO


@pytest.mark.parametrize("sender, login", [
    ("alice@example.org", "bob"),
    ("sales@example.org", "alice"),
    ("anyone@example.net", "alice"),
    ("alice@example.org", "alice@example.org"),   # a login is compared whole
    ("stranger@example.com", "alice"),            # listed nowhere: nobody owns it
    ("alice@example.org.evil.example", "alice"),
])
def test_authenticated_user_not_owning_the_sender_is_rejected(tmp_path, context, sender, login):
    plugin, _ = policy(tmp_path, context)
    assert check(plugin, sender, login) == not_owned(sender, login)


def test_unlisted_senders_may_be_let_through(tmp_path, context):
    plugin, _ = policy(tmp_path, context, unlisted_senders="dunno")
    assert check(plugin, "stranger@example.com", "alice") is DUNNO
    assert check(plugin, "alice@example.org", "bob") == not_owned("alice@example.org", "bob")


def test_null_sender_is_never_checked(tmp_path, context):
    plugin, _ = policy(tmp_path, context, reject_unauthenticated_owned=True)
    assert check(plugin, "", "alice") is DUNNO
    assert check(plugin, "", None) is DUNNO


def test_unauthenticated_sessions(tmp_path, context):
    plugin, _ = policy(tmp_path, context)
    assert check(plugin, "alice@example.org", None) is DUNNO
    assert check(plugin, "stranger@example.com", None) is DUNNO
    strict, _ = policy(tmp_path, context, reject_unauthenticated_owned=True)
    assert check(strict, "alice@example.org", None) == not_logged_in("alice@example.org")
    assert check(strict, "whoever@example.net", None) == not_logged_in("whoever@example.net")
    assert check(strict, "stranger@example.com", None) is DUNNO
    assert check(strict, "alice@example.org", "alice") is DUNNO


def test_delimiter_option(tmp_path, context):
    plugin, _ = policy(tmp_path, context, recipient_delimiter="-")
    assert check(plugin, "alice-x@example.org", "alice") is DUNNO
    assert check(plugin, "alice+x@example.org", "alice") == not_owned("alice+x@example.org", "alice")
    none, _ = policy(tmp_path, context, recipient_delimiter="")
    assert check(none, "alice+x@example.org", "alice") == not_owned("alice+x@example.org", "alice")


@pytest.mark.parametrize("text, line, problem", [
    ("alice@example.org alice\n", 1, "expected 'address: login, ...'"),
    ("  alice\n", 1, "continuation line (starts with blanks) before any entry"),
    ("alice: alice\n", 1, "expected 'user@domain' or '@domain' before ':', got 'alice'"),
    ("a@example.org: a\n\na@Example.org: b\n", 3, "duplicate entry for 'a@example.org' (first on line 1)"),
    ("a@example.org:   # nobody\n", 1, "no logins for 'a@example.org'"),
    ("a@exa mple.org: a\n", 1, "expected 'user@domain'"),
    ("a@-bad-.example: a\n", 1, "invalid domain"),
])
def test_map_errors_name_file_and_line(tmp_path, context, text, line, problem):
    with pytest.raises(OptionError) as caught:
        policy(tmp_path, context, text)
    assert caught.value.key == "map"
    assert caught.value.problem.startswith(f"{tmp_path / 'logins'}, line {line}: ")
    assert problem in caught.value.problem


def test_bad_options(tmp_path, context):
    with pytest.raises(OptionError, match="^map: cannot read .*nope: No such file"):
        SenderLoginPolicy({"map": "nope"}, context)
    with pytest.raises(OptionError, match="unlisted_senders: expected one of 'reject', 'dunno'"):
        policy(tmp_path, context, unlisted_senders="accept")
    with pytest.raises(OptionError, match="did you mean 'reject_unauthenticated_owned'"):
        policy(tmp_path, context, reject_unauthenticated_own=True)
    with pytest.raises(OptionError, match="recipient_delimiter: '@' cannot be a delimiter"):
        policy(tmp_path, context, recipient_delimiter="@")


def test_map_is_reloaded_when_it_changes(tmp_path, context, logged):
    plugin, clock = policy(tmp_path, context, "a@example.org: alice\n")
    path = tmp_path / "logins"
    path.write_text("a@example.org: bob\n")
    clock.now += 0.5
    assert check(plugin, "a@example.org", "alice") is DUNNO          # not looked at yet
    clock.now += 0.6
    assert check(plugin, "a@example.org", "alice") == not_owned("a@example.org", "alice")
    assert check(plugin, "a@example.org", "bob") is DUNNO
    path.write_text("a@example.org: carol\nbroken\n")
    clock.now += 1.0
    assert check(plugin, "a@example.org", "bob") is DUNNO            # the previous map stays
    errors = [formatEvent(e) for e in logged if e.get("log_level") and e["log_level"].name == "error"]
    assert errors == [f"sender login map {path} not reloaded, keeping the previous contents: "
                      f"{path}, line 2: expected 'address: login, ...', got 'broken'"]


def test_parse_collects_logins_case_folded():
    table = parse_sender_logins("a@example.org: Alice,bob ,  carol\n  DAVE\n", "f")
    assert table.entries == {"a@example.org": frozenset({"alice", "bob", "carol", "dave"})}
    assert table.owners("A+x@EXAMPLE.ORG") == frozenset({"alice", "bob", "carol", "dave"})
    assert table.owners("postmaster") is None
