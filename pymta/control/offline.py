"""``pymta queue list`` and ``show`` while the server is not running: the spool read directly.

Reads only, through the spool's one format module (:mod:`pymta.spool.queuefile`);
a message whose files go away while they are read is skipped.
"""

from __future__ import annotations

import os

from pymta.envelope import Envelope
from pymta.spool.queuefile import BODY_SUFFIX, QUEUE_DIR, load_queue_file, queue_ids


def entries(spool_dir: str) -> list[tuple[Envelope, frozenset[int]]]:
    """Every message in the spool: (envelope, no index in flight), by id.

    Raises PermissionError when the queue directory cannot be read.
    """
    queue_dir = os.path.join(spool_dir, QUEUE_DIR)
    if os.path.isdir(queue_dir):
        os.listdir(queue_dir)               # PermissionError here, rather than an empty queue
    found = []
    for queue_id in queue_ids(queue_dir):
        try:
            envelope = load_queue_file(queue_dir, queue_id)[0]
        except FileNotFoundError:
            continue
        except (ValueError, TypeError, KeyError):
            continue                        # damaged: the server's recovery quarantines it
        found.append((envelope, frozenset()))
    return found


def read_content(path: str, prepend: bytes, size: int, offset: int, limit: int) -> bytes:
    """Bytes ``offset`` .. ``offset + limit`` of prepend + body (the first ``size`` bytes of ``path``)."""
    data = prepend[offset:offset + limit]
    start = max(0, offset - len(prepend))
    want = min(limit - len(data), size - start)
    if want > 0:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data += os.pread(fd, want, start)
        finally:
            os.close(fd)
    return data


def content(spool_dir: str, envelope: Envelope, limit: int | None = None) -> bytes:
    """The message as it is delivered: prepended headers, then the body (or ``limit`` bytes)."""
    prepend = envelope.prepend_bytes()
    total = len(prepend) + envelope.size
    path = os.path.join(spool_dir, QUEUE_DIR, envelope.queue_id + BODY_SUFFIX)
    return read_content(path, prepend, envelope.size, 0, total if limit is None else limit)
