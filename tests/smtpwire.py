"""A raw SMTP client for the loopback tests: exact bytes out, replies parsed."""

from __future__ import annotations

import socket
import time


class Wire:
    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0,
                 read_banner: bool = True) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.banner = self.reply() if read_banner else None

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            return False
        self.buf += chunk
        return True

    def reply(self) -> tuple[int, list[str]]:
        """One (possibly multi-line) reply: (code, [lines without code])."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buf:
                if not self._fill():
                    raise ConnectionError(f"closed; partial {self.buf!r}, lines {lines}")
            line, self.buf = self.buf.split(b"\r\n", 1)
            text = line.decode()
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines

    def replies(self, n: int) -> list[tuple[int, str]]:
        return [(code, " ".join(lines)) for code, lines in (self.reply() for _ in range(n))]

    def cmd(self, line: str | bytes) -> tuple[int, str]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        code, lines = self.reply()
        return code, " ".join(lines)

    def closed_by_server(self, wait: float = 5.0) -> bool:
        deadline = time.monotonic() + wait
        self.sock.settimeout(wait)
        try:
            while time.monotonic() < deadline:
                if not self._fill():
                    return True
        except (ConnectionResetError, socket.timeout):
            return False
        return False

    def nothing_more(self, wait: float = 0.5) -> bool:
        """No further bytes arrive within ``wait`` seconds."""
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return not self.buf
        self.buf += chunk
        return False

    def close(self) -> None:
        self.sock.close()
