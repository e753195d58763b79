"""aiosmtpd peer for the benchmark: a durable Maildir delivery before 250.

Each accepted message is written once per recipient to
``<base>/<domain>/<local-part>/new/`` (the same layout pymta's maildir backend
uses).  The file is written in ``tmp/``, fsynced, renamed into ``new/`` and the
``new/`` directory is fsynced: only then does the client get ``250``.  The
blocking file work runs in the event loop's default thread pool, so that
concurrent sessions overlap their fsyncs the way a careful aiosmtpd user would
write it.

Run:  python bench/aiosmtpd_maildir.py --port 2526 --base /path/to/mail
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import socket
import sys
import time
from typing import Any

try:
    from aiosmtpd.smtp import SMTP, Envelope, Session
except ImportError:  # pragma: no cover - the bench installs it
    sys.exit("aiosmtpd_maildir: the aiosmtpd package is not installed in this Python "
             f"({sys.executable}); run: {sys.executable} -m pip install aiosmtpd")


class MaildirDeliveryHandler:
    """aiosmtpd handler: accept any recipient, deliver to a Maildir, fsync, then 250."""

    def __init__(self, base: str, hostname: str) -> None:
        self.base = base
        self.hostname = hostname
        self._sequence = itertools.count()
        self._known_maildirs: set[str] = set()

    def _maildir_for(self, address: str) -> str:
        local, _, domain = address.rpartition("@")
        local = local or address
        domain = (domain or "localhost").lower()
        for part in (local, domain):
            if "/" in part or part in ("", ".", ".."):
                raise ValueError(f"recipient {address!r} cannot be mapped to a Maildir path")
        path = os.path.join(self.base, domain, local)
        if path not in self._known_maildirs:
            for sub in ("tmp", "new", "cur"):
                os.makedirs(os.path.join(path, sub), exist_ok=True)
            self._known_maildirs.add(path)
        return path

    def _unique_name(self) -> str:
        now = time.time()
        return f"{int(now)}.M{int((now % 1) * 1e6)}P{os.getpid()}Q{next(self._sequence)}.{self.hostname}"

    def _deliver_one(self, maildir: str, content: bytes) -> None:
        name = self._unique_name()
        tmp_path = os.path.join(maildir, "tmp", name)
        new_dir = os.path.join(maildir, "new")
        fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(content)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp_path, os.path.join(new_dir, name))
        dir_fd = os.open(new_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def _deliver(self, envelope: Envelope, peer: Any) -> None:
        received = (
            f"Return-Path: <{envelope.mail_from}>\r\n"
            f"Received: from {peer[0] if peer else 'unknown'} by {self.hostname} (aiosmtpd-maildir);"
            f" {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        ).encode("utf-8", "surrogateescape")
        body = envelope.original_content or envelope.content or b""
        if isinstance(body, str):
            body = body.encode("utf-8", "surrogateescape")
        content = received + body
        for rcpt in envelope.rcpt_tos:
            self._deliver_one(self._maildir_for(rcpt), content)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, self._deliver, envelope, session.peer)
        except (OSError, ValueError) as exc:
            print(f"aiosmtpd_maildir: delivery failed: {exc}", file=sys.stderr, flush=True)
            return "451 4.3.0 Local delivery failed, try again later"
        return "250 2.0.0 OK delivered to Maildir"


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    handler = MaildirDeliveryHandler(args.base, args.hostname)

    def factory() -> SMTP:
        return SMTP(handler, hostname=args.hostname, data_size_limit=args.max_size,
                    enable_SMTPUTF8=True, decode_data=False, timeout=300)

    server = await loop.create_server(factory, host=args.host, port=args.port,
                                      backlog=args.backlog, family=socket.AF_INET,
                                      reuse_address=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"aiosmtpd_maildir: listening on {args.host}:{args.port}, Maildirs under {args.base}",
          flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--base", required=True, help="Maildir root: <base>/<domain>/<user>/new/")
    parser.add_argument("--hostname", default="aiosmtpd.bench.localhost")
    parser.add_argument("--max-size", type=int, default=60_000_000, help="data_size_limit in bytes")
    parser.add_argument("--backlog", type=int, default=1024)
    args = parser.parse_args(argv)
    os.makedirs(args.base, exist_ok=True)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
