"""The built-in recipient validators: localdomain, static, aliasmap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from twisted.logger import globalLogPublisher
from zope.interface.verify import verifyObject

from pymta.config.errors import ConfigError, OptionError
from pymta.config.options import PluginContext
from pymta.interfaces import IRecipientPolicy
from pymta.plugin_api import split_extension, strip_extension
from pymta.policy.recipients import (AliasMap, LocalDomainRecipients, StaticRecipients,
                                     parse_aliases)
from pymta.session import Session, Transaction
from pymta.verdict import DUNNO, Kind, Verdict

SESSION = Session(client_ip="192.0.2.1", client_port=40000)
TRANSACTION = Transaction(sender="sender@example.com")
DOMAINS = ("example.org", "example.net", "xn--bcher-kva.example")


@pytest.fixture
def context(tmp_path):
    return PluginContext("mx.example.org", DOMAINS, str(tmp_path))


def check(plugin, recipient: str) -> Verdict:
    return plugin.check_recipient(SESSION, TRANSACTION, recipient)


def user_unknown(recipient: str) -> Verdict:
    return Verdict.reject(f"<{recipient}>: Recipient address rejected: User unknown", 550, "5.1.1")


def test_strip_extension():
    assert strip_extension("alice+lists", "+") == "alice"
    assert strip_extension("alice-x+y", "+-") == "alice"
    assert strip_extension("alice", "+") is None
    assert strip_extension("+alice", "+") is None
    assert strip_extension("alice+x", "") is None


def test_split_extension_is_the_one_rule_of_the_recipient_check_and_the_mailboxes():
    assert split_extension("alice+lists", "+") == ("alice", "lists")
    assert split_extension("alice-x+y", "+-") == ("alice", "x+y")
    assert split_extension("alice+", "+") == ("alice", "")
    assert split_extension("+alice", "+") == ("+alice", None)
    assert split_extension("alice+x", "") == ("alice+x", None)


# -- localdomain ----------------------------------------------------------------

@pytest.mark.parametrize("recipient", [
    "alice@example.org", "Alice@Example.ORG", "alice@example.org.", "alice+lists@example.org",
    "alice+@example.org", "j.doe@example.net", "alice@bücher.example", "ünïcode@example.org",
    "a" * 64 + "@example.org", "+alice@example.org"])
def test_localdomain_accepts_safe_names(context, recipient):
    plugin = LocalDomainRecipients({}, context)
    assert verifyObject(IRecipientPolicy, plugin)
    assert check(plugin, recipient) == Verdict.accept()


@pytest.mark.parametrize("recipient", [
    ".hidden@example.org", "a..b@example.org", "a/b@example.org", "a\\b@example.org",
    "a\x00b@example.org", "a\x07@example.org", "a" * 65 + "@example.org",
    "alice+../x@example.org", "alice+.x@example.org", "alice+x/y@example.org"])
def test_localdomain_rejects_unsafe_names(context, recipient):
    verdict = check(LocalDomainRecipients({}, context), recipient)
    assert verdict == Verdict.reject(
        f"<{recipient}>: Recipient address rejected: invalid mailbox name", 550, "5.1.1")


def test_localdomain_has_no_opinion_on_other_domains(context):
    plugin = LocalDomainRecipients({}, context)
    assert check(plugin, "alice@example.com") is DUNNO
    assert check(plugin, ".bad@example.com") is DUNNO
    assert check(plugin, "postmaster") is DUNNO


def test_localdomain_delimiter_option(context):
    plugin = LocalDomainRecipients({"recipient_delimiter": "-"}, context)
    assert check(plugin, "alice-x@example.org").kind is Kind.ACCEPT
    assert check(plugin, "alice-.x@example.org").kind is Kind.REJECT
    assert check(plugin, "alice+.x@example.org").kind is Kind.ACCEPT   # "+" is now just a character
    no_extensions = LocalDomainRecipients({"recipient_delimiter": ""}, context)
    assert check(no_extensions, "alice+.x@example.org").kind is Kind.ACCEPT


@pytest.mark.parametrize("options, key, problem", [
    ({"recipient_delimiter": "@"}, "recipient_delimiter", "'@' cannot be a delimiter"),
    ({"recipient_delimiter": 1}, "recipient_delimiter", "expected a string, got integer 1"),
    ({"delimiter": "+"}, "delimiter", "unknown key (did you mean 'recipient_delimiter'?)"),
])
def test_localdomain_option_errors(context, options, key, problem):
    with pytest.raises(OptionError) as info:
        LocalDomainRecipients(options, context)
    assert info.value.key == key and problem in info.value.problem


# -- static ---------------------------------------------------------------------

def test_static(context):
    plugin = StaticRecipients({"addresses": ["Alice@Example.org", "@example.net",
                                             "bob@partner.example", "carol@bücher.example"]}, context)
    assert verifyObject(IRecipientPolicy, plugin)
    for accepted in ("alice@example.org", "ALICE@EXAMPLE.ORG", "alice+tag@example.org",
                     "anyone@example.net", "bob@partner.example", "carol@xn--bcher-kva.example",
                     "carol@Bücher.example"):
        assert check(plugin, accepted) == Verdict.accept(), accepted
    assert check(plugin, "bob@example.org") == user_unknown("bob@example.org")
    assert check(plugin, "dave@bücher.example") == user_unknown("dave@bücher.example")
    assert check(plugin, "dave@partner.example") is DUNNO
    assert check(plugin, "alice@example.com") is DUNNO


def test_static_without_extensions(context):
    plugin = StaticRecipients({"addresses": ["alice@example.org"], "recipient_delimiter": ""}, context)
    assert check(plugin, "alice+tag@example.org").kind is Kind.REJECT


@pytest.mark.parametrize("options, key, problem", [
    ({}, "addresses", "required option missing"),
    ({"addresses": "alice@example.org"}, "addresses", "expected an array of strings"),
    ({"addresses": ["alice@example.org", "bob"]}, "addresses[1]",
     "expected 'user@domain' or '@domain', got 'bob'"),
    ({"addresses": ["bob@"]}, "addresses[0]", "expected 'user@domain' or '@domain'"),
    ({"addresses": ["bob@exa mple.org"]}, "addresses[0]", "invalid domain 'exa mple.org'"),
    ({"addresses": [], "extra": 1}, "extra", "unknown key"),
])
def test_static_option_errors(context, options, key, problem):
    with pytest.raises(OptionError) as info:
        StaticRecipients(options, context)
    assert info.value.key == key and problem in info.value.problem


# -- aliasmap: the file format ----------------------------------------------------

ALIASES = """\
# a comment
info@example.net:   alice@example.org
Sales@Example.NET:  alice@example.org,
                    bob@example.org     # continuation with a comment

   # an indented comment does not continue anything
