"""Pipe delivery and aliases through a real server: smtplib in, commands and Maildirs out."""

from __future__ import annotations

import os
import smtplib
import textwrap

import pytest

from conftest import routes_toml, wait_for_log
from pipekit import box, unprivileged_user  # noqa: F401  (box is a fixture)

DOMAINS = ("example.test", "pipe.test", "lists.test")

DECIDE = """\
case "$1" in
  nouser@*) printf 'no mailbox for %s' "$1"; exit 67;;
  tempfail@*) printf 'spool busy'; exit 75;;
esac
"""


@pytest.fixture
def pipe_server(make_server, box):
    user = unprivileged_user().pw_name
    script = box.script("deliver", extra=DECIDE)
    workdir_files = {}
    members = box.dir / "members"
    members.write_text("alice@example.test\nbob\n")
    workdir_files["aliases"] = textwrap.dedent(f"""\
        list@lists.test:    :include:{members}, archive
        archive@lists.test: |"{script} archive"
        staff@lists.test:   list, carol@example.test
        bob@lists.test:     bob@example.test
        team@lists.test:    alice@example.test, nouser@pipe.test
        keep@lists.test:    {box.out}/kept.mbox
        owner-team@lists.test: erin@example.test
        loop1@lists.test:   loop2
        loop2@lists.test:   loop1
        """)
    toml = f"""
        [stages]
        rcpt = ["aliases", "localdomain"]

        [plugins.aliases]
        use = "aliasmap"
        file = "aliases"
        domains = ["lists.test"]
        allow_commands = true
        allow_files = true
        command_backend = "aliaspipe"

        [backends.local]
        use = "maildir"
        base = "mail"

        [backends.pipe]
        use = "pipe"
        command = ["{script}", "{{recipient}}"]
        user = "{user}"

        [backends.aliaspipe]
        use = "pipe"
        user = "{user}"
        """ + routes_toml(("pipe.test", "pipe"), ("example.test", "local"), ("lists.test", "local"))
    server = make_server(toml, start=False, domains=DOMAINS)
    path = server.dir / "aliases"
    path.write_text(workdir_files["aliases"])
    os.chmod(path, 0o644)
    return server.start()


def test_pipe_delivery_runs_the_command_as_the_user_and_bounces_with_its_output(pipe_server, box):
    with smtplib.SMTP("127.0.0.1", pipe_server.port) as s:
        s.sendmail("alice@example.test", ["ok@pipe.test", "nouser@pipe.test"],
                   b"Subject: to a program\r\n\r\nhello\r\n")
    [bounce] = pipe_server.delivered("alice@example.test", timeout=20)
    assert b"Final-Recipient: rfc822; nouser@pipe.test" in bounce
    assert b"Status: 5.1.1" in bounce
    assert b"Diagnostic-Code: x-unix; no mailbox for nouser@pipe.test" in bounce
    runs = {run["argv"][0]: run for run in box.runs()}
    assert set(runs) == {"ok@pipe.test", "nouser@pipe.test"}
    assert runs["ok@pipe.test"]["uid"] == unprivileged_user().pw_uid
    assert b"Delivered-To: ok@pipe.test\n" in runs["ok@pipe.test"]["stdin"]
    assert runs["ok@pipe.test"]["stdin"].endswith(b"Subject: to a program\n\nhello\n")
    wait_for_log(pipe_server, r"to=<ok@pipe\.test>, relay=pipe\[.*status=sent")


def test_a_temporary_failure_is_deferred(pipe_server, box):
    with smtplib.SMTP("127.0.0.1", pipe_server.port) as s:
        s.sendmail("alice@example.test", ["tempfail@pipe.test"], b"Subject: later\r\n\r\nx\r\n")
    line = wait_for_log(pipe_server, r"to=<tempfail@pipe\.test>.*status=deferred.*")
    assert "died with status 75 (temporary failure): spool busy" in line


def test_a_list_expands_through_levels_includes_and_a_command_alias(pipe_server, box):
    with smtplib.SMTP("127.0.0.1", pipe_server.port) as s:
        s.sendmail("dave@example.test", ["staff@lists.test"], b"Subject: to staff\r\n\r\nhi\r\n")
    for member in ("alice@example.test", "bob@example.test", "carol@example.test"):
        [copy] = pipe_server.delivered(member, timeout=20)
        assert b"Subject: to staff" in copy
    wait_for_log(pipe_server, r"to=<archive@lists\.test>, orig_to=<staff@lists\.test>, "
                              r"relay=aliaspipe\[.*status=sent")
    [archive] = box.runs()
    assert archive["argv"] == ["archive"]
    assert archive["uid"] == unprivileged_user().pw_uid
    assert archive["env"]["RECIPIENT"] == "archive@lists.test"
    assert archive["env"]["ORIGINAL_RECIPIENT"] == "staff@lists.test"
    assert b"Delivered-To: archive@lists.test\n" in archive["stdin"]


