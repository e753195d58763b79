"""The pipe delivery backend: a real command run as an unprivileged user, exit statuses, argv."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
import signal

import pytest

from fakesmtp import run_reactor
from pipekit import box, unprivileged_user  # noqa: F401  (box is a fixture)
from relaykit import LocalContext, spooled, statuses
from pymta.config.errors import OptionError
from pymta.delivery.pipe import PipeBackend
from pymta.envelope import Recipient

BODY = b"Subject: test\r\n\r\nline one\r\nline two\r\n"


def backend(tmp_path, reactor, command, **options):
    return PipeBackend({"command": command, "user": unprivileged_user().pw_name, **options},
                       LocalContext(tmp_path, reactor))


def deliver(tmp_path, command, *recipients, message_options=None, **options):
    def test(reactor):
        pipe = backend(tmp_path, reactor, command, **options)
        message = spooled(tmp_path, *recipients, body=BODY, **(message_options or {}))
        return pipe.deliver(message, message.envelope.recipients)
    return run_reactor(test)


# -- exit statuses ------------------------------------------------------------------------------

def test_status_0_delivers_as_the_configured_user_with_the_message_on_stdin(tmp_path, box):
    script = box.script("ok")
    results = deliver(tmp_path, [script, "{recipient}"], "alice@example.org")
    assert statuses(results) == ["delivered"]
    assert results[0].text == f"delivered to command: {script}"
    [run] = box.runs()
    assert run["uid"] == unprivileged_user().pw_uid != 0
    assert run["argv"] == ["alice@example.org"]
    assert run["stdin"] == (b"Return-Path: <sender@local.test>\nDelivered-To: alice@example.org\n"
                            b"Received: by test\nSubject: test\n\nline one\nline two\n")
    assert run["env"]["RECIPIENT"] == "alice@example.org"
    assert run["env"]["SENDER"] == "sender@local.test"


@pytest.mark.parametrize("status, outcome, enhanced", [
    (75, "deferred", "4.3.0"),     # EX_TEMPFAIL
    (71, "deferred", "4.3.0"),     # EX_OSERR
    (67, "failed", "5.1.1"),       # EX_NOUSER
    (65, "failed", "5.6.0"),       # EX_DATAERR
    (64, "failed", "5.3.0"),       # EX_USAGE
    (77, "failed", "5.7.0"),       # EX_NOPERM
    (78, "failed", "5.3.5"),       # EX_CONFIG
    (1, "failed", "5.3.0"),        # not in sysexits.h
])
def test_exit_status_decides_retry_or_bounce_and_the_output_is_quoted(tmp_path, box, status,
                                                                      outcome, enhanced):
    script = box.script("exits", status=status, output=f"said: status {status}")
    [result] = deliver(tmp_path, [script, "{recipient}"], "alice@example.org")
    assert result.status == outcome
    assert result.enhanced == enhanced
    assert result.code == (451 if outcome == "deferred" else 550)
    assert f"died with status {status}" in result.text
    assert f"said: status {status}" in result.text
    assert result.diagnostic == f"x-unix; said: status {status}"


def test_killed_by_a_signal_is_retried(tmp_path, box):
    script = box.script("killed", extra="kill -TERM $$")
    [result] = deliver(tmp_path, [script], "alice@example.org")
    assert result.status == "deferred"
    assert f"killed by signal {signal.SIGTERM}" in result.text


def test_time_limit_kills_the_process_group_and_retries(tmp_path, box):
    # the command starts a child that would outlive it; both are killed
    script = box.script("slow", extra=f'sleep 30 & echo $! > "$d/child"; wait')
    [result] = deliver(tmp_path, [script], "alice@example.org", timeout="1s")
    assert result.status == "deferred"
    assert "time limit of 1s exceeded" in result.text
    child = int((box.out / "child").read_text())
    assert not running(child)


def running(pid: int) -> bool:
    """``pid`` exists and is not a zombie (a killed orphan may wait for its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_command_that_reads_nothing_of_a_large_message_is_fine(tmp_path, box):
    script = box.script("noread", read_stdin=False, status=0)

    def test(reactor):
        pipe = backend(tmp_path, reactor, [script])
        message = spooled(tmp_path, "a@example.org",
                          body=b"Subject: big\r\n\r\n" + b"x" * 998 + b"\r\n" * 8 * 1024 * 1024)
        return pipe.deliver(message, message.envelope.recipients)
    assert statuses(run_reactor(test)) == ["delivered"]


def test_a_large_message_arrives_whole(tmp_path, box):
    script = box.script("big")
    body = b"Subject: big\r\n\r\n" + (b"y" * 76 + b"\r\n") * 200_000     # ~15 MiB
    def test(reactor):
        pipe = backend(tmp_path, reactor, [script], return_path=False, delivered_to=False,
                       line_endings="crlf")
        message = spooled(tmp_path, "a@example.org", body=body, prepend=())
        return pipe.deliver(message, message.envelope.recipients)
    assert statuses(run_reactor(test, timeout=60)) == ["delivered"]
    assert box.runs()[0]["stdin"] == body


def test_output_is_bounded(tmp_path, box):
    script = box.script("chatty", status=1, extra="head -c 100000 /dev/zero | tr '\\0' 'z'")
    [result] = deliver(tmp_path, [script], "alice@example.org")
    assert result.status == "failed"
    assert result.text.endswith("z ...")
    assert len(result.text) < 1200


# -- argv ---------------------------------------------------------------------------------------

def test_placeholders_are_filled_per_argument_and_never_reach_a_shell(tmp_path, box):
    script = box.script("argv")
    hostile = Recipient('"$(touch /tmp/pwned);x y"+ext@example.org',
                        '"$(touch /tmp/pwned);x y"+ext@example.org', "out")
    results = deliver(tmp_path, [script, "--to={recipient}", "{user}", "{extension}", "{domain}",
                                 "{sender}", "{queue_id}", "{{literal}}"], hostile,
                      message_options={"queue_id": "QID123"})
    assert statuses(results) == ["delivered"]
    [run] = box.runs()
    assert run["argv"] == ['--to="$(touch /tmp/pwned);x y"+ext@example.org',
                           '"$(touch /tmp/pwned);x y"', "ext", "example.org",
                           "sender@local.test", "QID123", "{literal}"]
    assert not os.path.exists("/tmp/pwned")


def test_an_address_starting_with_a_dash_is_not_passed_as_an_option(tmp_path, box):
    script = box.script("argv")
    [result] = deliver(tmp_path, [script, "{recipient}"], "-oQ/tmp/x@example.org")
    assert result.status == "failed"
    assert result.enhanced == "5.1.3"
    assert "beginning with '-'" in result.text
    assert box.runs() == []


def test_without_a_per_recipient_placeholder_it_runs_once_per_message(tmp_path, box):
    script = box.script("once")
    results = deliver(tmp_path, [script, "{sender}"], "a@example.org", "b@example.org")
    assert statuses(results) == ["delivered", "delivered"]
    [run] = box.runs()
    assert not run["stdin"].startswith(b"Return-Path: <sender@local.test>\nDelivered-To")


def test_with_a_per_recipient_placeholder_it_runs_once_per_recipient(tmp_path, box):
    script = box.script("each")
    deliver(tmp_path, [script, "{user}"], "a@example.org", "b@example.org")
    assert sorted(run["argv"][0] for run in box.runs()) == ["a", "b"]


def test_concurrency_limits_the_commands_running_at_once(tmp_path, box):
    # each run notes how many runs are in progress when it starts
    script = box.script("count", extra=(
        f'echo x >> "$d/running"; wc -l < "$d/running" >> "$d/seen"; sleep 0.3; '
        f'sed -i 1d "$d/running"'))
    results = deliver(tmp_path, [script, "{recipient}"], *[f"u{n}@example.org" for n in range(4)],
                      concurrency=1)
    assert statuses(results) == ["delivered"] * 4
    assert [int(n) for n in (box.out / "seen").read_text().split()] == [1, 1, 1, 1]


# -- configuration --------------------------------------------------------------------------------

@pytest.mark.parametrize("options, key, problem", [
    ({"user": "root"}, "user", "never run as root"),
    ({"user": "no-such-user-here"}, "user", "no such user"),
    ({"command": ["/bin/true", "{recipent}"]}, "command[1]", "unknown placeholder {recipent}"),
    ({"command": ["bin/true"]}, "command[0]", "not an absolute path"),
    ({"command": ["/bin/{user}"]}, "command[0]", "no placeholders"),
    ({"command": []}, "command", ""),
])
def test_bad_options_name_the_key(tmp_path, options, key, problem):
    unprivileged_user()
    with pytest.raises(OptionError) as caught:
        PipeBackend({"command": ["/bin/true"], "user": "pymtatest", **options},
                    LocalContext(tmp_path))
    assert caught.value.key == key
    assert problem in str(caught.value)


def test_a_command_that_closes_its_output_before_exiting_is_seen_to_exit(tmp_path, box):
    # the test reactor has no SIGCHLD handler: the exit is found by looking for it
    script = box.script("closes", status=77, extra="exec >&- 2>&-; sleep 0.5")
    [result] = deliver(tmp_path, [script], "alice@example.org")
    assert (result.status, result.enhanced) == ("failed", "5.7.0")


# -- /path/to/file alias targets (appended by the same backend, as its user) -----------------------

def file_recipient(path) -> Recipient:
    return Recipient("archive@example.org", "list@example.org", "out", command=f":file:{path}")


def test_a_file_target_is_appended_in_mbox_form_as_the_user(tmp_path, box):
    target = box.out / "archive.mbox"
    body = b"Subject: one\r\n\r\nFrom here\r\n>From there\r\n"

    def test(reactor):
        pipe = PipeBackend({"user": unprivileged_user().pw_name}, LocalContext(tmp_path, reactor))
        first = spooled(tmp_path, file_recipient(target), body=body, prepend=())
        second = spooled(tmp_path, file_recipient(target), body=b"Subject: two\r\n\r\nx\r\n",
                         prepend=())
        d = pipe.deliver(first, first.envelope.recipients)
        d.addCallback(lambda r1: pipe.deliver(second, second.envelope.recipients)
                      .addCallback(lambda r2: r1 + r2))
        return d
    results = run_reactor(test)
    assert statuses(results) == ["delivered", "delivered"]
    assert results[0].text == f"delivered to file: {target}"
    assert target.stat().st_uid == unprivileged_user().pw_uid
    text = target.read_bytes()
    assert text.startswith(b"From sender@local.test ")
    assert (b"Return-Path: <sender@local.test>\nDelivered-To: archive@example.org\n"
            b"Subject: one\n\n>From here\n>>From there\n\nFrom sender@local.test ") in text
    assert text.endswith(b"Subject: two\n\nx\n\n")


def test_a_file_target_the_user_may_not_write_or_a_symlink_is_bounced(tmp_path, box):
    os.symlink("/etc/passwd", box.out / "link")

    def test(reactor):
        pipe = PipeBackend({"user": unprivileged_user().pw_name}, LocalContext(tmp_path, reactor))
        message = spooled(tmp_path, file_recipient(tmp_path / "private.mbox"),
                          file_recipient(box.out / "link"))
        return pipe.deliver(message, message.envelope.recipients)
    results = run_reactor(test)
    assert [(r.status, r.enhanced) for r in results] == [("failed", "5.2.0")] * 2
    assert "Permission denied" in results[0].text
    assert not (tmp_path / "private.mbox").exists()
    assert "Too many levels of symbolic links" in results[1].text


def test_a_command_that_exits_leaving_a_child_with_its_output_keeps_its_status(tmp_path, box):
    # the child holds stdout open: the run ends at the time limit, which kills only the
    # leftovers; the command's own exit status decides
    script = box.script("leaves", status=0, extra='sleep 30 & echo $! > "$d/child"')
    [result] = deliver(tmp_path, [script], "alice@example.org", timeout="1s")
    assert result.status == "delivered"
    child = int((box.out / "child").read_text())
    deadline = time.monotonic() + 10          # SIGKILL is sent; its delivery takes a moment under load
    while running(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(child)


def test_the_appender_started_as_root_takes_nothing_from_the_users_home(tmp_path, box,
                                                                       monkeypatch):
    # the appender's interpreter starts as root with HOME = the user's home directory: a
    # Python outside a virtualenv would run that user's site-packages *.pth files as root
    home, marker = tmp_path / "home", tmp_path / "ran-as-root"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site_dir = home / ".local" / "lib" / version / "site-packages"
    site_dir.mkdir(parents=True)
    (site_dir / "planted.pth").write_text(f"import os; open({str(marker)!r}, 'w').write('x')\n")
    monkeypatch.setattr(sys, "executable", getattr(sys, "_base_executable", sys.executable))

    def test(reactor):
        pipe = PipeBackend({"user": unprivileged_user().pw_name}, LocalContext(tmp_path, reactor))
        pipe.user = dataclasses.replace(pipe.user, home=str(home))
        message = spooled(tmp_path, file_recipient(box.out / "archive.mbox"))
        return pipe.deliver(message, message.envelope.recipients)
    run_reactor(test)
    assert not marker.exists()
