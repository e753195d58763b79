"""SIGHUP reloads the whole configuration; a broken file changes nothing.

Real twistd servers: a session is opened with smtplib, the config file is
rewritten (recipients, limits, routes, listeners), ``kill -HUP`` is sent,
and the open session still behaves per the old configuration while a new
session gets the new one.  A broken file (TOML syntax, an unknown key, a
plugin that refuses its options) leaves the old configuration in force with
one error line; a spool directory change is named as needing a restart; a
listener whose endpoint stays keeps accepting connections throughout.
"""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import TWISTD, free_port, wait_for_log, wait_until_serving
from test_privdrop import DroppingServer, python, user, workdir  # noqa: F401 (fixtures)

IN_FORCE = r"reload: configuration (\d+) in force"
IN_FORCE_TEXT = "reload: configuration 2 in force"
REFUSED = "reload: configuration error"


def config_text(srv, listeners: str, rest: str) -> str:
    return textwrap.dedent(f"""\
        [server]
        hostname = "mx.example.test"
        domains = ["example.test"]

        [spool]
        directory = "{srv.spool}"
        """) + textwrap.dedent(listeners) + textwrap.dedent(rest)


def mx_listener(port: int, name: str = "mx") -> str:
    return f"""
        [[listeners]]
        name = "{name}"
        endpoint = "tcp:{port}:interface=127.0.0.1"
        """


def recipients(*addresses: str, size: int = 10_000_000, route_to: str = "local") -> str:
    listed = ", ".join(f'"{a}"' for a in addresses)
    return f"""
        [limits]
        max_message_size = {size}

        [stages]
        rcpt = ["known"]

        [plugins.known]
        use = "static"
        addresses = [{listed}]

        [backends.local]
        use = "maildir"
        base = "mail"

        [backends.other]
        use = "maildir"
        base = "mail2"

        [[routes]]
        match = "example.test"
        backend = "{route_to}"
        """


def log_of(srv) -> str:
    return Path(srv.log).read_text(errors="replace")


