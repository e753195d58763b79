"""Shared fixtures: a real pymta started with twistd on a loopback port."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TWISTD = str(Path(sys.executable).parent / "twistd")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_program(name: str) -> str:
    """Path of an external program the test needs: missing fails under CI, skips elsewhere."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (make test installs it with apt when run as root)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(proc: subprocess.Popen, port: int, log: Path, timeout: float = 20.0,
                       error: type[Exception] = RuntimeError) -> None:
    """Wait for pymta's banner on ``port``; ``error`` with its log if it exits or stays silent."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise error(f"pymta exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.settimeout(5)
                if s.recv(100).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    # wait for the server to close this probe, so that it no longer
                    # counts against the test's own connections (limits)
                    while s.recv(100):
                        pass
                    return
        except OSError:
            time.sleep(0.05)
    raise error(f"pymta did not start:\n{log.read_text()}")


class PymtaServer:
    """A pymta process: ``twistd -n pymta --config <dir>/pymta.toml``."""

    def __init__(self, workdir: Path, extra_toml: str = "", domains=("example.test",),
                 port: int | None = None, server_toml: str = "", spool_toml: str = "") -> None:
        self.dir = workdir
        self.port = port or free_port()
        self.mail = workdir / "mail"
        self.spool = workdir / "spool"
        self.config = workdir / "pymta.toml"
        self.log = workdir / "pymta.log"
        domain_list = ", ".join(f'"{d}"' for d in domains)
        self.config.write_text(textwrap.dedent(f"""\
            [server]
            hostname = "mx.example.test"
            domains = [{domain_list}]
            {server_toml}

            [spool]
            directory = "{self.spool}"
            {spool_toml}

            [[listeners]]
            name = "mx"
            endpoint = "tcp:{self.port}:interface=127.0.0.1"
            role = "mx"
            """) + textwrap.dedent(extra_toml))
        self.proc: subprocess.Popen | None = None

    @classmethod
    def from_config(cls, config: Path, port: int) -> "PymtaServer":
        """A server for an existing config file (already listening on ``port``)."""
        server = cls.__new__(cls)
        server.dir = config.parent
        server.port = port
        server.config = config
        server.log = config.parent / "pymta.log"
        server.proc = None
        return server

    def start(self, timeout: float = 20.0) -> "PymtaServer":
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen([TWISTD, "-n", "--pidfile=", "pymta", "--config", str(self.config)],
                                     cwd=self.dir, stdout=logf, stderr=subprocess.STDOUT)
        wait_until_serving(self.proc, self.port, self.log, timeout)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def maildir(self, address: str) -> Path:
        local, _, domain = address.lower().rpartition("@")
        return self.mail / domain / local

    def delivered(self, address: str, count: int = 1, timeout: float = 10.0) -> list[bytes]:
        """Wait until ``count`` messages are in the Maildir ``new/`` of ``address``; return them."""
        new = self.maildir(address) / "new"
        deadline = time.monotonic() + timeout
        while True:
            files = sorted(new.glob("*")) if new.is_dir() else []
            if len(files) >= count or time.monotonic() > deadline:
                return [f.read_bytes() for f in files]
            time.sleep(0.05)


BACKEND_TOML = """
[backends.local]
use = "maildir"
base = "mail"
"""


def routes_toml(*routes: tuple[str, str]) -> str:
    """``[[routes]]`` tables, one a ``(match, backend)`` pair, in the order given."""
    return "".join(f'\n[[routes]]\nmatch = "{match}"\nbackend = "{backend}"\n' for match, backend in routes)


def relay_toml(nameserver: str, backends: str, *routes: tuple[str, str], dns: str = "") -> str:
    """A relaying server's tables: ``[dns]`` on ``nameserver`` (plus the ``dns`` lines), the
    local Maildir backend for ``local.test``, the relay ``backends`` (TOML, dedented) and
    their ``routes`` after the local one."""
    return (f'\n[dns]\nnameservers = ["{nameserver}"]\n{textwrap.dedent(dns)}' + BACKEND_TOML
            + textwrap.dedent(backends) + routes_toml(("local.test", "local"), *routes))


def wait_for_log(server: PymtaServer, pattern: str, timeout: float = 15.0) -> str:
    """The first match of ``pattern`` in the server's log, waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.search(pattern, server.log_text())
        if match:
            return match.group(0)
        time.sleep(0.05)
    raise AssertionError(f"no log line matching {pattern!r}:\n{server.log_text()[-3000:]}")


@pytest.fixture
def make_server(tmp_path):
    servers: list[PymtaServer] = []

    def make(extra_toml: str = BACKEND_TOML, start: bool = True, **kw) -> PymtaServer:
        workdir = tmp_path / f"srv{len(servers)}"
        workdir.mkdir()
        server = PymtaServer(workdir, extra_toml, **kw)
        servers.append(server)
        return server.start() if start else server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server) -> PymtaServer:
    return make_server()
