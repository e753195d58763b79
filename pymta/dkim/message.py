"""A message as DKIM sees it: the header section (bytes, for dkimpy) and the body (streamed).

:func:`read_header_section` reads the header fields up to the empty line that
ends them, as dkimpy's parser splits a message; what follows is the body,
which :func:`body_chunks` gives in pieces.  Both read a binary file, so a
message is never held in memory whole (:class:`pymta.spool.message.MessageView`
gives a file for a body in memory too).
"""

from __future__ import annotations

import time
from typing import BinaryIO, Iterator

__all__ = ["read_header_section", "body_chunks", "HeaderSectionError", "HEADER_LIMIT", "CHUNK"]

#: the longest header section handled (a larger one is refused, not read into memory)
HEADER_LIMIT = 1024 * 1024
#: bytes of body read, canonicalized and hashed in one step
CHUNK = 64 * 1024


class HeaderSectionError(Exception):
    """The header section cannot be handled (too long)."""


def read_header_section(fp: BinaryIO, limit: int = HEADER_LIMIT) -> bytes:
    """The header fields at the top of ``fp`` with their line ends, without the empty
    line; ``fp`` is left at the first byte of the body."""
    lines = []
    size = 0
    while True:
        line = fp.readline(limit + 1 - size)
        if not line:
            break
        if line in (b"\r\n", b"\n"):
            break
        size += len(line)
        if size > limit:
            raise HeaderSectionError(f"header section longer than {limit} bytes")
        lines.append(line)
    return b"".join(lines)


def body_chunks(fp: BinaryIO, chunk: int = CHUNK) -> Iterator[bytes]:
    """The rest of ``fp`` in pieces of ``chunk`` bytes.

    Before each piece the thread yields (``time.sleep(0)`` releases the GIL),
    so that the reactor thread, when it waits for the GIL, gets it after at
    most one piece of work (about a millisecond), not after Python's switch
    interval (5 ms), which a loaded machine stretches further."""
    while True:
        time.sleep(0)
        data = fp.read(chunk)
        if not data:
            return
        yield data


def for_dkimpy(header_section: bytes) -> bytes:
    """The header section as a message with an empty body, for a dkimpy object: its
    header work reads only the fields; the body hash is ours."""
    if header_section and not header_section.endswith(b"\n"):
        header_section += b"\r\n"
    return header_section + b"\r\n"
