"""pymta under systemd: the units, the notification socket, socket activation, confinement.

The units in etc/ are checked by ``systemd-analyze verify`` and
``systemd-analyze security``; the notifications are received by a datagram
socket of the test, as systemd would receive them, from a real twistd
started the way the unit starts it; socket activation is done by
``systemd-socket-activate`` (what systemd does for pymta.socket, from the
command line); the unit's confinement is reproduced with unshare(1) and
setpriv(1).  The logs (JSON, logrotate) are tests/test_logging.py's.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import smtplib
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from conftest import BACKEND_TOML, ROOT, TWISTD, PymtaServer, free_port, require_program, wait_for_log
import pymta.systemd
from pymta.systemd import Notifier, NotifyService, socket_address
from test_privdrop import DroppingServer, ids_of, python, user, workdir  # noqa: F401 (fixtures)

SERVICE = ROOT / "etc" / "pymta.service"
SOCKET = ROOT / "etc" / "pymta.socket"
#: where etc/pymta.service expects a pip-installed pymta (a venv in /opt/pymta)
UNIT_TWISTD = "/opt/pymta/bin/twistd"


class NotifySocket:
    """A datagram socket standing in for systemd's notification socket."""

    def __init__(self, tmp_path: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"pymta-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env_value = "@" + name
        else:
            path = tmp_path / "notify.sock"
            self.sock.bind(str(path))
            self.env_value = str(path)

    def receive(self, timeout: float = 20.0) -> dict[str, str]:
        """The next message, as its assignments."""
        self.sock.settimeout(timeout)
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.split("\n"))

    def receive_until(self, key: str, timeout: float = 20.0) -> list[dict[str, str]]:
        """Messages up to and including the first one that has ``key``."""
        messages = []
        deadline = time.monotonic() + timeout
        while not messages or key not in messages[-1]:
            messages.append(self.receive(max(0.1, deadline - time.monotonic())))
        return messages

    def close(self) -> None:
        self.sock.close()


def exec_start(unit: Path) -> list[str]:
    """The unit's ExecStart= command line, as words."""
    [line] = [l for l in unit.read_text().splitlines() if l.startswith("ExecStart=")]
    return shlex.split(line.removeprefix("ExecStart="))


def start_as_the_unit_does(config: Path, log: Path, env: dict[str, str]) -> subprocess.Popen:
    """twistd with the unit's arguments: its own twistd and config file instead of /opt, /etc."""
    words = exec_start(SERVICE)
    assert words[0] == UNIT_TWISTD and words[-2:] == ["--config", "/etc/pymta/pymta.toml"]
    argv = [TWISTD, *words[1:-1], str(config)]
    return subprocess.Popen(argv, cwd=config.parent, env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT)


# -- the unit files -------------------------------------------------------------------


def test_the_units_pass_systemd_analyze_verify(tmp_path):
    analyze = require_program("systemd-analyze")
    assert Path(TWISTD).is_file()
    for unit in (SERVICE, SOCKET):
        text = unit.read_text()
        (tmp_path / unit.name).write_text(text.replace(UNIT_TWISTD, TWISTD))
    assert UNIT_TWISTD in SERVICE.read_text()
    run = subprocess.run([analyze, "verify", str(tmp_path / SERVICE.name), str(tmp_path / SOCKET.name)],
                         capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout + run.stderr) == (0, "")


def test_the_hardening_is_rated_as_the_readme_says(tmp_path):
    analyze = require_program("systemd-analyze")
    unit = tmp_path / SERVICE.name
    unit.write_text(SERVICE.read_text().replace(UNIT_TWISTD, TWISTD))
    run = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(unit)],
                         capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for pymta\.service: (\d+\.\d) (\w+)", run.stdout)
    assert found, run.stdout + run.stderr
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"rates it {found[1]}, \"{found[2]}\"" in readme


