"""The SMTP servers the benchmark drives: pymta, aiosmtpd (Maildir), smtp-sink.

(The private Postfix instance lives in postfix_instance.py.)  Every server
listens on 127.0.0.1 on a free unprivileged port, is started fresh under a work
directory and stopped by the harness, even on failure.
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prerequisites import find_tool

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
TEST_DOMAIN = "bench.test"
TEST_RECIPIENT = f"user@{TEST_DOMAIN}"
TEST_SENDER = "sender@client.test"
#: Upper bound for one message in the footprint test (50 MiB) plus headers.
MAX_MESSAGE_SIZE = 60_000_000
#: listen(2) backlog given to every server we configure (Twisted's default is 50,
#: asyncio's 100): the same for all, so bursts of connects are not a backlog contest.
LISTEN_BACKLOG = 1024


@dataclass(frozen=True)
class TlsFiles:
    """A certificate and its private key (PEM files) a server offers with STARTTLS."""

    certificate: Path
    key: Path


class ServerStartError(RuntimeError):
    """A server under test did not come up; the message says which and why."""


#: servers started and not yet stopped, so that an unexpected exit still stops them
_STARTED: list["BenchServer"] = []


@atexit.register
def stop_all_started() -> None:
    for server in list(_STARTED):
        try:
            server.stop()
        except Exception as exc:  # noqa: BLE001 - keep stopping the others
            print(f"bench: could not stop {server.name}: {exc}", file=sys.stderr)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise RLIMIT_NOFILE of this process (inherited by servers it starts); returns the soft limit."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (max(wanted, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, target))
            return target
        except (ValueError, OSError):
            continue
    return soft


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:]) or f"(log {path} is empty)"


def read_banner(port: int, timeout: float = 2.0) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(1024)
            if not chunk:
                break
            data += chunk
        try:
            s.sendall(b"QUIT\r\n")
            s.recv(1024)
        except OSError:
            pass
    return data.decode("ascii", "replace").strip()


class BenchServer:
    """One server under test.  Subclasses fill start_process() and root_pid."""

    #: row label in the result table
    name: str = "?"
    #: True if it stores the messages (then delivered_count() counts Maildir files)
    stores: bool = True
    start_timeout: float = 30.0

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = work_dir / "server.log"
        self.maildir_base = work_dir / "mail"
        #: files clear_delivered moved aside
        self._archived = 0

    # -- lifecycle -----------------------------------------------------------------
    def prepare(self) -> None:
        """Create the work dir (fresh) and config files."""
        if self.work_dir.exists():
            shutil.rmtree(self.work_dir)
        self.work_dir.mkdir(parents=True)
        self.maildir_base.mkdir()

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self) -> None:
        _STARTED.append(self)
        try:
            self.prepare()
        except (OSError, subprocess.CalledProcessError) as exc:
            raise ServerStartError(f"{self.name}: could not prepare {self.work_dir}: {exc}") from exc
        log = open(self.log_path, "wb")
        try:
            self.process = subprocess.Popen(self.command(), cwd=self.work_dir, env=self.environment(),
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True)
        finally:
            log.close()
        self.wait_until_ready()

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last_error = "no attempt"
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ServerStartError(
                    f"{self.name} exited with status {self.process.returncode} while starting "
                    f"(command: {' '.join(self.command())}); log {self.log_path}:\n{log_tail(self.log_path)}")
            try:
                banner = read_banner(self.port)
                if banner.startswith("220"):
                    return
                last_error = f"banner was {banner!r}"
            except OSError as exc:
                last_error = str(exc)
            time.sleep(0.2)
        self.stop()
        raise ServerStartError(
            f"{self.name} did not answer with a 220 banner on 127.0.0.1:{self.port} within "
            f"{self.start_timeout:.0f}s ({last_error}); log {self.log_path}:\n{log_tail(self.log_path)}")

    @property
    def root_pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    def stop(self) -> None:
        if self in _STARTED:
            _STARTED.remove(self)
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)

    # -- what landed ---------------------------------------------------------------
    def _new_dirs(self) -> list[str]:
        return glob.glob(os.path.join(self.maildir_base, "*", "*", "new"))

    def delivered_count(self) -> int | None:
        """Messages in the Maildirs' new/ directories (None for a server that stores nothing)."""
        total = 0
        for new_dir in self._new_dirs():
            with os.scandir(new_dir) as entries:
                total += sum(1 for e in entries if not e.name.startswith("."))
        return total

    def delivered_paths(self) -> list[str]:
        paths: list[str] = []
        for new_dir in self._new_dirs():
            paths.extend(os.path.join(new_dir, n) for n in os.listdir(new_dir))
        return paths

    def clear_delivered(self) -> None:
        """Empty the Maildirs for the next case: move the files aside, do not delete them.

        On ext4 without a journal (as on the machines this bench was made
        on), every inode allocation scans past the inodes freed in the last
        one to six minutes, so deleting a case's thousands of files would
        slow the file creation of the next cases, whichever server runs
        them.  They are deleted with the work dir (see remove_delivered).
        """
        archive = self.work_dir / "delivered"
        archive.mkdir(exist_ok=True)
        for path in self.delivered_paths():
            self._archived += 1
            os.rename(path, archive / str(self._archived))

    def remove_delivered(self) -> None:
        """Delete what clear_delivered moved aside (at the end of the run)."""
        shutil.rmtree(self.work_dir / "delivered", ignore_errors=True)