def hup(srv, outcome: str = IN_FORCE) -> str:
    """``kill -HUP`` the server (the exit status of kill is 0), and wait for the next
    log line matching ``outcome``; that line."""
    before = len(re.findall(outcome, log_of(srv)))
    done = subprocess.run(["kill", "-HUP", str(srv.proc.pid)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        lines = [line for line in log_of(srv).splitlines() if re.search(outcome, line)]
        if len(lines) > before:
            return lines[before]
        time.sleep(0.05)
    raise AssertionError(f"no {outcome!r} after SIGHUP:\n{log_of(srv)[-3000:]}")


def rcpt(client: smtplib.SMTP, address: str) -> int:
    client.ehlo_or_helo_if_needed()
    client.rset()
    client.mail("sender@elsewhere.test")
    return client.rcpt(address)[0]


def size_offered(client: smtplib.SMTP) -> int:
    client.ehlo("client.example.test")
    return int(client.esmtp_features["size"])


def send(client: smtplib.SMTP, to: str, subject: str) -> None:
    client.rset()
    assert client.sendmail("sender@elsewhere.test", [to],
                           f"Subject: {subject}\r\n\r\nhello\r\n".encode()) == {}


def delivered(base: Path, local: str, subject: str, timeout: float = 15.0) -> bool:
    new = base / "example.test" / local / "new"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if new.is_dir() and any(subject.encode() in f.read_bytes() for f in new.iterdir()):
            return True
        time.sleep(0.05)
    return False


def banner(port: int) -> str:
    """The reply code of the banner on ``port``, or what went wrong.  The session
    ends with QUIT and the server's close, so that sessions do not pile up
    against the limit per client address."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            code = s.recv(100)[:3].decode("ascii", "replace")
            s.sendall(b"QUIT\r\n")
            while s.recv(100):
                pass
            return code
    except OSError as e:
        return f"{type(e).__name__}: {e}"


def can_connect(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.settimeout(5)
            return s.recv(100).startswith(b"220")
    except OSError:
        return False


@pytest.fixture
def srv(make_server):
    server = make_server(start=False)
    server.config.write_text(config_text(server, mx_listener(server.port),
                                         recipients("alice@example.test", size=20_000_000)))
    return server.start()


def test_open_session_keeps_the_old_config_new_sessions_get_the_new_one(srv):
    old = smtplib.SMTP("127.0.0.1", srv.port, timeout=10)
    assert size_offered(old) == 20_000_000
    assert rcpt(old, "alice@example.test") == 250
    srv.config.write_text(config_text(srv, mx_listener(srv.port), recipients(
        "bob@example.test", size=10_000_000, route_to="other")))

    line = hup(srv)
    assert "configuration 2 in force" in line and "1 session(s) finish with the previous one" in line

    # the open session: the old recipients, limits and routes
    assert size_offered(old) == 20_000_000
    assert rcpt(old, "alice@example.test") == 250
    assert rcpt(old, "bob@example.test") == 550
    send(old, "alice@example.test", "before-reload-session")
    # a new session: the new ones
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as new:
        assert size_offered(new) == 10_000_000
        assert rcpt(new, "alice@example.test") == 550
        assert rcpt(new, "bob@example.test") == 250
        send(new, "bob@example.test", "after-reload-session")
    assert delivered(srv.dir / "mail", "alice", "before-reload-session")     # route "local"
    assert delivered(srv.dir / "mail2", "bob", "after-reload-session")       # route "other"

    # the previous configuration is released when its last session ends
    assert "configuration 1 released" not in srv.log_text()
    old.quit()
    wait_for_log(srv, r"reload: configuration 1 released: no session or delivery uses it")


@pytest.mark.parametrize("broken, key", [
    ("[limits\nmax_recipients = 2\n", "line 1"),
    ("[limits]\nmax_recipents = 2\n", "limits.max_recipents: unknown key (did you mean 'max_recipients'?)"),
    ('[stages]\nrcpt = ["known"]\n[plugins.known]\nuse = "static"\naddresses = ["no-at-sign"]\n',
     "plugins.known.addresses[0]"),
    ('[stages]\nrcpt = ["nosuch"]\n', "stages.rcpt[0]: unknown plugin 'nosuch'"),
])
def test_a_broken_file_changes_nothing_and_is_one_error_line(srv, broken, key):
    session = smtplib.SMTP("127.0.0.1", srv.port, timeout=10)
    assert rcpt(session, "alice@example.test") == 250
    srv.config.write_text(config_text(srv, mx_listener(srv.port), "") + broken)

    line = hup(srv, REFUSED)
    assert f"{srv.config}: {key}" in line and "the running configuration stays in force" in line
    assert len([l for l in srv.log_text().splitlines() if REFUSED in l]) == 1
    assert srv.proc.poll() is None
    for client in (session, smtplib.SMTP("127.0.0.1", srv.port, timeout=10)):
        assert size_offered(client) == 20_000_000
        assert rcpt(client, "alice@example.test") == 250
        assert rcpt(client, "bob@example.test") == 550
        client.quit()


def test_a_spool_directory_change_waits_for_a_restart(srv):
    moved = srv.dir / "elsewhere"
    text = srv.config.read_text().replace(f'directory = "{srv.spool}"', f'directory = "{moved}"')
    srv.config.write_text(text.replace("max_message_size = 20000000", "max_message_size = 30000000"))

    hup(srv)
    assert re.search(r"#warn\] reload: spool\.directory changed: needs a restart", srv.log_text())
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as client:
        assert size_offered(client) == 30_000_000          # the rest is in force
        send(client, "alice@example.test", "same-spool")
    assert delivered(srv.dir / "mail", "alice", "same-spool")
    assert not moved.exists()
    hup(srv)                                                  # said again while it differs
    assert len(re.findall("spool.directory changed", srv.log_text())) == 2


def test_listeners_added_removed_and_kept_without_refusing_a_connection(srv):
    extra, added = free_port(), free_port()
    srv.config.write_text(config_text(srv, mx_listener(srv.port) + mx_listener(extra, "extra"),
                                      recipients("alice@example.test")))
    hup(srv)
    assert can_connect(extra)
    on_removed = smtplib.SMTP("127.0.0.1", extra, timeout=10)
    on_removed.ehlo("client.example.test")

    # connections to the kept listener go on, one after the other, during the reload
    # (the reactor reads the file meanwhile: a banner may come late, never a refusal)
    stop, outcomes = threading.Event(), []

    def knock() -> None:
        while not stop.is_set():
            outcomes.append(banner(srv.port))
    knocker = threading.Thread(target=knock)
    knocker.start()
    try:
        while len(outcomes) < 3:
            time.sleep(0.01)
        srv.config.write_text(config_text(srv, mx_listener(srv.port, "renamed") + mx_listener(added, "added"),
                                          recipients("alice@example.test")))
        line = hup(srv)
        count = len(outcomes)
        while len(outcomes) < count + 3:
            time.sleep(0.01)
    finally:
        stop.set()
        knocker.join()
    failed = [outcome for outcome in outcomes if outcome != "220"]
    assert not failed, f"{len(failed)} of {len(outcomes)} connections failed: {failed}"
    assert f"renamed=tcp:{srv.port}" in line and f"added=tcp:{added}" in line
    assert "listener extra (tcp:" in srv.log_text() and "removed: no longer listening" in srv.log_text()
    assert can_connect(added)
    assert not can_connect(extra)
    # the session on the removed listener finishes
    send(on_removed, "alice@example.test", "on-removed-listener")
    on_removed.quit()
    assert delivered(srv.dir / "mail", "alice", "on-removed-listener")


def test_a_listener_that_cannot_bind_is_logged_and_the_rest_applies(srv):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        srv.config.write_text(config_text(srv, mx_listener(srv.port) + mx_listener(busy, "busy"),
                                          recipients("bob@example.test")))
        hup(srv)
        [line] = [l for l in srv.log_text().splitlines() if "cannot listen" in l]
        assert f"reload: cannot listen: listeners 'busy' (tcp:{busy}:interface=127.0.0.1)" in line
        assert "#error]" in line and "the rest of the new configuration is in force" in line
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as client:
        assert rcpt(client, "bob@example.test") == 250


def test_the_log_file_is_reopened_for_logrotate(tmp_path):
    port = free_port()
    (tmp_path / "pymta.toml").write_text(textwrap.dedent(f"""\
        [server]
        domains = ["example.test"]
        [spool]
        directory = "spool"
        [[listeners]]
        endpoint = "tcp:{port}:interface=127.0.0.1"
        [backends.local]
        use = "maildir"
        base = "mail"
        """))
    log = tmp_path / "pymta.log"
    proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", f"--logfile={log}", "pymta",
                             "--config", str(tmp_path / "pymta.toml")], cwd=tmp_path)
    try:
        wait_until_serving(proc, port, log)
        log.rename(tmp_path / "pymta.log.1")            # logrotate's "create": rename, new file
        log.write_text("")
        subprocess.run(["kill", "-HUP", str(proc.pid)], check=True)
        deadline = time.monotonic() + 15
        while IN_FORCE_TEXT not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "reload (SIGHUP): reading" in log.read_text() and IN_FORCE_TEXT in log.read_text()
        assert "reload (SIGHUP)" not in (tmp_path / "pymta.log.1").read_text()
    finally:
        proc.terminate()
        proc.wait(20)



def test_after_the_privilege_drop_a_privileged_port_is_refused_clearly(python, workdir):  # noqa: F811
    spool, mail = workdir / "spool", workdir / "mail"
    server = DroppingServer(python, workdir, spool, mail).start("pymtatest")
    try:
        server.config.write_text(server.config.read_text().replace(
            'role = "mx"', 'role = "mx"\n\n[[listeners]]\nname = "low"\n'
            'endpoint = "tcp:1:interface=127.0.0.1"', 1)
            + '\n[limits]\nmax_message_size = 12345\n')
        hup(server)
        [line] = [l for l in server.log.read_text().splitlines() if "cannot listen" in l]
        assert "listeners 'low' (tcp:1:interface=127.0.0.1)" in line and "Permission denied" in line
        assert "needs the privileges pymta gave up at start" in line
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            assert size_offered(client) == 12345
    finally:
        server.stop()


class RecordingSMTP:
    """A minimal SMTP receiver in a thread: accepts every message, records QUITs."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.messages = 0
        self.quits = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 fake.example ESMTP\r\n")
            for line in lines:
                verb = line[:4].upper()
                if verb == b"EHLO":
                    conn.sendall(b"250-fake.example\r\n250 PIPELINING\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    for body_line in lines:
                        if body_line == b".\r\n":
                            break
                    self.messages += 1
                    conn.sendall(b"250 2.0.0 queued\r\n")
                elif verb == b"QUIT":
                    self.quits += 1
                    conn.sendall(b"221 2.0.0 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 2.0.0 ok\r\n")

    def close(self) -> None:
        self.listener.close()


def test_a_released_relay_backend_quits_its_idle_connections(srv):
    receiver = RecordingSMTP()
    try:
        relay = f"""
            [backends.local]
            use = "maildir"
            base = "mail"

            [backends.out]
            use = "smarthost"
            host = "127.0.0.1:{receiver.port}"
            tls = "none"
            idle_timeout = "10m"

            [[routes]]
            match = "example.test"
            backend = "local"

            [[routes]]
            match = "*"
            backend = "out"
            """
        srv.config.write_text(config_text(srv, mx_listener(srv.port), relay))
        hup(srv)
        with smtplib.SMTP("127.0.0.1", srv.port, timeout=10) as client:
            send(client, "someone@remote.example", "relayed")
        wait_for_log(srv, r"to=<someone@remote.example>, relay=out.*status=sent")
        assert receiver.messages == 1 and receiver.quits == 0     # the connection stays open, idle

        srv.config.write_text(config_text(srv, mx_listener(srv.port), relay.replace('"10m"', '"9m"')))
        hup(srv)
        wait_for_log(srv, r"reload: configuration 2 released: .*closed: [^)]*backends\.out")
        deadline = time.monotonic() + 10
        while receiver.quits == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiver.quits == 1
    finally:
        receiver.close()


def test_a_kept_socket_takes_its_listeners_new_settings(srv):
    session = smtplib.SMTP("127.0.0.1", srv.port, timeout=10)
    session.ehlo("client.example.test")
    srv.config.write_text(config_text(srv, mx_listener(srv.port) + """
        proxy_protocol = true
        proxy_networks = ["127.0.0.1/32"]
        """, recipients("alice@example.test") + "\n[dns]\nreverse_lookup = false\n"))
    hup(srv)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(f"PROXY TCP4 192.0.2.7 127.0.0.1 40000 {srv.port}\r\n".encode())
        assert s.recv(100).startswith(b"220")
    wait_for_log(srv, r"connect from unknown\[192\.0\.2\.7\]:40000")
    assert session.noop()[0] == 250                 # the session from before goes on, no header
    session.quit()


def test_an_endpoint_moved_to_another_address_on_the_same_port(srv):
    srv.config.write_text(config_text(srv, f"""
        [[listeners]]
        name = "mx"
        endpoint = "tcp:{srv.port}:interface=0.0.0.0"
        """, recipients("alice@example.test")))
    line = hup(srv)
    assert f"mx=tcp:{srv.port}:interface=0.0.0.0" in line and "cannot listen" not in srv.log_text()
    assert can_connect(srv.port)
