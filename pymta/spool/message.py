"""Read-side views of a spooled message body.

:class:`MessageView` is what data-stage filters (``IMessageFilter``) see
before the message is committed; :class:`SpooledMessage` is what delivery
backends get from the scheduler.  Both read the one copy of the body the
spool keeps (a small body being received is held in memory until its commit,
see :mod:`pymta.spool.writer`): nothing here reads a large body into memory.
"""

from __future__ import annotations

import io
import re
from typing import BinaryIO

from pymta.envelope import Envelope

#: how much of the top of a body :func:`parse_headers` reads at most
HEADER_READ_LIMIT = 1024 * 1024

# RFC 5322 field name: printable US-ASCII except ":" (we also refuse space,
# which the obsolete syntax allowed only before the colon; it is stripped).
_FIELD_NAME = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")


class _Prefix(io.RawIOBase):
    """The first ``size`` bytes of a file (the rest is not the body: see open_body_file)."""

    def __init__(self, raw: BinaryIO, size: int) -> None:
        self._raw = raw
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer)
        if len(view) > self._left:
            view = view[:self._left]
        count = self._raw.readinto(view) or 0
        self._left -= count
        return count

    def close(self) -> None:
        if not self.closed:
            self._raw.close()
        super().close()


def open_body_file(path: str, size: int) -> BinaryIO:
    """The first ``size`` bytes of the file at ``path``, as a buffered binary file.

    A committed spool file holds the message's envelope after its body
    (:mod:`pymta.spool.queuefile`): readers of the body stop at the envelope's
    ``size``.
    """
    raw = open(path, "rb", buffering=0)
    return io.BufferedReader(_Prefix(raw, size), 64 * 1024)  # type: ignore[return-value]


def _decode(raw: bytes) -> str:
    """Header bytes as text: UTF-8 (RFC 6532), undecodable bytes replaced."""
    return raw.decode("utf-8", errors="replace")


class _Field:
    """One header field found by :func:`_scan_header`: where it is, and what it says."""

    __slots__ = ("start", "end", "name", "parts")

    def __init__(self, start: int, end: int, name: bytes, first: bytes) -> None:
        #: byte range of the field's lines in the body, line endings included
        self.start = start
        self.end = end
        self.name = name
        #: the value after the colon, then each continuation line (line endings removed)
        self.parts = [first]


def _scan_header(fp: BinaryIO, limit: int) -> list[_Field]:
    """The header fields at the top of ``fp``: the one scanner of the header section.

    The section ends at the first empty line, at the first line that is
    neither a field nor a continuation (the body started without a blank
    line), or before the line that crosses ``limit`` bytes.
    """
    fields: list[_Field] = []
    consumed = 0
    while consumed < limit:
        line = fp.readline(limit - consumed)
        if not line:
            break
        start = consumed
        consumed += len(line)
        if consumed >= limit and not line.endswith(b"\n"):
            break                              # cut by the limit: not a whole line
        content = line.rstrip(b"\r\n")
        if not content:
            break                              # end of the header section
        if content[:1] in (b" ", b"\t"):
            if fields:
                fields[-1].parts.append(content)   # continuation of the previous field
                fields[-1].end = consumed
                continue
            break                              # continuation with nothing to continue
        match = _FIELD_NAME.match(content)
        if match is None:
            break                              # not a header field: the body begins
        fields.append(_Field(start, consumed, match.group(1), content[match.end():]))
    return fields


def parse_headers(fp: BinaryIO, limit: int = HEADER_READ_LIMIT) -> list[tuple[str, str]]:
    """Parse the header section at the top of ``fp``.

    Returns ``(name, value)`` pairs in order, with folded lines unfolded (the
    line break before the continuation's white space removed, RFC 5322
    section 2.2.3) and the value's leading and trailing white space stripped.
    The section ends at the first empty line, at the first line that is
    neither a field nor a continuation (the body started without a blank
    line), or before the line that crosses ``limit`` bytes.  Names keep their case; compare them
    case-insensitively.  Encoded words (RFC 2047) are left as they are.
    """
    # unfolding: the CRLF is dropped, the WSP kept
    return [(_decode(field.name), _decode(b"".join(field.parts)).strip(" \t"))
            for field in _scan_header(fp, limit)]


def header_field_spans(fp: BinaryIO, limit: int = HEADER_READ_LIMIT) -> list[tuple[int, int]]:
    """Byte ranges ``(start, end)`` of the header fields at the top of ``fp``.

    Field *n* here is field *n* of :func:`parse_headers` (the same scanner);
    a range covers the field's first line and its continuation lines, line
    endings included.
    """
    return [(field.start, field.end) for field in _scan_header(fp, limit)]


class MessageView:
    """A received body, for inspection before it is committed.

    The body is the file ``path``, or, while the spool holds a small body in
    memory, the bytes ``memory`` (``path`` is then None): read it with
    :meth:`open` or :meth:`headers`, which work the same either way.
    """

    def __init__(self, path: str | None, size: int, memory: bytes | bytearray | None = None):
        if path is None and memory is None:
            raise ValueError("a MessageView needs a body file or the body in memory")
        self.path = path
        self._memory = memory
        #: bytes of the body as received (after dot-unstuffing)
        self.size = size

    def open(self) -> BinaryIO:
        """The body as received, as a binary file (the caller closes it)."""
        if self._memory is not None:
            return io.BytesIO(bytes(self._memory))
        return open(self.path, "rb")

    def headers(self) -> list[tuple[str, str]]:
        """The header fields at the top of the body, see :func:`parse_headers`."""
        with self.open() as fp:
            return parse_headers(fp)

    def __repr__(self) -> str:
        where = "in memory" if self._memory is not None else self.path
        return f"<MessageView {where} {self.size} bytes>"


class SpooledMessage:
    """A committed message: its envelope and its spool file.

    The body is the first ``envelope.size`` bytes of the file at
    ``body_path`` (what follows is the envelope as committed).

    ``body``: the same bytes as the file, when the spool still holds them
    in memory (a small message just committed): reading them then makes no
    file-system call.
    """

    def __init__(self, envelope: Envelope, body_path: str, body: bytes | bytearray | None = None):
        self.envelope = envelope
        self.body_path = body_path
        self._body = body
        #: a :class:`pymta.spool.worker_calls.DeliveryRecord` when the recipients
        #: given with it are the only ones in flight, else None; a local
        #: backend applies it after its mailbox sync and sets ``removed``
        #: when that took the message out of the spool
        self.record_delivery = None
        self.removed = False

    @property
    def queue_id(self) -> str:
        return self.envelope.queue_id

    def open_body(self) -> BinaryIO:
        """The body as received (after dot-unstuffing), without ``envelope.prepend``."""
        if self._body is not None:
            return io.BytesIO(self._body)
        return open_body_file(self.body_path, self.envelope.size)

    def prepend_bytes(self) -> bytes:
        """The header fields to write before the body (Received: first)."""
        return self.envelope.prepend_bytes()

    def headers(self) -> list[tuple[str, str]]:
        """Header fields of the body as received (without the prepended ones)."""
        with self.open_body() as fp:
            return parse_headers(fp)

    def __repr__(self) -> str:
        return f"<SpooledMessage {self.envelope.queue_id} {self.body_path}>"