def test_the_only_complaint_about_the_units_as_shipped_is_a_missing_twistd(tmp_path):
    """As shipped, ExecStart names /opt/pymta/bin/twistd: where it is not installed, verify
    says so, and says nothing else."""
    analyze = require_program("systemd-analyze")
    if Path(UNIT_TWISTD).exists():
        pytest.skip(f"{UNIT_TWISTD} is installed here")
    for unit in (SERVICE, SOCKET):
        (tmp_path / unit.name).write_text(unit.read_text())
    run = subprocess.run([analyze, "verify", str(tmp_path / SERVICE.name), str(tmp_path / SOCKET.name)],
                         capture_output=True, text=True, timeout=60)
    complaints = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert complaints == [f"pymta.service: Command {UNIT_TWISTD} is not executable: "
                          "No such file or directory"]


def test_the_service_unit_says_what_the_readme_says():
    text = SERVICE.read_text()
    settings = dict(line.split("=", 1) for line in text.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["Type"] == "notify"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["ProtectSystem"] == "strict"
    assert settings["NoNewPrivileges"] == "yes"
    assert settings["StateDirectory"] == "pymta"
    assert settings["ReadWritePaths"] == "/var/mail/pymta"
    assert settings["CapabilityBoundingSet"] == "CAP_NET_BIND_SERVICE"
    assert "--nodaemon" in exec_start(SERVICE) and "--pidfile=" in exec_start(SERVICE)
    socket_settings = dict(line.split("=", 1) for line in SOCKET.read_text().splitlines()
                           if "=" in line and not line.startswith("#"))
    assert socket_settings["FileDescriptorName"] == "mx"
    assert socket_settings["Service"] == "pymta.service"
    readme = (ROOT / "README.md").read_text()
    assert 'endpoint = "systemd:domain=INET:name=mx"' in readme


# -- the notification socket ----------------------------------------------------------


DEFERRING_TOML = BACKEND_TOML + """
[backends.out]
use = "smarthost"
host = "127.0.0.1:{closed_port}"
tls = "none"

[[routes]]
match = "example.test"
backend = "local"

[[routes]]
match = "*"
backend = "out"
"""


def one_deferred_message(tmp_path) -> PymtaServer:
    """A stopped server whose spool holds one message deferred (its next hop refuses)."""
    directory = tmp_path / "srv"
    directory.mkdir()
    server = PymtaServer(directory, DEFERRING_TOML.format(closed_port=free_port()))
    server.start()
    try:
        with smtplib.SMTP("127.0.0.1", server.port, timeout=20) as client:
            client.sendmail("a@example.test", ["bob@elsewhere.test"], b"Subject: later\r\n\r\nx\r\n")
        wait_for_log(server, r"to=<bob@elsewhere\.test>.*status=deferred")
    finally:
        server.stop()
    return server


@pytest.mark.parametrize("abstract", [True, False], ids=["abstract-socket", "socket-file"])
def test_ready_after_listening_with_the_queue_then_stopping_on_sigterm(tmp_path, abstract):
    server = one_deferred_message(tmp_path)
    notify = NotifySocket(tmp_path, abstract)
    env = dict(os.environ, NOTIFY_SOCKET=notify.env_value)
    proc = start_as_the_unit_does(server.config, server.log, env)
    try:
        first = notify.receive()
        # READY=1 is the first message, and the port takes connections when it comes
        assert first["READY"] == "1", first
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as probe:
            probe.settimeout(10)
            assert probe.recv(100).startswith(b"220 ")
            probe.sendall(b"QUIT\r\n")
        assert first["MAINPID"] == str(proc.pid)
        assert re.fullmatch(r"1 message\(s\) in the queue \(0 held\), \d+ being delivered; "
                            r"\d+ connection\(s\)", first["STATUS"]), first
        assert "scheduler: 1 message(s) in the spool" in server.log_text()
        proc.send_signal(signal.SIGTERM)
        stopping = notify.receive_until("STOPPING")[-1]
        assert stopping["STOPPING"] == "1"
        # twistd ends by the signal that stopped it, as systemd expects (a clean exit)
        assert proc.wait(20) == -signal.SIGTERM
        assert "Server Shut Down." in server.log_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_watchdog_keepalives_when_the_unit_asks_for_them(tmp_path):
    notify = NotifySocket(tmp_path, abstract=True)
    server = PymtaServer(tmp_path, BACKEND_TOML)
    env = dict(os.environ, NOTIFY_SOCKET=notify.env_value, WATCHDOG_USEC="200000")
    proc = start_as_the_unit_does(server.config, server.log, env)
    try:
        assert notify.receive()["READY"] == "1"
        assert notify.receive_until("WATCHDOG")[-1] == {"WATCHDOG": "1"}
        assert notify.receive_until("WATCHDOG")[-1] == {"WATCHDOG": "1"}
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        notify.close()


def test_no_notify_socket_no_messages_and_no_complaint(server):
    assert "pymta.systemd" not in server.log_text()


class Sent:
    """A Notifier's messages, through a real socket pair."""

    def __init__(self) -> None:
        self.receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        name = f"pymta-test-{uuid.uuid4().hex}"
        self.receiver.bind("\0" + name)
        self.receiver.setblocking(False)
        self.notifier = Notifier.from_environment({"NOTIFY_SOCKET": "@" + name})

    def messages(self) -> list[str]:
        found = []
        while True:
            try:
                found.append(self.receiver.recv(4096).decode())
            except BlockingIOError:
                return found


def test_reloading_and_ready_around_a_reload():
    sent = Sent()
    service = NotifyService(sent.notifier, lambda: "3 message(s) in the queue", Clock())
    service.startService()
    assert sent.messages()[0].startswith("READY=1\nMAINPID=")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    service.reloading()
    service.ready()
    reloading, ready = sent.messages()
    fields = dict(line.split("=", 1) for line in reloading.split("\n"))
    assert fields["RELOADING"] == "1" and int(fields["MONOTONIC_USEC"]) >= before
    assert ready == "READY=1\nSTATUS=3 message(s) in the queue"


def test_ready_waits_for_the_reactor_to_run_with_its_signal_handlers():
    # twistd starts the services before reactor.run(), which installs the SIGTERM
    # handler that stops cleanly: a stop right after READY=1 must not kill the process
    reactor = MemoryReactorClock()
    sent = Sent()
    service = NotifyService(sent.notifier, lambda: "0 message(s)", reactor)
    service.startService()
    assert sent.messages() == []
    reactor.run()
    [ready] = sent.messages()
    assert ready.startswith("READY=1\n")


def test_a_reload_that_ends_after_the_stop_began_says_nothing_more():
    sent = Sent()
    service = NotifyService(sent.notifier, lambda: "0 message(s)", Clock())
    service.startService()
    service.reloading()
    service.stopService()
    service.ready()
    *_, stopping = sent.messages()
    assert stopping.startswith("STOPPING=1\n")


def test_ready_waits_for_every_listener():
    from twisted.internet import defer
    sent = Sent()
    first, second = defer.Deferred(), defer.Deferred()
    service = NotifyService(sent.notifier, lambda: "0 message(s)", Clock(),
                            listening=lambda: [first, second])
    service.startService()
    first.callback(None)
    assert sent.messages() == []
    second.callback(None)
    [ready] = sent.messages()
    assert ready.startswith("READY=1\n")


def test_status_every_interval_and_nothing_after_the_stop():
    sent = Sent()
    clock = Clock()
    count = iter(range(100))
    service = NotifyService(sent.notifier, lambda: f"{next(count)} message(s)\nin the queue", clock,
                            status_interval=30)
    service.startService()
    assert sent.messages()[0].endswith("STATUS=0 message(s) in the queue")   # one line
    clock.advance(29)
    assert sent.messages() == []
    clock.advance(1)
    assert sent.messages() == ["STATUS=1 message(s) in the queue"]
    service.stopService()
    assert sent.messages() == ["STOPPING=1\nSTATUS=stopping: sessions finish their transactions"]
    clock.advance(60)
    assert sent.messages() == []


def test_the_environment_is_read_once_and_cleared():
    environ = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "5000000", "WATCHDOG_PID": str(os.getpid()),
               "OTHER": "kept"}
    notifier = Notifier.from_environment(environ)
    assert (notifier.address, notifier.watchdog_usec) == ("\0x", 5000000)
    assert environ == {"OTHER": "kept"}
    # the watchdog of another process (twistd forked away from it) is not ours
    other = Notifier.from_environment({"NOTIFY_SOCKET": "/run/n", "WATCHDOG_USEC": "5",
                                       "WATCHDOG_PID": "1"})
    assert other.watchdog_usec is None
    assert not Notifier.from_environment({}).enabled
    assert Notifier.from_environment({}).send("READY=1") is False


