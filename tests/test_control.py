"""The pure parts of ``pymta queue``: states, filters, formatting, AMP paging, [control]."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from twisted.protocols import amp

from pymta.config.control import MAX_SOCKET_PATH, control_socket_of_file
from pymta.config.errors import ConfigError
from pymta.config.loader import load_config
from pymta.control import commands, queueview
from pymta.control.queueview import QueueFilter
from pymta.envelope import DELIVERED, FAILED, Envelope, Recipient

NOW = 1_700_000_000.0


def envelope(queue_id="1K0AAAAAAAAAAAA1", sender="alice@example.org", rcpts=("bob@example.net",),
             **fields) -> Envelope:
    return Envelope(queue_id, sender, [Recipient(a, a, "out") for a in rcpts], NOW - 90,
                    size=1234, **fields)


def test_states():
    env = envelope(rcpts=("a@x.example", "b@y.example", "c@z.example"))
    assert queueview.message_state(env, ()) == "queued"
    env.recipients[0].attempts = 1
    assert queueview.message_state(env, ()) == "deferred"
    assert queueview.message_state(env, {1}) == "active"
    env.held = "by hand"
    assert queueview.message_state(env, {1}) == "held"
    env.recipients[1].state, env.recipients[2].state = DELIVERED, FAILED
    rows = queueview.recipient_rows(env, {0})
    assert [r["state"] for r in rows] == ["active", "delivered", "failed"]
    assert [r["next_try"] for r in rows] == [0.0, 0.0, 0.0]


def test_filters():
    env = envelope(sender="Alice@Example.org", rcpts=("bob@mail.example.net", "carol@example.com"))
    env.recipients[1].original = "carol-alias@example.com"
    assert QueueFilter().empty and QueueFilter().matches(env)
    assert QueueFilter(sender="alice@example.org").matches(env)
    assert not QueueFilter(sender="").matches(env)
    assert QueueFilter(sender="").matches(envelope(sender=""))
    assert QueueFilter(rcpt="CAROL-ALIAS@example.com").matches(env)
    assert not QueueFilter(rcpt="dave@example.com").matches(env)
    assert QueueFilter(domain="example.com").matches(env)
    assert not QueueFilter(domain="example.net").matches(env)
    assert QueueFilter(domain="@example.net").matches(env)
    assert QueueFilter(domain="MAIL.example.NET").matches(env)
    assert not QueueFilter(held=True).matches(env)
    assert not QueueFilter(deferred=True).matches(env)
    env.recipients[0].attempts = 2
    assert QueueFilter(deferred=True, domain="example.com").matches(env)
    assert not QueueFilter(deferred=True).matches(env, {0})       # active, not deferred


def test_text_and_json():
    env = envelope(rcpts=("bob@example.net",))
    env.recipients[0].attempts = 3
    env.recipients[0].next_attempt = NOW + 600
    env.recipients[0].last_result = "451 4.4.1 connection refused"
    held = envelope("1K0AAAAAAAAAAAA2", held="why not")
    entries = [(env, frozenset()), (held, frozenset())]
    messages = [queueview.message_row(*e) for e in entries]
    recipients = [r for e in entries for r in queueview.recipient_rows(*e)]
    text = queueview.format_text(messages, recipients, NOW)
    lines = text.splitlines()
    assert lines[0].split() == ["Queue", "ID", "Size", "Arrival", "State", "Sender/Recipients"]
    assert lines[1].startswith("1K0AAAAAAAAAAAA1          1234  ")
    assert lines[1].endswith("  deferred  <alice@example.org>")
    assert lines[2].startswith("    bob@example.net  deferred, 3 attempts, next try ")
    assert lines[3] == "        (451 4.4.1 connection refused)"
    assert "    held: why not" in lines
    assert lines[-1] == "-- 2 messages (1 held, 1 deferred), 2468 bytes, oldest 2m"
    data = json.loads(queueview.format_json(messages, recipients, NOW))
    assert data["summary"] == {"messages": 2, "held": 1, "active": 0, "deferred": 1, "queued": 0,
                               "bytes": 2468, "oldest_age": 90.0}
    first = data["messages"][0]
    assert first["id"] == "1K0AAAAAAAAAAAA1" and first["state"] == "deferred"
    assert first["recipients"][0] == {"address": "bob@example.net", "original": "bob@example.net",
                                      "route": "out", "state": "deferred", "attempts": 3,
                                      "next_try": NOW + 600,
                                      "last_result": "451 4.4.1 connection refused"}
    assert queueview.format_text([], [], NOW) == "-- queue empty\n"


def test_details():
    env = envelope(client_ip="192.0.2.7", client_name="mail.example.net", helo="mail.example.net",
                   protocol="ESMTPSA", auth="alice", body="8BITMIME", ret="HDRS", envid="x1")
    assert queueview.format_details(queueview.details(env)) == (
        "client: mail.example.net[192.0.2.7], helo=<mail.example.net>, protocol=ESMTPSA, "
        "auth=alice\nparameters: body=8BITMIME ret=HDRS envid=x1\n")
    bounce = envelope(sender="", client_name="localhost", helo="mx.example.org",
                      protocol="local", notification="bounce")
    assert queueview.format_details(queueview.details(bounce)) == (
        "client: localhost, helo=<mx.example.org>, protocol=local\n"
        "notification: bounce (made by pymta)\n")


@pytest.mark.parametrize("seconds, text", [(5, "5s"), (600, "10m"), (5400, "1.5h"), (7200, "2h"),
                                           (86400 * 3, "3d")])
def test_format_age(seconds, text):
    assert queueview.format_age(seconds) == text


def _wire_bytes(arglist, rows) -> int:
    return len(amp.AmpList(arglist).toStringProto(rows, None))


def test_pages_stay_under_amp_limits_and_lose_nothing():
    """A queue of many messages, one with 3,000 recipients with long results: every page's
    lists fit in an AMP value, and the pages together are the whole listing."""
    entries = [(envelope(f"1K0AAAAAAAAA{n:04d}", rcpts=[f"user{n}-{i}@example.net"
                                                         for i in range(3000 if n == 7 else 2)]),
                frozenset()) for n in range(400)]
    for recipient in entries[7][0].recipients:
        recipient.last_result = "451 " + "x" * 2000               # cut to RESULT_LIMIT
    messages, recipients, pages = [], [], 0
    after, index = None, 0
    while True:
        m, r, resume = commands.page(entries, after, index)
        pages += 1
        assert _wire_bytes(commands.MESSAGE_FIELDS, m) < 65535
        assert _wire_bytes(commands.RECIPIENT_FIELDS, r) < 65535
        messages += [row for row in m if not messages or row["id"] != messages[-1]["id"]]
        recipients += r
        if resume is None:
            break
        after, index = resume
    assert pages > 10
    assert [row["id"] for row in messages] == [e[0].queue_id for e in entries]
    assert len(recipients) == 399 * 2 + 3000
    assert [r["address"] for r in recipients] == [a.address for e in entries for a in e[0].recipients]
    assert len(recipients[20]["last_result"]) == queueview.RESULT_LIMIT


def test_page_resumes_after_a_message_that_left():
    entries = [(envelope(f"1K0AAAAAAAAA{n:04d}"), frozenset()) for n in range(5)]
    m, r, resume = commands.page(entries[3:], "1K0AAAAAAAAA0002", 1)
    assert [row["id"] for row in m] == ["1K0AAAAAAAAA0003", "1K0AAAAAAAAA0004"] and resume is None


# -- [control] ----------------------------------------------------------------------------------

def write_config(directory: Path, extra: str = "") -> Path:
    path = directory / "pymta.toml"
    path.write_text(f'[server]\nhostname = "mx.example.org"\ndomains = ["example.org"]\n'
                    f'[spool]\ndirectory = "spool"\n{extra}')
    return path


def test_control_socket_default_and_given(tmp_path):
    config = load_config(str(write_config(tmp_path)))
    assert config.control_socket == str(tmp_path / "spool" / "control.sock")
    assert control_socket_of_file(str(write_config(tmp_path))) == (
        str(tmp_path / "spool" / "control.sock"), str(tmp_path / "spool"))
    path = write_config(tmp_path, '[control]\nsocket = "run/ctl.sock"\n')
    assert load_config(str(path)).control_socket == str(tmp_path / "run" / "ctl.sock")
    assert control_socket_of_file(str(path))[0] == str(tmp_path / "run" / "ctl.sock")


def test_control_socket_errors(tmp_path):
    long_name = "s" * (MAX_SOCKET_PATH + 1 - len(str(tmp_path)) - 1)
    path = write_config(tmp_path, f'[control]\nsocket = "{long_name}"\n')
    expected = (f"{path}: control.socket: {tmp_path}/{long_name} is {MAX_SOCKET_PATH + 1} bytes "
                f"long; a UNIX socket path may have at most {MAX_SOCKET_PATH}: set [control] "
                "socket to a shorter path")
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert str(e.value) == expected
    with pytest.raises(ConfigError) as e:
        control_socket_of_file(str(path))
    assert str(e.value) == expected
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    with pytest.raises(ConfigError, match=r"control.socket: .*/control.sock \(the default, in the "
                                          r"spool directory .*\) is \d+ bytes long"):
        load_config(str(write_config(deep)))
    with pytest.raises(ConfigError, match=r"control.sockt: unknown key \(did you mean 'socket'\?\)"):
        load_config(str(write_config(tmp_path, '[control]\nsockt = "x"\n')))
