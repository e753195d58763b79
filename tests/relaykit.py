"""Helpers for the delivery tests: spooled messages on disk, the context a local backend is
given, and relay backends on a test reactor."""

from __future__ import annotations

import itertools
import os
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
            queue_id: str | None = None, name: str | None = None,
            **envelope_fields: Any) -> SpooledMessage:
    """A committed-looking message: a body file and an envelope (not in a real spool).

    Each gets a queue id and file of its own unless ``queue_id`` or the file's ``name`` is given."""
    queue_id = queue_id or f"TEST{next(_ids):06d}"
    path = directory / (name or f"{queue_id}.msg")
    path.write_bytes(body)
    rcpts = [Recipient(a, a, "out") if isinstance(a, str) else a for a in recipients]
    envelope = Envelope(queue_id, sender, rcpts, 1_700_000_000.0, size=len(body),
                        prepend=list(prepend), **envelope_fields)
    return SpooledMessage(envelope, str(path))


class LocalContext:
    """What a local delivery backend reads of its PluginContext: names, and paths below
    ``config_dir`` (joined as given, not normalised)."""

    hostname = "mx.example.org"
    domains = ("example.org",)

    def __init__(self, config_dir: Path, reactor: Any = None) -> None:
        self.config_dir = str(config_dir)
        self.reactor = reactor

    def resolve_path(self, path: str) -> str:
        return os.path.join(self.config_dir, path)


def local_backend(cls: type, directory: Path, reactor: Any = None, **options: Any) -> Any:
    """A local delivery backend of class ``cls`` with ``base = "mail"`` below ``directory``."""
    return cls({"base": "mail", **options}, LocalContext(directory, reactor))


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
