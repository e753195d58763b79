"""A STARTTLS load generator: N concurrent SMTP sessions over TLS, spread over client processes.

smtp-source speaks no TLS, so the STARTTLS bench drives the servers with this
client: blocking sockets and Python's ssl module (no certificate verification,
no session resumption, so every STARTTLS is a full handshake), one thread per
session.  Threads rather than asyncio: the handshake then runs in C without
the GIL, and the client costs about a third less CPU per handshake than with
asyncio's ssl transport, which matters when client and server share two cores.
The sessions are spread over a few forked processes, so that one client
process (one GIL) is not what limits the rate; every process reports the CPU
it used so the reader can judge.  The jobs (handshakes or messages) are drawn
from one counter shared by all processes: all N sessions stay busy until the
last job is claimed, or until the time cap, after which no new job starts.

Four kinds of case:

- ``handshake``: connect, banner, EHLO, STARTTLS, TLS handshake, EHLO, QUIT;
  a job is one such connection, complete when QUIT got its 221 and the
  server closed the connection.
- ``msg/conn``: connect, banner, EHLO, STARTTLS, handshake, EHLO, MAIL, RCPT,
  DATA, QUIT; one message per connection, counted at the 250 after the data
  (the connection is still closed as above before the session takes the next).
- ``msg/session``: each session does STARTTLS once, then sends message after
  message (MAIL, RCPT, DATA) until the jobs run out, then QUIT.
- ``msg/session-plain``: the same without STARTTLS, the control that shows
  what TLS costs on top of the rest of the server's work.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import resource
import socket
import ssl
import statistics
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from servers import TEST_RECIPIENT, TEST_SENDER

KINDS = ("handshake", "msg/conn", "msg/session", "msg/session-plain")
#: the name the client sends in SNI and EHLO
CLIENT_NAME = "client.bench.localhost"
SERVER_NAME = "bench.localhost"
#: a session that waits this long for a reply has failed
REPLY_TIMEOUT = 30.0


@dataclass(frozen=True)
class TlsCase:
    """One load shape: what each job is, how many jobs, how many concurrent sessions."""

    kind: str
    jobs: int
    sessions: int = 20
    body_bytes: int = 1024

    @property
    def label(self) -> str:
        what = "handshakes" if self.kind == "handshake" else f"{self.body_bytes // 1024}KiB {self.kind}"
        return f"{what} s={self.sessions}"


@dataclass
class TlsLoadResult:
    """What the client achieved against one server in one case."""

    #: handshakes (QUIT answered) or messages (250 after the data) completed
    completed: int
    #: from the start signal until the last client process finished
    seconds: float
    #: jobs that failed (connection error, unexpected reply, timeout)
    failed: int
    first_error: str
    #: stopped starting new jobs at the time cap
    capped: bool
    #: user + system CPU of all client processes during the run
    client_cpu_seconds: float
    client_processes: int
    #: TLS handshake durations (ClientHello to Finished, as the client saw them), ms
    handshake_ms: list[float] = field(default_factory=list, repr=False)
    #: negotiated protocol and cipher, as reported by the client's ssl module
    tls_version: str = ""
    cipher: str = ""
    #: SHA-256 of the DER certificate the server presented
    certificate_sha256: str = ""

    @property
    def rate(self) -> float:
        return self.completed / self.seconds if self.seconds > 0 else 0.0

    @property
    def client_cpu_ms(self) -> float:
        return 1000 * self.client_cpu_seconds / self.completed if self.completed else 0.0

    @property
    def client_busy(self) -> float:
        """Client CPU as a share of what its processes could have used (1.0 = every one at 100 %)."""
        capacity = self.seconds * self.client_processes
        return self.client_cpu_seconds / capacity if capacity > 0 else 0.0

    @property
    def handshake_ms_median(self) -> float:
        return statistics.median(self.handshake_ms) if self.handshake_ms else 0.0

    @property
    def problem(self) -> str:
        parts = []
        if self.failed:
            parts.append(f"{self.failed} failed, first: {self.first_error}")
        if self.capped:
            parts.append("stopped at the time cap")
        return "; ".join(parts)


class SmtpDialogueError(RuntimeError):
    """The server answered something the client did not expect, or closed the connection."""


def client_context() -> ssl.SSLContext:
    """TLS client context: no verification (self-signed certificate), defaults otherwise."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def message_bytes(body_bytes: int, serial: str) -> bytes:
    """A message of about body_bytes body (78-character lines), dot-terminated, ready for DATA."""
    header = (f"From: <{TEST_SENDER}>\r\nTo: <{TEST_RECIPIENT}>\r\nSubject: STARTTLS bench\r\n"
              f"Message-ID: <{serial}@{CLIENT_NAME}>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    body = line * (body_bytes // len(line))
    rest = body_bytes - len(body)
    if rest > 2:
        body += b"y" * (rest - 2) + b"\r\n"
    return header + body + b".\r\n"


class _Connection:
    """One SMTP connection on a blocking socket: replies, commands, STARTTLS."""

    def __init__(self, port: int) -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT)
        self.buffer = b""
        self.expect(220, "banner")

    def _line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(16384)
            if not chunk:
                raise SmtpDialogueError("connection closed by the server")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line

    def expect(self, code: int, what: str) -> None:
        lines: list[bytes] = []
        while True:
            line = self._line()
            lines.append(line.rstrip())
            if len(line) < 4 or line[3:4] != b"-":
                break
        if not lines[-1][:3].isdigit() or int(lines[-1][:3]) != code:
            text = b" / ".join(lines).decode("utf-8", "replace")
            raise SmtpDialogueError(f"{what}: got {text!r}, wanted {code}")

    def command(self, line: bytes, code: int) -> None:
        self.sock.sendall(line + b"\r\n")
        self.expect(code, line.split(b":")[0].split(b" ")[0].decode())

    def starttls(self, ctx: ssl.SSLContext, stats: "_WorkerStats") -> None:
        self.command(b"EHLO " + CLIENT_NAME.encode(), 250)
        self.command(b"STARTTLS", 220)
        if self.buffer:
            raise SmtpDialogueError("the server sent data after its 220 to STARTTLS")
        started = time.perf_counter()
        self.sock = ctx.wrap_socket(self.sock, server_hostname=SERVER_NAME)
        stats.handshake_ms.append(1000 * (time.perf_counter() - started))
        if not stats.tls_version:
            assert isinstance(self.sock, ssl.SSLSocket)
            stats.tls_version = self.sock.version() or ""
            stats.cipher = (self.sock.cipher() or ("",))[0]
            der = self.sock.getpeercert(binary_form=True) or b""
            stats.certificate_sha256 = hashlib.sha256(der).hexdigest()
        self.command(b"EHLO " + CLIENT_NAME.encode(), 250)

    def send(self, message: bytes) -> None:
        self.command(f"MAIL FROM:<{TEST_SENDER}>".encode(), 250)
        self.command(f"RCPT TO:<{TEST_RECIPIENT}>".encode(), 250)
        self.command(b"DATA", 354)
        self.sock.sendall(message)
        self.expect(250, "end of data")

    def quit(self) -> None:
        """QUIT, 221, then wait for the server to close (its TLS close_notify and FIN)."""
        self.command(b"QUIT", 221)
        try:
            while self.sock.recv(4096):
                pass
        except (OSError, ssl.SSLError):
            pass
        self.sock.close()

    def abort(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


@dataclass
class _WorkerStats:
    """What one session thread did (merged per process, then over processes)."""

    completed: int = 0
    failed: int = 0
    first_error: str = ""
    capped: bool = False
    handshake_ms: list[float] = field(default_factory=list)
    tls_version: str = ""
    cipher: str = ""
    certificate_sha256: str = ""

    def failure(self, exc: BaseException) -> None:
        self.failed += 1
        if not self.first_error:
            self.first_error = f"{type(exc).__name__}: {exc}"

    def merge(self, other: "_WorkerStats") -> None:
        self.completed += other.completed
        self.failed += other.failed
        self.first_error = self.first_error or other.first_error
        self.capped = self.capped or other.capped
        self.handshake_ms.extend(other.handshake_ms)
        for name in ("tls_version", "cipher", "certificate_sha256"):
            setattr(self, name, getattr(self, name) or getattr(other, name))


class _Jobs:
    """The job counter shared by every client process and thread."""

    def __init__(self, counter, total: int, deadline: float) -> None:
        self.counter, self.total, self.deadline = counter, total, deadline

    def claim(self, stats: _WorkerStats) -> bool:
        with self.counter.get_lock():
            if self.counter.value >= self.total:
                return False
            if time.monotonic() >= self.deadline:
                stats.capped = True
                return False
            self.counter.value += 1
            return True


_FAILURES = (OSError, ssl.SSLError, SmtpDialogueError)


def _session(port: int, case: TlsCase, jobs: _Jobs, stats: _WorkerStats, serial: str) -> None:
    """One session thread: jobs until they run out or the time cap."""
    ctx = client_context()
    sent = 0
    conn: _Connection | None = None
    if case.kind in ("handshake", "msg/conn"):
        while jobs.claim(stats):
            conn = None
            try:
                conn = _Connection(port)
                conn.starttls(ctx, stats)
                if case.kind == "msg/conn":
                    sent += 1
                    conn.send(message_bytes(case.body_bytes, f"{serial}.{sent}"))
                    stats.completed += 1
                    conn.quit()
                else:
                    conn.quit()
                    stats.completed += 1
            except _FAILURES as exc:
                stats.failure(exc)
                if conn is not None:
                    conn.abort()
        return
    # msg/session(-plain): one session for as many messages as it can claim (a new one after a failure)
    while jobs.claim(stats):
        try:
            if conn is None:
                conn = _Connection(port)
                if case.kind == "msg/session-plain":
                    conn.command(b"EHLO " + CLIENT_NAME.encode(), 250)
                else:
                    conn.starttls(ctx, stats)
            sent += 1
            conn.send(message_bytes(case.body_bytes, f"{serial}.{sent}"))
            stats.completed += 1
        except _FAILURES as exc:
            stats.failure(exc)
            if conn is not None:
                conn.abort()
            conn = None
    if conn is not None:
        try:
            conn.quit()
        except _FAILURES as exc:
            stats.failure(exc)  # its messages were already counted; this only reports the QUIT
            conn.abort()


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker(port: int, case: TlsCase, sessions: int, counter, time_cap: float, go,
            results: Connection, worker_number: int) -> None:
    results.send("ready")
    go.wait()
    cpu_before = _cpu_seconds()
    jobs = _Jobs(counter, case.jobs, time.monotonic() + time_cap)
    per_thread = [_WorkerStats() for _ in range(sessions)]
    threads = [threading.Thread(target=_session, args=(port, case, jobs, per_thread[i],
                                                       f"{os.getpid()}.{worker_number}.{i}"), daemon=True)
               for i in range(sessions)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = _WorkerStats()
    for one in per_thread:
        stats.merge(one)
    results.send((stats, _cpu_seconds() - cpu_before, time.monotonic()))
    results.close()


def run_tls_load(port: int, case: TlsCase, processes: int, time_cap: float) -> TlsLoadResult:
    """Run one case against 127.0.0.1:port with case.sessions sessions over `processes` processes."""
    mp = multiprocessing.get_context("fork")
    processes = max(1, min(processes, case.sessions))
    counter = mp.Value("l", 0)
    go = mp.Event()
    workers: list[tuple[multiprocessing.Process, Connection]] = []
    for number in range(processes):
        share = case.sessions // processes + (1 if number < case.sessions % processes else 0)
        receive, send = mp.Pipe(duplex=False)
        proc = mp.Process(target=_worker, args=(port, case, share, counter, time_cap, go, send, number),
                          daemon=True)
        proc.start()
        send.close()
        workers.append((proc, receive))
    try:
        for proc, receive in workers:
            if not receive.poll(30) or receive.recv() != "ready":
                raise RuntimeError(f"client process {proc.pid} did not start")
        started = time.monotonic()
        go.set()
        merged = _WorkerStats()
        cpu = 0.0
        finished = started
        for proc, receive in workers:
            # sessions stop claiming jobs at the cap; a reply can still take REPLY_TIMEOUT
            if not receive.poll(time_cap + 3 * REPLY_TIMEOUT):
                raise RuntimeError(f"client process {proc.pid} did not finish")
            stats, worker_cpu, worker_end = receive.recv()
            cpu += worker_cpu
            finished = max(finished, worker_end)
            merged.merge(stats)
    finally:
        for proc, receive in workers:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            receive.close()
    return TlsLoadResult(completed=merged.completed, seconds=finished - started, failed=merged.failed,
                         first_error=merged.first_error, capped=merged.capped, client_cpu_seconds=cpu,
                         client_processes=processes, handshake_ms=merged.handshake_ms,
                         tls_version=merged.tls_version, cipher=merged.cipher,
                         certificate_sha256=merged.certificate_sha256)