def test_notify_socket_addresses():
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert socket_address("@abstract") == "\0abstract"
    for bad in ("relative/path", "@", "vsock:2:1234"):
        with pytest.raises(ValueError, match="NOTIFY_SOCKET"):
            socket_address(bad)
    assert not Notifier.from_environment({"NOTIFY_SOCKET": "vsock:2:1"}).enabled


def fill(address: str) -> list[socket.socket]:
    """Senders that filled ``address``'s queue: a fresh socket's datagram would not fit."""
    fillers = []
    while True:
        filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        filler.setblocking(False)
        fillers.append(filler)
        sent = 0
        try:
            while True:
                filler.sendto(b"STATUS=filler", address)
                sent += 1
        except BlockingIOError:
            if sent == 0:        # the receiver's queue is full, not this sender's buffer
                return fillers


def test_stopping_waits_for_a_full_manager_queue_rather_than_being_dropped(monkeypatch):
    monkeypatch.setattr(pymta.systemd, "SEND_TIMEOUT", 30.0)     # a loaded test machine
    sent = Sent()
    fillers = fill(sent.notifier.address)
    received: list[str] = []
    sending = threading.Event()

    def manager_catches_up() -> None:
        sending.wait(30)
        time.sleep(0.2)          # the send has begun (and found the queue full)
        sent.receiver.setblocking(True)
        sent.receiver.settimeout(30)
        while not received or "STOPPING=1" not in received[-1]:
            received.append(sent.receiver.recv(4096).decode())

    reader = threading.Thread(target=manager_catches_up)
    reader.start()
    try:
        sending.set()
        assert sent.notifier.send("STOPPING=1") is True
    finally:
        reader.join(30)
        for filler in fillers:
            filler.close()
    assert received[-1] == "STOPPING=1"


