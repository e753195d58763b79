"""Memory footprint checks: many idle connections, and one very large message.

Both read the server tree's resident memory from /proc before and after (and,
for the large message, sample it while the message streams in and until it
has landed in the Maildir).  The client is this process: plain asyncio
streams for the idle connections, a blocking socket for the large message.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from dataclasses import dataclass

from procstat import reset_peak_rss, tree_peak_rss_kib, tree_rss_kib
from servers import TEST_RECIPIENT, TEST_SENDER, BenchServer


class SmtpDialogueError(RuntimeError):
    """The server answered something the footprint client did not expect."""


class _SmtpClient:
    """Just enough SMTP client to send one message on a blocking socket."""

    def __init__(self, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buffer = b""

    def _line(self) -> bytes:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SmtpDialogueError("server closed the connection")
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.rstrip(b"\r")

    def reply(self) -> tuple[int, list[str]]:
        lines: list[str] = []
        while True:
            line = self._line().decode("utf-8", "replace")
            lines.append(line[4:])
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), lines

    def command(self, text: str, expect: int) -> list[str]:
        self.sock.sendall(text.encode("ascii") + b"\r\n")
        code, lines = self.reply()
        if code != expect:
            raise SmtpDialogueError(f"{text.split()[0]} got {code} {' / '.join(lines)} (wanted {expect})")
        return lines

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        self.sock.close()


def send_message(port: int, body_bytes: int) -> float:
    """Send one message with a body of about body_bytes (80-byte lines); returns seconds to the 250."""
    client = _SmtpClient(port)
    try:
        code, banner = client.reply()
        if code != 220:
            raise SmtpDialogueError(f"banner was {code} {banner}")
        features = [f.upper() for f in client.command("EHLO client.bench.localhost", 250)]
        size_param = f" SIZE={body_bytes + 1024}" if any(f.startswith("SIZE") for f in features) else ""
        started = time.perf_counter()
        client.command(f"MAIL FROM:<{TEST_SENDER}>{size_param}", 250)
        client.command(f"RCPT TO:<{TEST_RECIPIENT}>", 250)
        client.command("DATA", 354)
        header = (f"From: <{TEST_SENDER}>\r\nTo: <{TEST_RECIPIENT}>\r\n"
                  f"Subject: footprint test, {body_bytes} bytes\r\n"
                  f"Message-ID: <{time.time_ns()}@client.bench.localhost>\r\n\r\n").encode()
        client.sock.sendall(header)
        line = b"x" * 78 + b"\r\n"
        chunk = line * 819  # 65,520 bytes
        remaining = body_bytes
        while remaining > 0:
            piece = chunk if remaining >= len(chunk) else line * max(1, remaining // len(line))
            client.sock.sendall(piece)
            remaining -= len(piece)
        client.sock.sendall(b".\r\n")
        code, lines = client.reply()
        if code != 250:
            raise SmtpDialogueError(f"end of data got {code} {' / '.join(lines)}")
        return time.perf_counter() - started
    finally:
        client.close()


def wait_for_landing(server: BenchServer, expected: int, timeout: float) -> int | None:
    """Wait until the server's Maildirs hold `expected` messages; returns the last count seen."""
    deadline = time.monotonic() + timeout
    count = server.delivered_count()
    while count is not None and count < expected and time.monotonic() < deadline:
        time.sleep(0.05)
        count = server.delivered_count()
    return count


@dataclass(frozen=True)
class IdleResult:
    server: str
    wanted: int
    opened: int
    failed: int
    first_error: str
    rss_before_kib: int
    rss_after_kib: int
    seconds: float

    @property
    def bytes_per_connection(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) * 1024 / self.opened if self.opened else 0.0