support@example.net: helpdesk, Carol@Bücher.Example
@bücher.example:    postmaster@example.org
"""


def test_parse_aliases():
    table = parse_aliases(ALIASES, "aliases")
    assert dict(table.entries) == {
        "info@example.net": ("alice@example.org",),
        "sales@example.net": ("alice@example.org", "bob@example.org"),
        "support@example.net": ("helpdesk@example.net", "Carol@xn--bcher-kva.example"),
        "@xn--bcher-kva.example": ("postmaster@example.org",),
    }
    assert table.domains == {"example.net", "xn--bcher-kva.example"}


@pytest.mark.parametrize("text, line, problem", [
    ("  alice@example.org\n", 1, "continuation line (starts with whitespace) before any entry"),
    ("# c\n\nalice@example.org alice\n", 3, "expected 'address: target, ...'"),
    ("alice: bob@example.org\n", 1, "expected 'user@domain' or '@domain' before ':', got 'alice'"),
    ("alice@: bob@example.org\n", 1, "expected 'user@domain' or '@domain' before ':'"),
    ("alice@exa_mple.org: bob\n", 1, "invalid domain 'exa_mple.org'"),
    ("a@example.org: b\nA@EXAMPLE.ORG: c\n", 2, "duplicate entry for 'a@example.org' (first on line 1)"),
    ("a@example.org:\n", 1, "no targets for 'a@example.org'"),
    ("a@example.org: b,\n  |/usr/bin/procmail\n", 2,
     "commands are allowed only in the system alias file (allow_commands = true)"),
    ("a@example.org: /var/mail/a\n", 1,
     "files are allowed only in the system alias file (allow_files = true)"),
    ("a@example.org: :include:etc/list\n", 1, "an include file needs an absolute path"),
    ("a@example.org: b c\n", 1, "target 'b c' contains whitespace"),
    ("a@example.org: b@\n", 1, "target 'b@' is not 'user@domain'"),
    ("a@example.org: b@exa mple.org\n", 1, "contains whitespace"),
    ("a@example.org: b@-bad.org\n", 1, "target 'b@-bad.org': invalid domain"),
])
def test_alias_syntax_errors(text, line, problem):
    with pytest.raises(ConfigError) as info:
        parse_aliases(text, "/etc/pymta/aliases")
    message = str(info.value)
    assert message.startswith(f"/etc/pymta/aliases: line {line}: "), message
    assert problem in message and "\n" not in message


# -- aliasmap: lookups and reload ----------------------------------------------------

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def alias_map(tmp_path: Path, context, text: str, **options) -> tuple[AliasMap, FakeClock]:
    (tmp_path / "aliases").write_text(text, encoding="utf-8")
    clock = FakeClock()
    return AliasMap({"file": "aliases", **options}, context, clock=clock), clock


def rewrite(*targets: str) -> Verdict:
    return Verdict.accept(rewrite=targets)


MAPPED = ["example.net", "bücher.example"]


def test_aliasmap_lookups(tmp_path, context):
    plugin, _ = alias_map(tmp_path, context, ALIASES, domains=MAPPED)
    assert verifyObject(IRecipientPolicy, plugin)
    assert check(plugin, "info@example.net") == rewrite("alice@example.org")
    assert check(plugin, "INFO@Example.Net") == rewrite("alice@example.org")
    # the extension is kept on the target (was dropped before multi-level aliases)
    assert check(plugin, "info+news@example.net") == rewrite("alice+news@example.org")
    assert check(plugin, "sales@example.net") == rewrite("alice@example.org", "bob@example.org")
    assert check(plugin, "anyone@bücher.example") == rewrite("postmaster@example.org")
    assert check(plugin, "nobody@example.net") == user_unknown("nobody@example.net")
    assert check(plugin, "alice@example.org") is DUNNO      # not a mapped domain
    assert check(plugin, "alice@elsewhere.example") is DUNNO


def test_aliasmap_exact_match_wins_over_extension_and_catch_all(tmp_path, context):
    plugin, _ = alias_map(tmp_path, context,
                          "a+x@example.net: exact\na@example.net: base\n@example.net: all\n")
    assert check(plugin, "a+x@example.net") == rewrite("exact@example.net")
    assert check(plugin, "a+y@example.net") == rewrite("base+y@example.net")   # extension kept
    assert check(plugin, "b@example.net") == rewrite("all@example.net")


def test_aliasmap_expands_several_levels(tmp_path, context):
    # was: one level only ("a" went to "b"); aliases(5) expands the targets again
    plugin, _ = alias_map(tmp_path, context, "a@example.net: b\nb@example.net: c\n")
    assert check(plugin, "a@example.net") == rewrite("c@example.net")


def test_aliasmap_without_domains_is_authoritative_nowhere(tmp_path, context):
    # was: any entry made its whole domain "mapped" (unknown addresses there: 550)
    plugin, _ = alias_map(tmp_path, context, ALIASES)
    assert check(plugin, "nobody@example.net") is DUNNO
    assert check(plugin, "info@example.net") == rewrite("alice@example.org")


def test_aliasmap_unmatched_dunno(tmp_path, context):
    plugin, _ = alias_map(tmp_path, context, ALIASES, unmatched="dunno", domains=MAPPED)
    assert check(plugin, "nobody@example.net") is DUNNO
    assert check(plugin, "info@example.net") == rewrite("alice@example.org")


def test_aliasmap_delimiter_option(tmp_path, context):
    plugin, _ = alias_map(tmp_path, context, ALIASES, recipient_delimiter="", domains=MAPPED)
    assert check(plugin, "info+news@example.net") == user_unknown("info+news@example.net")


@pytest.mark.parametrize("options, key, problem", [
    ({}, "file", "required option missing"),
    ({"file": "missing"}, "file", "cannot read "),
    ({"file": "aliases", "unmatched": "drop"}, "unmatched", "expected one of 'reject', 'dunno'"),
    ({"file": "aliases", "fiel": "x"}, "fiel", "unknown key"),
])
def test_aliasmap_option_errors(tmp_path, context, options, key, problem):
    (tmp_path / "aliases").write_text(ALIASES)
    with pytest.raises(OptionError) as info:
        AliasMap(options, context)
    assert info.value.key == key and problem in info.value.problem


def test_aliasmap_syntax_error_at_start_names_file_and_line(tmp_path, context):
    (tmp_path / "aliases").write_text("ok@example.net: a\nbroken line\n")
    with pytest.raises(ConfigError) as info:
        AliasMap({"file": "aliases"}, context)
    assert str(info.value).startswith(f"{tmp_path / 'aliases'}: line 2: expected 'address: target")


def test_aliasmap_reloads_when_the_file_changes(tmp_path, context):
    plugin, clock = alias_map(tmp_path, context, "a@example.net: one@example.org\n")
    assert check(plugin, "a@example.net") == rewrite("one@example.org")
    path = tmp_path / "aliases"
    path.write_text("a@example.net: two@example.org\nb@example.net: b2@example.org\n")
    clock.now += 0.5                       # checked at most once a second
    assert check(plugin, "a@example.net") == rewrite("one@example.org")
    clock.now += 0.6
    assert check(plugin, "a@example.net") == rewrite("two@example.org")
    assert check(plugin, "b@example.net") == rewrite("b2@example.org")


def test_aliasmap_sees_a_change_of_same_size(tmp_path, context):
    plugin, clock = alias_map(tmp_path, context, "a@example.net: x1\n")
    path = tmp_path / "aliases"
    before = path.stat()
    path.write_text("a@example.net: x2\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000))
    clock.now += 1.0
    assert check(plugin, "a@example.net") == rewrite("x2@example.net")


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def test_aliasmap_keeps_previous_map_when_reload_fails(tmp_path, context, logged):
    plugin, clock = alias_map(tmp_path, context, "a@example.net: one@example.org\n")
    path = tmp_path / "aliases"
    path.write_text("a@example.net: two@example.org\nbroken\n")
    clock.now += 1.0
    assert check(plugin, "a@example.net") == rewrite("one@example.org")
    errors = [e for e in logged if e.get("log_level") is not None and e["log_level"].name == "error"]
    assert len(errors) == 1
    assert f"{path}: line 2: expected 'address: target" in errors[0]["problem"]
    clock.now += 1.0                       # still broken, unchanged: not logged again
    assert check(plugin, "a@example.net") == rewrite("one@example.org")
    assert len([e for e in logged if e.get("log_level") and e["log_level"].name == "error"]) == 1
    path.write_text("a@example.net: three@example.org\n")   # fixed
    clock.now += 1.0
    assert check(plugin, "a@example.net") == rewrite("three@example.org")


def test_aliasmap_keeps_previous_map_when_file_disappears(tmp_path, context, logged):
    plugin, clock = alias_map(tmp_path, context, "a@example.net: one@example.org\n")
    (tmp_path / "aliases").unlink()
    clock.now += 1.0
    assert check(plugin, "a@example.net") == rewrite("one@example.org")
    assert any("cannot be read" in (e.get("log_format") or "") for e in logged)


def test_aliasmap_reports_reloads_in_its_own_words_on_its_own_logger(tmp_path, context, logged):
    plugin, clock = alias_map(tmp_path, context, "a@example.net: one@example.org\n")
    (tmp_path / "aliases").write_text("a@example.net: two\nb@example.net: three\n")
    clock.now += 1.0
    assert plugin.reload_if_changed() is True
    [event] = [e for e in logged if "reloaded" in (e.get("log_format") or "")]
    assert event["log_format"] == "alias map {path} reloaded: {count} entries"
    assert (event["path"], event["count"]) == (str(tmp_path / "aliases"), 2)
    assert event["log_namespace"] == "pymta.policy.recipients.AliasMap"
    assert event["log_source"] is plugin
