"""``pymta test-session``: dialogues through the configured plugin chains, nothing stored.

Run as an administrator runs it (the ``pymta`` command, the dialogue on
standard input).  The example config's site plugin and the ``spf`` plugin
against a loopback DNS server decide; every test checks that no spool and
no mailbox was created.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT
from dnsserver import zone_fixture

PYMTA = str(Path(sys.executable).parent / "pymta")

ZONE = {
    "legit.test": [("TXT", "v=spf1 ip4:192.0.2.7 -all")],
    "forged.test": [("TXT", "v=spf1 ip4:198.51.100.1 -all")],
    "client.test": [("TXT", "v=spf1 ip4:192.0.2.7 -all")],
}
dns = zone_fixture(ZONE)


def session(config: Path, dialogue: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([PYMTA, "test-session", "--config", str(config), *args],
                            input=textwrap.dedent(dialogue), capture_output=True, text=True,
                            timeout=60, cwd=config.parent)
    return result


def replies(output: str) -> list[str]:
    return [line[3:] for line in output.splitlines() if line.startswith("S: ")]


def assert_nothing_written(var: Path) -> None:
    """No spool directory, no mailbox: test-session stores nothing."""
    assert not var.exists(), sorted(str(p) for p in var.rglob("*"))


def config_file(directory: Path, server: str = "", rest: str = "") -> Path:
    """A config for example.test in ``directory``: spool and mailboxes in var/, no client
    name lookups; ``server`` goes into [server], ``rest`` after it."""
    path = directory / "pymta.toml"
    path.write_text(textwrap.dedent("""\
        [server]
        hostname = "mx.example.test"
        domains = ["example.test"]
        """) + textwrap.dedent(server) + textwrap.dedent("""\
        [spool]
        directory = "var/spool"
        [dns]
        reverse_lookup = false
        [backends.local]
        use = "maildir"
        base = "var/mail"
        """) + textwrap.dedent(rest))
    return path


@pytest.fixture
def etc(tmp_path) -> Path:
    """A copy of etc/: its config keeps the spool and mailboxes in ../var (tmp_path/var)."""
    shutil.copytree(ROOT / "etc", tmp_path / "etc")
    config = tmp_path / "etc" / "pymta.toml"
    text = config.read_text().replace("reverse_lookup = true", "reverse_lookup = false")
    # mail for other domains goes out by MX: relaying is allowed to whom may relay
    config.write_text(text.replace('# [[routes]]\n# match = "*"\n# backend = "relay"',
                                   '[[routes]]\nmatch = "*"\nbackend = "relay"'))
    return config


MESSAGE = """\
    EHLO client.example
    MAIL FROM:<{sender}>
    RCPT TO:<alice@example.org>
    DATA
    Subject: test

    hello
    .
    QUIT
    """


def test_site_plugin_decides_and_nothing_is_stored(etc):
    result = session(etc, MESSAGE.format(sender="ceo@example.org"), "--from-ip", "192.0.2.7")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert replies(out)[0] == "220 mx.example.org ESMTP pymta"
    assert "C: MAIL FROM:<ceo@example.org>" in out
    # every plugin decision, with its reason and time
    assert "*** rcpt: plugin aliases (aliasmap): dunno [" in out
    assert "*** rcpt: plugin localdomain (localdomain): accept [" in out
    assert "*** data: plugin vip (vip_tag:VipTagger): dunno; add header X-VIP: yes [" in out
    # what would be queued, with the Received and the added header fields
    [queued] = [line for line in out.splitlines() if line.startswith("*** would queue ")]
    queue_id = queued.split()[3].rstrip(":")
    assert "from=<ceo@example.org>" in queued and "nrcpt=1" in queued
    assert "***   to=<alice@example.org> via backend local" in out
    assert f"***   + Received: from client.example (unknown [192.0.2.7])" in out
    assert f"by mx.example.org (pymta) with ESMTP id {queue_id}" in out
    assert "***   + X-VIP: yes" in out
    assert "***   | Subject: test" in out
    assert replies(out)[-2:] == [f"250 2.0.0 Ok: queued as {queue_id}", "221 2.0.0 Bye"]
    assert out.index("*** data: plugin vip") < out.index("*** would queue") < out.index("S: 250 2.0.0")
    assert_nothing_written(etc.parent.parent / "var")


def test_alias_rewrite_and_refusals_are_shown(etc):
    result = session(etc, """\
        HELO client.example
        MAIL FROM:<someone@example.com>
        RCPT TO:<sales@example.net>
        RCPT TO:<nobody@example.net>
        RCPT TO:<../x@example.org>
        QUIT
        """, "--from-ip", "192.0.2.7")
    out = result.stdout
    assert ("*** rcpt: plugin aliases (aliasmap): accept; rewrite to alice@example.org, "
            "bob@example.org [") in out
    assert ("*** rcpt: core rules: accepted: <alice@example.org> to backend local, "
            "<bob@example.org> to backend mbox") in out
    assert ("*** rcpt: plugin aliases (aliasmap): reject 550 5.1.1 <nobody@example.net>: "
            "Recipient address rejected: User unknown [") in out
    assert ("*** log: NOQUEUE: reject: RCPT from unknown[192.0.2.7]:0: 550 5.1.1 "
            "<nobody@example.net>: Recipient address rejected: User unknown; "
            "from=<someone@example.com> to=<nobody@example.net> proto=SMTP helo=<client.example>") in out
    assert [r.split()[0] for r in replies(out)] == ["220", "250", "250", "250", "550", "501", "221"]
    assert_nothing_written(etc.parent.parent / "var")


RELAY_DIALOGUE = """\
    EHLO client.example
    MAIL FROM:<alice@example.org>
    RCPT TO:<friend@elsewhere.example>
    DATA
    Subject: out

    bye
    .
    QUIT
    """


def test_from_ip_decides_trust_and_relaying(etc):
    untrusted = session(etc, RELAY_DIALOGUE, "--from-ip", "192.0.2.7")
    assert "client 192.0.2.7: not in trusted_networks" in untrusted.stdout
    assert "may relay: no" in untrusted.stdout
    assert ("*** rcpt: core rules: 554 5.7.1 Relay access denied: elsewhere.example is not a local "
            "domain, and the client is neither in trusted_networks nor authenticated") in untrusted.stdout
    assert "S: 554 5.7.1 Relay access denied" in untrusted.stdout
    assert "*** would queue" not in untrusted.stdout
    assert "S: 554 5.5.1 Error: no valid recipients" in untrusted.stdout

    trusted = session(etc, RELAY_DIALOGUE, "--from-ip", "127.0.0.1")
    assert "client 127.0.0.1: in trusted_networks" in trusted.stdout
    assert "*** rcpt: core rules: accepted: <friend@elsewhere.example> to backend relay" in trusted.stdout
    assert "***   to=<friend@elsewhere.example> via backend relay" in trusted.stdout
    assert "S: 250 2.1.5 Ok" in trusted.stdout
    assert_nothing_written(etc.parent.parent / "var")

    v6 = session(etc, RELAY_DIALOGUE, "--from-ip", "::1")
    assert "client ::1: in trusted_networks" in v6.stdout
    assert "(unknown [IPv6:::1])" in v6.stdout


def test_auth_allows_relay_and_tls_is_recorded(etc):
    result = session(etc, RELAY_DIALOGUE, "--from-ip", "192.0.2.7", "--auth", "alice", "--tls")
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "authenticated: alice; may relay: yes" in out
    assert "S: 250 2.1.5 Ok" in out
    assert "***   to=<friend@elsewhere.example> via backend relay" in out
    assert "(Authenticated sender: alice)" in out
    assert "with ESMTPSA id" in out
    assert "(using TLSv1.3 with cipher none (simulated by pymta test-session))" in out
    assert "250-STARTTLS" not in out
    assert_nothing_written(etc.parent.parent / "var")


def spf_config(tmp_path: Path, dns) -> Path:
    config = tmp_path / "pymta.toml"
    config.write_text(textwrap.dedent(f"""\
        [server]
        hostname = "mx.example.test"
        domains = ["example.test"]
        trusted_networks = []

        [spool]
        directory = "var/spool"

        [dns]
        nameservers = ["{dns.nameserver}"]
        timeout = "2s"
        attempts = 1
        hosts_file = ""

        [stages]
        helo = ["spf"]
        mail = ["spf"]
        data = ["spf", "authres"]

        [backends.local]
        use = "maildir"
        base = "var/mail"
        """))
    return config


def test_spf_against_the_loopback_dns(tmp_path, dns):
    config = spf_config(tmp_path, dns)
    result = session(config, """\
        EHLO client.test
        MAIL FROM:<someone@forged.test>
        MAIL FROM:<someone@legit.test>
        RCPT TO:<bob@example.test>
        DATA
        Subject: spf

        checked
        .
        QUIT
        """, "--from-ip", "192.0.2.7")
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "*** helo: plugin spf (spf): dunno [" in out
    forged = next(line for line in out.splitlines() if line.startswith("*** mail: plugin spf"))
    assert forged.startswith("*** mail: plugin spf (spf): reject 550 5.7.23 ")
    assert "S: 550 5.7.23" in out
    assert "NOQUEUE: reject: MAIL from unknown[192.0.2.7]:0: 550 5.7.23" in out
    assert "*** mail: plugin spf (spf): dunno [" in out
    assert ("*** data: plugin spf (spf): dunno; add header Received-SPF: pass (mx.example.test: "
            "domain of someone@legit.test designates 192.0.2.7 as permitted sender) "
            "client-ip=192.0.2.7;") in out
    assert "*** data: plugin authres (authres): dunno; add header Authentication-Results: " in out
    assert ("***   + Received-SPF: pass (mx.example.test: domain of someone@legit.test designates\n"
            "***   +  192.0.2.7 as permitted sender)") in out
    assert "***   + Authentication-Results: mx.example.test; spf=pass" in out
    assert "S: 250 2.0.0 Ok: queued as " in out
    queried = {name for name, _ in dns.queries()}
    assert {"forged.test", "legit.test", "client.test"} <= queried
    assert "7.2.0.192.in-addr.arpa" in queried           # the client's name, looked up for real
    assert_nothing_written(tmp_path / "var")


FAILING_PLUGIN = '''\
from twisted.internet import defer
from zope.interface import implementer
from pymta.plugin_api import ISenderPolicy, Verdict


@implementer(ISenderPolicy)
class Broken:
    def __init__(self, options, context):
        pass

    def check_sender(self, session, transaction):
        if transaction.sender.startswith("slow"):
            return defer.Deferred()
        raise RuntimeError("the sender database is down")
'''


def test_a_failing_and_a_hanging_plugin(tmp_path):
    (tmp_path / "plugins").mkdir()
    (tmp_path / "plugins" / "site_checks.py").write_text(FAILING_PLUGIN)
    config = config_file(tmp_path, 'plugin_path = ["plugins"]\n', """\
        [limits]
        plugin_timeout = "1s"
        [stages]
        mail = ["broken"]
        [plugins.broken]
        use = "site_checks:Broken"
        """)
    result = session(config, """\
        EHLO client.test
        MAIL FROM:<a@example.com>
        MAIL FROM:<slow@example.com>
        QUIT
        """, "--from-ip", "192.0.2.7")
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert ("*** mail: plugin broken (site_checks:Broken): raised RuntimeError: "
            "the sender database is down [") in out
    assert "*** log: plugin broken (site_checks:Broken) failed in check_sender: RuntimeError: " \
           "the sender database is down" in out
    assert "S: 451 4.3.5 Server configuration problem; try again later" in out
    assert "*** log: plugin broken (site_checks:Broken) timed out after 1s in mail (check_sender)" in out
    assert "*** mail: plugin broken (site_checks:Broken): no answer in time: cancelled (plugin_timeout)" in out
    assert "S: 451 4.3.0 Error: plugin timeout; try again later" in out
    assert replies(out)[-1] == "221 2.0.0 Bye"
    assert_nothing_written(tmp_path / "var")


def test_end_of_input_and_bad_arguments(etc):
    result = session(etc, "EHLO client.example\n", "--from-ip", "192.0.2.7")
    assert result.stdout.splitlines()[-2:] == ["*** end of input: the client disconnects",
                                               "*** log: disconnect from unknown[192.0.2.7]:0"]
    bad_ip = session(etc, "", "--from-ip", "192.0.2.300")
    assert bad_ip.returncode == 1
    assert bad_ip.stderr == "pymta test-session: --from-ip: '192.0.2.300' is not an IP address\n"
    bad_listener = session(etc, "", "--listener", "smtps")
    assert bad_listener.returncode == 1
    assert bad_listener.stderr == "pymta test-session: --listener: no listener named 'smtps'; " \
                                  "the config has mx\n"
    broken = etc.parent / "broken.toml"
    broken.write_text("[limits]\nmax_recipents = 5\n")
    refused = session(broken, "")
    assert refused.returncode == 1
    assert refused.stderr.startswith(f"pymta: configuration error: {broken}: limits.max_recipents: "
                                     "unknown key")
    assert_nothing_written(etc.parent.parent / "var")


def test_interactive_on_a_terminal(etc):
    """On a terminal the lines are read as typed (not echoed back: the terminal shows them)."""
    import os
    import pty
    import select
    import signal
    import time

    pid, fd = pty.fork()
    if pid == 0:                                            # the child: pymta on the terminal
        os.chdir(etc.parent)
        os.execv(PYMTA, [PYMTA, "test-session", "--config", str(etc), "--from-ip", "192.0.2.7"])
    seen = b""

    def read_until(marker: bytes) -> None:
        nonlocal seen
        deadline = time.monotonic() + 30
        while marker not in seen and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.2)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        assert marker in seen, seen.decode()

    try:
        read_until(b"S: 220 mx.example.org ESMTP pymta")
        os.write(fd, b"EHLO typed.example\n")
        read_until(b"S: 250 ETRN")
        os.write(fd, b"QUIT\n")
        read_until(b"disconnect from unknown[192.0.2.7]:0")
    finally:
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:                                    # still running: do not hang the suite
            os.kill(pid, signal.SIGKILL)
            done = os.waitpid(pid, 0)
        status = done[1]
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    assert b"C: EHLO" not in seen                           # typed, not echoed
    assert_nothing_written(etc.parent.parent / "var")


def test_starttls_and_a_real_auth_on_a_submission_listener(tmp_path):
    """STARTTLS is answered and simulated; AUTH PLAIN goes through the configured checker."""
    import base64

    from argon2 import PasswordHasher

    from certs import make_cert

    cert, key = make_cert(tmp_path, "server")
    users = tmp_path / "users"
    users.write_text(f"alice:{PasswordHasher().hash('wonderland')}\n")
    users.chmod(0o600)
    config = config_file(tmp_path, "trusted_networks = []\n", f"""\
        [tls]
        certificate = "{cert}"
        key = "{key}"
        [[listeners]]
        name = "mx"
        endpoint = "tcp:2525:interface=127.0.0.1"
        [[listeners]]
        name = "submission"
        endpoint = "tcp:2587:interface=127.0.0.1"
        role = "submission"
        [stages]
        auth = ["users"]
        [plugins.users]
        use = "passwdfile"
        file = "users"
        [backends.relay]
        use = "relay"
        [[routes]]
        match = "example.test"
        backend = "local"
        [[routes]]
        match = "*"
        backend = "relay"
        """)
    good = base64.b64encode(b"\0alice\0wonderland").decode()
    result = session(config, f"""\
        EHLO client.test
        MAIL FROM:<alice@example.test>
        STARTTLS
        EHLO client.test
        AUTH PLAIN {good}
        MAIL FROM:<alice@example.test>
        RCPT TO:<friend@elsewhere.test>
        DATA
        Subject: submitted

        hi
        .
        QUIT
        """, "--listener", "submission", "--from-ip", "198.51.100.4")
    out = result.stdout
    assert result.returncode == 0, result.stderr
    assert "*** listener submission (role submission); client 198.51.100.4" in out
    assert "S: 530 5.7.0 Must issue a STARTTLS command first" in out
    assert "S: 220 2.0.0 Ready to start TLS" in out
    assert "*** STARTTLS: no handshake in test-session; the session goes on as if encrypted" in out
    assert "S: 250-AUTH PLAIN LOGIN" in out
    assert "S: 235 2.7.0 Authentication successful" in out
    # the auth stage's plugin decision is reported like every other stage's
    assert "*** auth: plugin users (passwdfile): authenticated alice [" in out
    assert "*** log: unknown[198.51.100.4]:0: sasl_method=PLAIN, sasl_username=alice" in out
    assert "***   to=<friend@elsewhere.test> via backend relay" in out
    assert "with ESMTPSA id" in out
    assert_nothing_written(tmp_path / "var")


def test_core_rules_user_unknown_without_a_recipient_plugin(tmp_path):
    config = config_file(tmp_path, rest="[stages]\nrcpt = []\n")
    out = session(config, """\
        EHLO client.test
        MAIL FROM:<a@example.com>
        RCPT TO:<alice@example.test>
        RCPT TO:<Postmaster@example.test>
        QUIT
        """, "--from-ip", "203.0.113.9").stdout
    assert ("*** rcpt: core rules: 550 5.1.1 User unknown in local recipient table: no rcpt "
            "plugin accepted <alice@example.test>, an address at a local domain") in out
    assert ("*** rcpt: core rules: accepted (a postmaster is accepted whatever the plugins say, "
            "RFC 5321 4.5.1): <Postmaster@example.test> to backend local") in out
    assert [r.split()[0] for r in replies(out)][-3:] == ["550", "250", "221"]
    assert_nothing_written(tmp_path / "var")