def test_an_alias_loop_is_refused_at_rcpt_and_unknown_list_addresses_too(pipe_server):
    with smtplib.SMTP("127.0.0.1", pipe_server.port) as s:
        s.ehlo()
        s.mail("dave@example.test")
        code, text = s.rcpt("loop1@lists.test")
        assert code == 550
        assert text.decode() == ("5.4.6 <loop1@lists.test>: alias loop: loop1@lists.test -> "
                                 "loop2@lists.test -> loop1@lists.test")
        code, text = s.rcpt("nobody@lists.test")
        assert (code, text[:5]) == (550, b"5.1.1")
        # example.test is not a domain the map is authoritative for: localdomain decides
        assert s.rcpt("someone@example.test")[0] == 250


def test_list_mail_goes_out_as_owner_name_and_its_bounces_go_to_the_owner(pipe_server, box):
    with smtplib.SMTP("127.0.0.1", pipe_server.port) as s:
        s.sendmail("dave@example.test", ["team@lists.test"], b"Subject: to the team\r\n\r\nhi\r\n")
    [copy] = pipe_server.delivered("alice@example.test", timeout=20)
    assert copy.startswith(b"Return-Path: <owner-team@lists.test>\r\n")
    [bounce] = pipe_server.delivered("erin@example.test", timeout=20)
    assert b"Final-Recipient: rfc822; nouser@pipe.test" in bounce
    assert b"Diagnostic-Code: x-unix; no mailbox for nouser@pipe.test" in bounce
    [run] = box.runs()
    assert run["env"]["SENDER"] == "owner-team@lists.test"
    assert pipe_server.delivered("dave@example.test", timeout=0.5) == []


def test_a_file_alias_appends_as_the_backend_user(pipe_server, box):
    with smtplib.SMTP("127.0.0.1", pipe_server.port) as s:
        s.sendmail("dave@example.test", ["keep@lists.test"], b"Subject: keep\r\n\r\nFrom me\r\n")
    line = wait_for_log(pipe_server, r"to=<keep@lists\.test>, relay=aliaspipe\[file:.*")
    assert "status=sent (250 2.0.0 delivered to file: " in line
    kept = box.out / "kept.mbox"
    assert kept.stat().st_uid == unprivileged_user().pw_uid
    assert kept.read_bytes().endswith(b"Subject: keep\n\n>From me\n\n")


def test_a_root_user_or_an_unknown_placeholder_stops_start_up_with_one_line(tmp_path):
    from pymta.config.errors import ConfigError
    from pymta.config.loader import load_config
    from twisted.internet.testing import MemoryReactor
    for options, expected in [
            ('user = "root"', "backends.pipe.user: 'root' is root (uid 0): commands never run as root"),
            ('user = "nobody"\ncommand = ["/bin/cat", "{recipent}"]',
             "backends.pipe.command[1]: unknown placeholder {recipent}")]:
        config = tmp_path / "pymta.toml"
        config.write_text(f'[server]\nhostname = "mx.example.test"\ndomains = ["example.test"]\n'
                          f'[spool]\ndirectory = "{tmp_path / "spool"}"\n'
                          f'[backends.pipe]\nuse = "pipe"\n{options}\n')
        with pytest.raises(ConfigError) as caught:
            load_config(str(config), MemoryReactor())
        assert expected in str(caught.value)
        assert "\n" not in str(caught.value)


def test_command_aliases_routed_to_a_backend_that_is_no_pipe_are_deferred(make_server, box):
    server = make_server(f"""
        [stages]
        rcpt = ["aliases", "localdomain"]
        [plugins.aliases]
        use = "aliasmap"
        file = "aliases"
        allow_commands = true
        command_backend = "local"
        [backends.local]
        use = "maildir"
        base = "mail"
        """, start=False)
    (server.dir / "aliases").write_text(f"run@example.test: |{box.script('never')}\n")
    os.chmod(server.dir / "aliases", 0o644)
    server.start()
    with smtplib.SMTP("127.0.0.1", server.port) as s:
        s.ehlo()
        s.mail("dave@example.test")
        code, text = s.rcpt("run@example.test")
    assert (code, text) == (451, b"4.3.5 <run@example.test>: no delivery backend for alias commands")
    wait_for_log(server, r"alias commands and files need a pipe backend named 'local'")