def test_a_vanished_manager_is_logged_once_and_never_raised(tmp_path):
    notifier = Notifier(str(tmp_path / "gone.sock"))
    assert notifier.send("READY=1") is False
    assert notifier.send("STATUS=x") is False


# -- socket activation --------------------------------------------------------------------


def readme_blocks(kind: str) -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Running under systemd"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(rf"^```{kind}\n(.*?)^```", section, re.S | re.M)


def readme_socket_activation() -> list[str]:
    """The README's systemd-socket-activate command line, as words."""
    [line] = [l for block in readme_blocks("sh") for l in block.splitlines()
              if l.startswith("systemd-socket-activate ")]
    return shlex.split(line)


def test_socket_activation_delivers_through_the_inherited_socket(tmp_path):
    """systemd-socket-activate binds the port, starts twistd on the first connection and
    passes the socket as LISTEN_FDS with the name "mx"; pymta listens on it by name."""
    activate = require_program("systemd-socket-activate")
    port = free_port()
    notify = NotifySocket(tmp_path, abstract=True)
    server = PymtaServer(tmp_path, BACKEND_TOML)
    server.config.write_text(server.config.read_text().replace(
        f'endpoint = "tcp:{server.port}:interface=127.0.0.1"', 'endpoint = "systemd:domain=INET:name=mx"'))
    assert 'endpoint = "systemd:domain=INET:name=mx"' in server.config.read_text()
    # the README's command line (as pymta.socket: ListenStream= and FileDescriptorName=mx),
    # with the test's port, twistd, config and notification socket
    words = readme_socket_activation()
    assert words[:5] == ["systemd-socket-activate", "-l", "127.0.0.1:2525", "--fdname=mx",
                         ".venv/bin/twistd"] and words[-2:] == ["--config", "pymta.toml"]
    assert words[5:-2] == exec_start(SERVICE)[1:-2]          # the unit's arguments
    argv = [activate, "-l", f"127.0.0.1:{port}", "--fdname=mx", "-E", f"NOTIFY_SOCKET={notify.env_value}",
            TWISTD, *words[5:-1], str(server.config)]
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=server.log.open("ab"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:                          # until systemd-socket-activate listens
            try:
                client = smtplib.SMTP("127.0.0.1", port, timeout=30)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline and proc.poll() is None, server.log_text()
                time.sleep(0.05)
        with client:
            client.sendmail("a@example.org", ["alice@example.test"], b"Subject: activated\r\n\r\nhi\r\n")
        assert notify.receive()["READY"] == "1"
        [message] = server.delivered("alice@example.test")
        assert b"Subject: activated" in message
        assert f"pymta listener mx starting on {port}" in server.log_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        notify.close()


def plugin_cache_arguments() -> list[str]:
    """The arguments of the unit's install note that writes the plugin caches (after python)."""
    [line] = [l for l in SERVICE.read_text().splitlines() if l.startswith("#   /opt/pymta/bin/python -c ")]
    return shlex.split(line.removeprefix("#   "))[1:]


def test_the_plugin_cache_line_of_the_unit_runs(tmp_path):
    """The unit's install note writes Twisted's plugin caches for the read-only /opt."""
    run = subprocess.run([sys.executable, *plugin_cache_arguments()], cwd=tmp_path,
                         capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stderr) == (0, "")
    import pymta.plugins
    import twisted.plugins
    for package in (twisted.plugins, pymta.plugins):
        assert any((Path(d) / "dropin.cache").is_file() for d in package.__path__), package


# -- the unit's confinement, without systemd ------------------------------------------------


class ConfinedServer(DroppingServer):
    """twistd as the unit runs it: as the user from the first instruction (User=, no --uid),
    without new privileges or capabilities (NoNewPrivileges=, CapabilityBoundingSet= less
    CAP_NET_BIND_SERVICE: the port is above 1023 here), and with every file system
    read-only but the spool and the mailboxes (ProtectSystem=strict, StateDirectory=,
    ReadWritePaths=), in a mount namespace of its own made by unshare(1)."""

    def __init__(self, *args, uid: int, gid: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.ids = (uid, gid)

    def command(self, uid: str | None) -> list[str]:
        read_write = 'for d in "$1" "$2"; do mount --bind "$d" "$d" || exit 1; done'
        script = (f"mount --make-rprivate / && {read_write} && mount -o remount,bind,ro / "
                  '&& shift 2 && exec "$@"')
        return [require_program("unshare"), "--mount", "sh", "-c", script, "sh", str(self.spool),
                str(self.mail), require_program("setpriv"), f"--reuid={self.ids[0]}",
                f"--regid={self.ids[1]}", "--clear-groups", "--no-new-privs", "--inh-caps=-all",
                "--bounding-set=-all", *super().command(None)]


def test_runs_confined_as_the_unit_confines_it(user, python, workdir):
    spool, mail = workdir / "spool", workdir / "mail"
    for directory in (spool, mail):          # StateDirectory= and the README's install -d
        directory.mkdir()
        os.chown(directory, user.pw_uid, user.pw_gid)
    server = ConfinedServer(python, workdir, spool, mail, uid=user.pw_uid, gid=user.pw_gid)
    # the unit's install note, as root: Twisted's plugin caches
    from test_privdrop import _python_path
    env = dict(os.environ, PYTHONPATH=_python_path())
    subprocess.run([python, *plugin_cache_arguments()], env=env, check=True, timeout=60)
    server.start(None)
    try:
        assert ids_of(server.proc.pid) == ([user.pw_uid] * 4, [user.pw_gid] * 4)
        status = Path(f"/proc/{server.proc.pid}/status").read_text()
        assert "\nNoNewPrivs:\t1\n" in status and "\nCapBnd:\t0000000000000000\n" in status
        # what the server sees: its working directory is read-only
        touch = subprocess.run([require_program("nsenter"), "-m", "-t", str(server.proc.pid),
                                "touch", str(workdir / "x")], capture_output=True, text=True)
        assert touch.returncode != 0 and "Read-only file system" in touch.stderr
        server.send("confined")
        [message] = server.delivered(1)
    finally:
        server.stop()
    assert b"Subject: confined" in message.read_bytes()
    log = server.log.read_text()
    for trouble in ("Traceback", "Read-only file system", "Unable to write", "Permission denied"):
        assert trouble not in log, log
