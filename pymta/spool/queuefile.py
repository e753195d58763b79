"""The spool's on-disk format, stated once.

Layout under the spool directory (all mode 0700)::

    tmp/<ID>.msg          message being received or committed (not committed yet)
    tmp/<ID>.<n>.env      replacement envelope being written (not committed)
    queue/<ID>.msg        committed message: the body as received (once per
                          message), then its envelope as committed, then a
                          trailer line giving the envelope's length
    queue/<ID>.env        the envelope as last updated, once a delivery attempt
                          changed it; it replaces the one inside <ID>.msg
    corrupt/              committed messages recover() could not load
    free/<n>              files of removed messages, kept for reuse
                          (see :mod:`pymta.spool.disk`)

The envelope is JSON (see :mod:`pymta.envelope`), one line.  The trailer is
``TRAILER_FORMAT``, fixed length, so that the envelope is found from the end
of the file; the body is the first ``envelope.size`` bytes.  A message is
committed when ``queue/<ID>.msg`` exists: it is renamed there, complete,
after it was written and synced, so one file sync per message makes body
and envelope durable together.  An ``<ID>.env`` without its ``<ID>.msg`` is
what a crash left of a removal.

Everything here is plain file access, no reactor: used by the file side
(:mod:`pymta.spool.disk`, in the disk worker's child or a thread), by the
reactor side for what it reads, and by tools that read a spool offline.
"""

from __future__ import annotations

import json
import os
from typing import BinaryIO

from pymta.envelope import Envelope
from pymta.spool.queueid import is_queue_id

TMP_DIR = "tmp"
QUEUE_DIR = "queue"
CORRUPT_DIR = "corrupt"
FREE_DIR = "free"
BODY_SUFFIX = ".msg"
ENVELOPE_SUFFIX = ".env"

#: after the envelope in a committed message file: the envelope's length in bytes
TRAILER_FORMAT = b"pymta envelope %010d\n"
TRAILER_BYTES = len(TRAILER_FORMAT % 0)
_TRAILER_PREFIX = TRAILER_FORMAT.split(b"%")[0]

#: chunk size when moving the rest of a body (drop_headers)
COPY_CHUNK = 256 * 1024


class SpoolError(Exception):
    """A spool operation could not be carried out (the message names it)."""


def encode_envelope(envelope: Envelope) -> bytes:
    """The envelope as stored: one line of JSON."""
    return json.dumps(envelope.to_json(), ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8") + b"\n"


def trailer(envelope_data: bytes) -> bytes:
    """The line after the envelope in a committed message file."""
    return TRAILER_FORMAT % len(envelope_data)


def read_embedded_envelope(fd: int) -> tuple[bytes, int]:
    """(the envelope inside a committed message file, the body's size); ValueError if damaged."""
    file_size = os.fstat(fd).st_size
    if file_size < TRAILER_BYTES:
        raise ValueError(f"{file_size} bytes: too short to hold an envelope")
    tail = os.pread(fd, TRAILER_BYTES, file_size - TRAILER_BYTES)
    digits = tail[len(_TRAILER_PREFIX):-1]
    if not (tail.startswith(_TRAILER_PREFIX) and tail.endswith(b"\n") and digits.isdigit()):
        raise ValueError("no envelope trailer at its end")
    length = int(digits)
    body_size = file_size - TRAILER_BYTES - length
    if body_size < 0:
        raise ValueError(f"its trailer names an envelope of {length} bytes, longer than the file")
    data = os.pread(fd, length, body_size)
    if len(data) != length:
        raise ValueError("short read of its envelope")
    return data, body_size


def parse_envelope(data: bytes, queue_id: str) -> Envelope:
    """The stored envelope ``data`` of ``queue_id``; ValueError (or TypeError, KeyError) if damaged."""
    envelope = Envelope.from_json(json.loads(data.decode("utf-8")))
    if envelope.queue_id != queue_id:
        raise ValueError(f"envelope names queue id {envelope.queue_id!r}")
    return envelope


def queue_file_content(body: bytes, envelope: Envelope) -> bytes:
    """The bytes of a committed message file (for tools that fill a spool themselves)."""
    data = encode_envelope(envelope)
    return bytes(body) + data + trailer(data)


def load_queue_file(queue_dir: str, queue_id: str) -> tuple[Envelope, int]:
    """(the envelope, the body's size) of the committed message ``queue_id`` in ``queue_dir``.

    The envelope is the updated one (``<ID>.env``) if there is one, else the
    one inside ``<ID>.msg``.  A message file without an envelope inside,
    whose ``<ID>.env`` gives its whole size as the body's, is a message of
    the two-file layout of earlier versions, and read as such.  Raises
    OSError, or ValueError for a damaged file.  Reads only: usable on the
    spool of a running server.
    """
    fd = os.open(os.path.join(queue_dir, queue_id + BODY_SUFFIX), os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            data, body_size = read_embedded_envelope(fd)
            damage = None
        except ValueError as e:
            # A spool written by pymta before messages held their envelope:
            # the file is all body, the envelope is <ID>.env (checked below).
            data, body_size, damage = b"", os.fstat(fd).st_size, e
    finally:
        os.close(fd)
    try:
        with open(os.path.join(queue_dir, queue_id + ENVELOPE_SUFFIX), "rb") as fp:
            data = fp.read()
    except FileNotFoundError:
        if damage is not None:
            raise damage from None
    envelope = parse_envelope(data, queue_id)
    if damage is not None and envelope.size != body_size:
        raise damage
    return envelope, body_size


def queue_ids(queue_dir: str) -> list[str]:
    """Ids of the committed messages in ``queue_dir``, oldest first."""
    try:
        names = os.listdir(queue_dir)
    except FileNotFoundError:
        return []
    return sorted(name[:-len(BODY_SUFFIX)] for name in names
                  if name.endswith(BODY_SUFFIX) and is_queue_id(name[:-len(BODY_SUFFIX)]))


def open_exclusive(path: str) -> int:
    """Create ``path`` for writing (0600); FileExistsError if it exists."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)


def cut_ranges(path: str, file: BinaryIO, drop: list[tuple[int, int]]) -> int:
    """Remove the byte ranges ``drop`` (sorted, disjoint) from the file; returns its new length.

    ``file`` is the open (write-only) body file at ``path``; the bytes after
    each range move left in order, the file is truncated and ``file``
    positioned at the new end.  Raises OSError.
    """
    file.flush()
    end = os.fstat(file.fileno()).st_size
    if not drop:
        return end
    # the byte ranges to keep after the first dropped field, moved left in order
    keep = [(stop, drop[k + 1][0]) for k, (_, stop) in enumerate(drop[:-1])]
    keep.append((drop[-1][1], end))
    write_at = drop[0][0]
    fd = file.fileno()                     # write-only: reading goes through a second descriptor
    with open(path, "rb") as reader:
        for start, stop in keep:
            position = start
            while position < stop:
                chunk = os.pread(reader.fileno(), min(COPY_CHUNK, stop - position), position)
                if not chunk:
                    raise OSError(f"{path}: unexpected end of file at {position}")
                view = memoryview(chunk)
                while view:
                    written = os.pwrite(fd, view, write_at)
                    view = view[written:]
                    write_at += written
                position += len(chunk)
    os.ftruncate(fd, write_at)
    file.seek(write_at)
    return write_at


def unlink_quietly(path: str) -> None:
    """Remove ``path`` if it is there (cleaning up after a failure)."""
    try:
        os.unlink(path)
    except OSError:
        pass