class SmtpSink(BenchServer):
    """Postfix's smtp-sink: answers the protocol, stores nothing (the machine's ceiling)."""

    name = "smtp-sink"
    stores = False

    def command(self) -> list[str]:
        sink = find_tool("smtp-sink") or "smtp-sink"
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        return [sink, *user, "-c", "-m", "1024", "-h", "sink.bench.localhost",
                f"127.0.0.1:{self.port}", str(LISTEN_BACKLOG)]

    def delivered_count(self) -> int | None:
        return None

    def messages_seen(self) -> int | None:
        """smtp-sink's own counter of received messages ("mesg=N" in its -c output)."""
        try:
            text = self.log_path.read_bytes().decode("ascii", "replace")
        except FileNotFoundError:
            return None
        found = re.findall(r"mesg=(\d+)", text)
        return int(found[-1]) if found else None

    def clear_delivered(self) -> None:
        pass


class AiosmtpdMaildir(BenchServer):
    """aiosmtpd with a handler that writes, fsyncs (file and dir) and then answers 250."""

    name = "aiosmtpd"

    def command(self) -> list[str]:
        return [sys.executable, str(BENCH_DIR / "aiosmtpd_maildir.py"), "--port", str(self.port),
                "--base", str(self.maildir_base), "--max-size", str(MAX_MESSAGE_SIZE),
                "--backlog", str(LISTEN_BACKLOG)]


class Pymta(BenchServer):
    """pymta under twistd, spool synced with the given mode ("fsync" or "syncfs").

    With `tls`, the config gets a [tls] table, so its mx listener offers STARTTLS.
    With `metrics`, a [metrics] table: the Prometheus metrics are kept and served
    on a loopback port of their own (`metrics_port`).
    """

    def __init__(self, work_dir: Path, sync: str = "fsync", tls: TlsFiles | None = None,
                 metrics: bool = False) -> None:
        super().__init__(work_dir)
        self.sync = sync
        self.tls = tls
        self.metrics_port = free_port() if metrics else None
        self.name = "pymta" if sync == "fsync" else f"pymta/{sync}"
        if metrics:
            self.name += "/metrics"
        self.config_path = work_dir / "pymta.toml"
        self.spool_dir = work_dir / "spool"

    def twistd(self) -> str:
        beside = Path(sys.executable).parent / "twistd"
        return str(beside) if beside.exists() else "twistd"

    def prepare(self) -> None:
        super().prepare()
        self.config_path.write_text(f"""\
# written by bench/servers.py for one benchmark run
[server]
hostname = "bench.localhost"
domains = ["{TEST_DOMAIN}"]

[spool]
directory = "{self.spool_dir}"
sync = "{self.sync}"

[[listeners]]
name = "mx"
endpoint = "tcp:{self.port}:interface=127.0.0.1:backlog={LISTEN_BACKLOG}"
role = "mx"

[limits]
max_message_size = {MAX_MESSAGE_SIZE}
max_connections = 20000
max_connections_per_ip = 20000

[backends.local]
use = "maildir"
base = "{self.maildir_base}"
""" + self.tls_table() + self.metrics_table())

    def metrics_table(self) -> str:
        if self.metrics_port is None:
            return ""
        return f"""
[metrics]
endpoint = "tcp:{self.metrics_port}:interface=127.0.0.1"
"""

    def tls_table(self) -> str:
        if self.tls is None:
            return ""
        return f"""
[tls]
certificate = "{self.tls.certificate}"
key = "{self.tls.key}"
"""

    def command(self) -> list[str]:
        return [self.twistd(), "-n", "--pidfile=", "pymta", "--config", str(self.config_path)]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # Find the pymta package and its twistd plugin from the checkout even when not pip-installed.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env
