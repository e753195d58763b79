"""Alias expansion as in aliases(5): several levels, :include:, |command, loops, depth, extensions."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from pipekit import unprivileged_user
from pymta.config.errors import ConfigError
from pymta.config.options import PluginContext
from pymta.policy.aliases import (MAX_INCLUDES, MAX_TARGETS, AliasExpander, ExpansionError,
                                  Include, parse_aliases)
from pymta.policy.recipients import AliasMap
from pymta.verdict import DUNNO, AliasTarget, Kind

DOMAINS = ("example.org", "example.net")


@pytest.fixture
def context(tmp_path):
    return PluginContext("mx.example.org", DOMAINS, str(tmp_path))


def expander(text: str, **options) -> AliasExpander:
    return AliasExpander(parse_aliases(text, "aliases", allow_commands=True), **options)


def alias_map(tmp_path: Path, context, text: str, **options) -> AliasMap:
    path = tmp_path / "aliases"
    path.write_text(text)
    os.chmod(path, 0o644)
    return AliasMap({"file": "aliases", **options}, context)


def check(plugin, recipient):
    return plugin.check_recipient(None, None, recipient)


# -- levels, extensions, self-reference -------------------------------------------------------------

def test_targets_are_expanded_again_depth_first():
    aliases = expander("all@example.org: staff, bob@example.net\n"
                       "staff@example.org: alice, carol\n"
                       "carol@example.org: carol@example.net\n")
    assert aliases.expand("all@example.org") == ["alice@example.org", "carol@example.net",
                                                 "bob@example.net"]
    assert aliases.expand("nobody@example.org") is None


def test_an_alias_naming_itself_delivers_to_itself():
    aliases = expander("alice@example.org: alice, archive@example.net\n")
    assert aliases.expand("alice@example.org") == ["alice@example.org", "archive@example.net"]


def test_the_extension_is_kept_on_the_targets():
    aliases = expander("alice@example.org: alice@example.net\n"
                       "team@example.org: alice, bob+fixed@example.net\n")
    assert aliases.expand("alice+news@example.org") == ["alice+news@example.net"]
    # through two levels; a target with its own extension keeps it
    assert aliases.expand("team+x@example.org") == ["alice+x@example.net", "bob+fixed@example.net"]


def test_a_catch_all_applies_to_the_address_asked_about_not_to_targets():
    aliases = expander("@example.org: catchall@example.net\ninfo@example.org: alice\n")
    assert aliases.expand("who@example.org") == ["catchall@example.net"]
    assert aliases.expand("info@example.org") == ["alice@example.org"]


# -- loops and the depth limit -------------------------------------------------------------------

def test_a_loop_is_refused_with_the_path():
    aliases = expander("a@example.org: b\nb@example.org: c\nc@example.org: a\n")
    with pytest.raises(ExpansionError) as caught:
        aliases.expand("a@example.org")
    assert (caught.value.code, caught.value.enhanced) == (550, "5.4.6")
    assert caught.value.text == ("alias loop: a@example.org -> b@example.org -> c@example.org "
                                 "-> a@example.org")


def test_the_depth_limit():
    chain = "".join(f"l{n}@example.org: l{n + 1}\n" for n in range(12))
    with pytest.raises(ExpansionError) as caught:
        expander(chain, max_depth=10).expand("l0@example.org")
    assert caught.value.enhanced == "5.4.6"
    assert caught.value.text.startswith("alias expansion deeper than 10 levels: l0@example.org -> ")
    assert expander(chain, max_depth=13).expand("l0@example.org") == ["l12@example.org"]


def test_too_many_targets():
    text = "big@example.org: " + ", ".join(f"u{n}" for n in range(MAX_TARGETS + 1)) + "\n"
    with pytest.raises(ExpansionError) as caught:
        expander(text).expand("big@example.org")
    assert caught.value.code == 451


# -- :include: --------------------------------------------------------------------------------------

def test_include_lists_are_read_at_each_expansion(tmp_path):
    members = tmp_path / "members"
    members.write_text("# the list\nalice\nbob@example.net, carol@example.net\n\n")
    aliases = expander(f"list@example.org: :include:{members}\n"
                       "alice@example.org: alice@example.net\n")
    assert aliases.expand("list@example.org") == ["alice@example.net", "bob@example.net",
                                                  "carol@example.net"]
    members.write_text("dave@example.net\n")
    assert aliases.expand("list@example.org") == ["dave@example.net"]


def test_an_include_including_itself_is_a_loop(tmp_path):
    members = tmp_path / "members"
    members.write_text(f"alice\n:include:{members}\n")
    with pytest.raises(ExpansionError) as caught:
        expander(f"list@example.org: :include:{members}\n").expand("list@example.org")
    assert "alias loop" in caught.value.text


def test_a_broken_include_defers_and_the_reply_does_not_name_the_file(tmp_path):
    aliases = expander(f"list@example.org: :include:{tmp_path}/missing\n")
    with pytest.raises(ExpansionError) as caught:
        aliases.expand("list@example.org")
    assert (caught.value.code, caught.value.enhanced) == (451, "4.3.5")
    assert str(tmp_path) not in caught.value.text
    assert f"{tmp_path}/missing: include: cannot read" in caught.value.detail


def test_commands_in_an_include_file_are_refused(tmp_path):
    members = tmp_path / "members"
    members.write_text("alice\n|/bin/sh -c evil\n")
    with pytest.raises(ExpansionError) as caught:
        expander(f"list@example.org: :include:{members}\n").expand("list@example.org")
    assert "commands are allowed only in the system alias file" in caught.value.detail


# -- |command ---------------------------------------------------------------------------------------

def test_a_command_target_names_the_alias_and_the_pipe_backend():
    aliases = expander('list@example.org: archive, "|/usr/bin/list-post --name main"\n'
                       "archive@example.org: |/usr/bin/archive\n", command_backend="aliaspipe")
    assert aliases.expand("list@example.org") == [
        AliasTarget("archive@example.org", "/usr/bin/archive", "aliaspipe"),
        AliasTarget("list@example.org", "/usr/bin/list-post --name main", "aliaspipe")]


def test_commands_need_allow_commands(tmp_path, context):
    with pytest.raises(ConfigError) as caught:
        alias_map(tmp_path, context, "a@example.org: |/usr/bin/prog\n")
    assert str(caught.value) == (f"{tmp_path / 'aliases'}: line 1: target '|/usr/bin/prog': "
                                 "commands are allowed only in the system alias file "
                                 "(allow_commands = true)")
    plugin = alias_map(tmp_path, context, "a@example.org: |/usr/bin/prog\n", allow_commands=True)
    verdict = check(plugin, "a@example.org")
    assert verdict.rewrite == (AliasTarget("a@example.org", "/usr/bin/prog", "pipe"),)


def test_a_command_file_writable_by_others_is_refused(tmp_path, context):
    path = tmp_path / "aliases"
    path.write_text("a@example.org: |/usr/bin/prog\n")
    os.chmod(path, 0o664)
    with pytest.raises(ConfigError) as caught:
        AliasMap({"file": "aliases", "allow_commands": True}, context)
    assert "writable by group or others" in str(caught.value)


def test_a_command_must_be_an_absolute_path():
    with pytest.raises(ConfigError) as caught:
        expander("a@example.org: |prog\n")
    assert "the command must start with an absolute path" in str(caught.value)


# -- owner-NAME ---------------------------------------------------------------------------------------

def test_the_members_of_a_list_with_an_owner_get_the_owner_as_sender():
    aliases = expander("list@example.org: alice, sub, |/usr/bin/archive\n"
                       "owner-list@example.org: bob\n"
                       "sub@example.org: carol, dave\n"
                       "owner-sub@example.org: erin\n"
                       "list-request@example.org: bob\n"
                       "plain@example.org: frank\n")
    assert aliases.expand("list@example.org") == [
        AliasTarget("alice@example.org", sender="owner-list@example.org"),
        AliasTarget("carol@example.org", sender="owner-sub@example.org"),   # innermost owner
        AliasTarget("dave@example.org", sender="owner-sub@example.org"),
        AliasTarget("list@example.org", "/usr/bin/archive", "pipe", "owner-list@example.org")]
    # an owner's own mail, a -request address and an alias without owner: senders unchanged
    assert aliases.expand("owner-list@example.org") == ["bob@example.org"]
    assert aliases.expand("list-request@example.org") == ["bob@example.org"]
    assert aliases.expand("plain@example.org") == ["frank@example.org"]


# -- /path/to/file ------------------------------------------------------------------------------------

def test_file_targets_need_allow_files_and_a_clean_absolute_path(tmp_path):
    text = 'archive@example.org: /var/archive/list.mbox, "/var/archive/with blank"\n'
    with pytest.raises(ConfigError) as caught:
        parse_aliases(text, "aliases", allow_commands=True)
    assert "files are allowed only in the system alias file (allow_files = true)" in str(caught.value)
    aliases = AliasExpander(parse_aliases(text, "aliases", allow_files=True), command_backend="ap")
    assert aliases.expand("archive@example.org") == [
        AliasTarget("archive@example.org", ":file:/var/archive/list.mbox", "ap"),
        AliasTarget("archive@example.org", ":file:/var/archive/with blank", "ap")]
    with pytest.raises(ConfigError) as caught:
        parse_aliases("a@example.org: /var/../etc/passwd\n", "aliases", allow_files=True)
    assert "without '..'" in str(caught.value)
    members = tmp_path / "members"
    members.write_text("/tmp/evil\n")
    with pytest.raises(ExpansionError) as caught:
        AliasExpander(parse_aliases(f"l@example.org: :include:{members}\n", "aliases",
                                    allow_files=True)).expand("l@example.org")
    assert "files are allowed only in the system alias file" in caught.value.detail


# -- the plugin: authoritative domains, replies -------------------------------------------------------

def test_only_the_listed_domains_reject_unknown_addresses(tmp_path, context):
    plugin = alias_map(tmp_path, context, "info@example.net: alice@example.org\n",
                       domains=["example.net"])
    assert check(plugin, "nobody@example.net").code == 550
    assert check(plugin, "nobody@example.org") is DUNNO
    assert check(plugin, "info@example.net").rewrite == ("alice@example.org",)


def test_a_loop_is_a_550_at_rcpt(tmp_path, context):
    plugin = alias_map(tmp_path, context, "a@example.org: b\nb@example.org: a\n")
    verdict = check(plugin, "a@example.org")
    assert (verdict.kind, verdict.code, verdict.enhanced) == (Kind.REJECT, 550, "5.4.6")
    assert verdict.text == "<a@example.org>: alias loop: a@example.org -> b@example.org -> a@example.org"


def test_a_broken_include_is_a_451_at_rcpt(tmp_path, context):
    plugin = alias_map(tmp_path, context, f"l@example.org: :include:{tmp_path}/gone\n")
    verdict = check(plugin, "l@example.org")
    assert (verdict.kind, verdict.code) == (Kind.DEFER, 451)


# -- the README's example -----------------------------------------------------------------------------

def test_the_readme_alias_file_does_what_the_readme_says():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    [text] = re.findall(r"^```aliases\n(.*?)^```", readme, re.S | re.M)
    staff_file = "/etc/pymta/lists/staff"
    aliases = AliasExpander(parse_aliases(text, "README.md", allow_commands=True),
                            command_backend="aliaspipe",
                            include_reader=lambda path, domain: ["carol@example.org"] if path == staff_file else [])
    assert aliases.expand("alice@example.org") == ["alice@example.org", "alice@home.example"]
    assert aliases.expand("alice+news@example.org") == ["alice+news@example.org",
                                                        "alice+news@home.example"]
    owner = "owner-staff@example.org"        # the members of staff get its owner as sender
    assert aliases.expand("announce@example.org") == [
        AliasTarget("alice@example.org", sender=owner), AliasTarget("alice@home.example", sender=owner),
        AliasTarget("bob@example.org", sender=owner), AliasTarget("carol@example.org", sender=owner),
        AliasTarget("announce@example.org", "/usr/local/bin/archive --list announce", "aliaspipe")]
    assert aliases.expand("anyone@example.net") == ["alice@example.org", "alice@home.example"]


def test_includes_of_includes_are_bounded():
    # a user's include file of 1000 includes of a file of 1000 includes of an empty file
    # would be read a million times, on the reactor, for one RCPT
    reads = []

    def reader(path, domain):
        reads.append(path)
        return [Include(f"/lists/{len(reads)}-{n}") for n in range(1000)] if len(reads) < 3 else []
    aliases = expander("list@example.org: :include:/lists/top\n", include_reader=reader)
    with pytest.raises(ExpansionError) as caught:
        aliases.expand("list@example.org")
    assert (caught.value.code, caught.value.enhanced) == (451, "4.3.0")
    assert f"more than {MAX_INCLUDES} include files" in caught.value.text
    assert len(reads) == MAX_INCLUDES
    assert aliases.expand("alice@example.org") is None      # the count is per expansion


def test_a_long_chain_of_includes_is_refused_not_a_recursion_error():
    aliases = expander("list@example.org: :include:/lists/0\n",
                       include_reader=lambda path, domain: [Include(f"{path}/x")])
    with pytest.raises(ExpansionError) as caught:
        aliases.expand("list@example.org")
    assert caught.value.code == 451



def test_an_include_file_of_a_user_reads_only_what_that_user_may_read(tmp_path):
    # whoever writes a list file names (or links to) a file only the server may read:
    # its lines would come back as recipient addresses in bounces
    user = unprivileged_user()
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$salt$hash:19000:0:99999:7:::\n")
    os.chmod(secret, 0o600)
    members = tmp_path / "members"
    members.write_text(f"alice\n:include:{secret}\n")
    os.chown(members, user.pw_uid, user.pw_gid)
    linked = tmp_path / "linked"
    linked.symlink_to(secret)
    os.lchown(linked, user.pw_uid, user.pw_gid)
    for include in (members, linked):
        with pytest.raises(ExpansionError) as caught:
            expander(f"list@example.org: :include:{include}\n").expand("list@example.org")
        assert (caught.value.code, caught.value.enhanced) == (451, "4.3.5")
        assert f"not readable by uid {user.pw_uid}, who names it" in caught.value.detail
    # the administrator's own files are read as before; so is what the user may read
    assert expander(f"list@example.org: :include:{secret}\n").expand("list@example.org") == \
        ["root:$6$salt$hash:19000:0:99999:7:::@example.org"]
    os.chown(secret, user.pw_uid, user.pw_gid)
    assert expander(f"list@example.org: :include:{members}\n").expand("list@example.org") == \
        ["alice@example.org", "root:$6$salt$hash:19000:0:99999:7:::@example.org"]