async def _open_idle_connections(port: int, count: int, concurrency: int
                                 ) -> tuple[list[asyncio.StreamWriter], list[str]]:
    gate = asyncio.Semaphore(concurrency)

    async def one() -> asyncio.StreamWriter:
        async with gate:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 30)
            try:
                banner = await asyncio.wait_for(reader.readline(), 30)
            except BaseException:
                writer.close()
                raise
            if not banner.startswith(b"220"):
                writer.close()
                raise SmtpDialogueError(f"banner was {banner[:80]!r}")
            return writer

    outcomes = await asyncio.gather(*(one() for _ in range(count)), return_exceptions=True)
    writers = [o for o in outcomes if isinstance(o, asyncio.StreamWriter)]
    errors = [f"{type(o).__name__}: {o}" for o in outcomes if isinstance(o, BaseException)]
    return writers, errors


async def _close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
    await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)


def measure_idle_connections(server: BenchServer, count: int, settle: float = 1.0) -> IdleResult:
    """Open `count` connections to a freshly started server, read each banner, and hold them."""
    for _ in range(10):  # warm up the code paths of a session before the baseline
        client = _SmtpClient(server.port)
        client.reply()
        client.command("EHLO warmup.bench.localhost", 250)
        client.close()
    time.sleep(settle)
    before = tree_rss_kib(server.root_pid)
    started = time.perf_counter()

    async def scenario() -> tuple[int, list[str], int]:
        writers, errors = await _open_idle_connections(server.port, count, concurrency=64)
        await asyncio.sleep(settle)
        after = tree_rss_kib(server.root_pid)
        await _close_all(writers)
        return len(writers), errors, after

    opened, errors, after = asyncio.run(scenario())
    return IdleResult(server=server.name, wanted=count, opened=opened, failed=len(errors),
                      first_error=errors[0] if errors else "", rss_before_kib=before,
                      rss_after_kib=after, seconds=time.perf_counter() - started)


@dataclass(frozen=True)
class LargeMessageResult:
    server: str
    body_bytes: int
    landed: bool
    landed_bytes: int
    rss_before_kib: int
    rss_peak_kib: int
    seconds_to_250: float
    seconds_to_landed: float
    problem: str = ""

    @property
    def growth_kib(self) -> int:
        return self.rss_peak_kib - self.rss_before_kib


class _RssSampler(threading.Thread):
    def __init__(self, pid: int, interval: float = 0.005) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak_kib = max(self.peak_kib, tree_rss_kib(self.pid))
            self._stop_event.wait(self.interval)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak_kib = max(self.peak_kib, tree_rss_kib(self.pid))
        return self.peak_kib


def measure_large_message(server: BenchServer, body_bytes: int, land_timeout: float = 120.0
                          ) -> LargeMessageResult:
    """Send one message of body_bytes to a freshly started server; peak RSS growth until it landed."""
    send_message(server.port, 4096)  # warm up the data and delivery paths
    if wait_for_landing(server, 1, 30) != 1:
        raise SmtpDialogueError(f"{server.name}: the warm-up message did not land in the Maildir")
    server.clear_delivered()
    time.sleep(0.5)
    before = tree_rss_kib(server.root_pid)
    peak_reset = reset_peak_rss(server.root_pid)
    sampler = _RssSampler(server.root_pid)
    sampler.start()
    started = time.perf_counter()
    problem = ""
    to_250 = 0.0
    try:
        to_250 = send_message(server.port, body_bytes)
        count = wait_for_landing(server, 1, land_timeout)
        landed = count == 1
        if not landed:
            problem = f"not in the Maildir after {land_timeout:.0f}s"
    except (OSError, SmtpDialogueError) as exc:
        landed = False
        problem = f"{type(exc).__name__}: {exc}"
    to_landed = time.perf_counter() - started
    peak = sampler.stop()
    if peak_reset:
        peak = max(peak, tree_peak_rss_kib(server.root_pid))
    paths = server.delivered_paths()
    landed_bytes = 0
    if paths:
        landed_bytes = os.path.getsize(paths[0])
        if landed_bytes < body_bytes:
            problem = problem or f"the landed file has {landed_bytes} bytes, fewer than the body's {body_bytes}"
    return LargeMessageResult(server=server.name, body_bytes=body_bytes, landed=landed and not problem,
                              landed_bytes=landed_bytes, rss_before_kib=before, rss_peak_kib=peak,
                              seconds_to_250=to_250, seconds_to_landed=to_landed, problem=problem)
