"""Helpers for the relay tests: spooled messages on disk and backends on a test reactor."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pymta.config.options import PluginContext
from pymta.dns.resolver import DNSResolver
from pymta.envelope import Envelope, Recipient
from pymta.relay.backend import RelayBackend, SmarthostBackend
from pymta.spool.message import SpooledMessage

_ids = itertools.count(1)


def spooled(directory: Path, *recipients: str, body: bytes = b"Subject: test\r\n\r\nhello\r\n",
            sender: str = "sender@local.test", prepend: tuple[str, ...] = ("Received: by test\r\n",),
            **envelope_fields: Any) -> SpooledMessage:
    """A committed-looking message: a body file and an envelope (not in a real spool)."""
    queue_id = f"TEST{next(_ids):06d}"
    path = directory / f"{queue_id}.msg"
    path.write_bytes(body)
    rcpts = [Recipient(a, a, "out") if isinstance(a, str) else a for a in recipients]
    envelope = Envelope(queue_id, sender, rcpts, 1_700_000_000.0, size=len(body),
                        prepend=list(prepend), **envelope_fields)
    return SpooledMessage(envelope, str(path))


def context(reactor: Any, directory: Path, nameserver: str | None = None,
            hostname: str = "relay.local.test") -> PluginContext:
    resolver = DNSResolver([nameserver] if nameserver else None, timeout=1.0, attempts=1,
                           reactor=reactor)
    return PluginContext(hostname, ("local.test",), str(directory), reactor, resolver)


FAST = {"idle_timeout": "0.3s", "connect_timeout": "2s"}


def smarthost(reactor: Any, directory: Path, port: int, host: str = "127.0.0.1",
              nameserver: str | None = None, **options: Any) -> SmarthostBackend:
    opts = {"host": f"{host}:{port}", "tls": "none", **FAST, **options}
    return SmarthostBackend(opts, context(reactor, directory, nameserver))


def relay(reactor: Any, directory: Path, port: int, nameserver: str, **options: Any) -> RelayBackend:
    opts = {"port": port, **FAST, **options}
    return RelayBackend(opts, context(reactor, directory, nameserver))


def statuses(results) -> list[str]:
    return [r.status for r in results]
