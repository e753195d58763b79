"""A message being received into the spool: :class:`SpoolWriter`.

A small body (up to the spool's ``memory_limit``, 64 KiB by default) is held
in memory while it arrives: receiving it makes no file-system call on the
reactor thread, and the spool's flush thread creates, writes and fsyncs the
file at commit.  A body that outgrows the limit spills into
``tmp/<ID>.msg`` and streams there from then on.  Either way the body exists
once, and ``250`` is still only given once it is durable
(:meth:`SpoolWriter.commit`).
"""

from __future__ import annotations

import io
import os
from typing import Any, BinaryIO

from twisted.internet import defer
from twisted.logger import Logger

from pymta.envelope import Envelope
from pymta.spool.disk import Commit
from pymta.spool.message import MessageView, header_field_spans
from pymta.spool.queuefile import SpoolError, cut_ranges, encode_envelope, open_exclusive

log = Logger(namespace="pymta.spool.store")

#: Python-side buffer of a body file being received
WRITE_BUFFER = 64 * 1024
#: bodies up to this size are held in memory until commit (Spool's default)
MEMORY_BODY_LIMIT = 64 * 1024


class SpoolWriter:
    """A message being received: the body in memory while small, else in a temp file.

    ``spool``: the :class:`pymta.spool.store.Spool` its commit goes to.
    """

    def __init__(self, spool: Any, queue_id: str, path: str, memory_limit: int):
        self._spool = spool
        self.queue_id = queue_id
        #: the body file while uncommitted (``tmp/<ID>.msg``); it exists only
        #: once the body spilled out of memory (see :attr:`in_memory`)
        self.path = path
        self._memory_limit = memory_limit
        self._memory: bytearray | None = bytearray()
        self._file: BinaryIO | None = None
        #: body bytes written so far
        self.size = 0
        self._open = True
        self._committing = False
        #: header ranges of the body file to cut at commit (see drop_headers)
        self._pending_drop: list[tuple[int, int]] = []

    @property
    def in_memory(self) -> bool:
        """Is the body (still) held in memory rather than in ``path``?"""
        return self._memory is not None

    def write(self, data: bytes) -> None:
        """Append a chunk of the body (on the reactor thread).

        Raises OSError if the body has to spill into its temp file and the
        file cannot be created or written.
        """
        if not self._open or self._committing:
            raise SpoolError(f"{self.queue_id}: write after commit or abort")
        memory = self._memory
        if memory is not None:
            if len(memory) + len(data) <= self._memory_limit:
                memory += data
                self.size += len(data)
                return
            self.spill()
        self._file.write(data)
        self.size += len(data)

    def spill(self) -> None:
        """Move the body from memory into ``tmp/<ID>.msg``; it streams there from now on."""
        file = os.fdopen(open_exclusive(self.path), "wb", buffering=WRITE_BUFFER)
        try:
            if self._memory:
                file.write(self._memory)
        except BaseException:
            file.close()
            os.unlink(self.path)
            raise
        self._file, self._memory = file, None

    def view(self) -> MessageView:
        """The body so far, for data-stage filters (served from memory, or the file)."""
        if not self._open:
            raise SpoolError(f"{self.queue_id}: view after commit or abort")
        if self._memory is not None:
            return MessageView(None, self.size, memory=self._memory)
        if not self._committing:
            self._apply_pending_drop()
            self._file.flush()
        return MessageView(self.path, self.size)

    def _apply_pending_drop(self) -> None:
        """Cut the ranges drop_headers left for the commit now, on this thread."""
        if self._pending_drop:
            self.size = cut_ranges(self.path, self._file, self._pending_drop)
            self._pending_drop = []

    def drop_headers(self, indices: tuple[int, ...]) -> None:
        """Remove the header fields at these positions (as numbered by ``view().headers()``).

        A body in memory is rewritten at once.  A body in its temp file may
        be large: the fields are found now (only the header section is read)
        and :attr:`size` shrinks at once, but moving the rest of the body
        is left to the commit, in the spool's thread, not the reactor's (or
        done here if the body is looked at again first, by :meth:`view` or
        another ``drop_headers``).  Positions past the last field are logged
        and ignored.  Raises OSError if the file cannot be read or rewritten
        (the message must then be refused: its body is in an unknown state).
        """
        if not self._open or self._committing:
            raise SpoolError(f"{self.queue_id}: drop_headers after commit or abort")
        wanted = sorted({int(i) for i in indices})
        if not wanted:
            return
        if self._memory is not None:
            spans = header_field_spans(io.BytesIO(self._memory))
        else:
            self._apply_pending_drop()
            self._file.flush()
            with open(self.path, "rb") as reader:
                spans = header_field_spans(reader)
        unknown = [i for i in wanted if not 0 <= i < len(spans)]
        if unknown:
            log.warn("{queue_id}: cannot drop header fields {unknown}: the message has "
                     "{count} header fields", queue_id=self.queue_id, unknown=unknown,
                     count=len(spans))
        drop = [spans[i] for i in wanted if 0 <= i < len(spans)]
        if not drop:
            return
        if self._memory is not None:
            for start, end in reversed(drop):
                del self._memory[start:end]
            self.size = len(self._memory)
            return
        self._pending_drop = drop
        self.size -= sum(end - start for start, end in drop)

    def commit(self, envelope: Envelope) -> defer.Deferred:
        """Make body and envelope durable; the Deferred fires (with None) when they are.

        ``envelope.queue_id`` is set to this writer's id if empty (it must
        not name another message) and ``envelope.size`` to the body size.
        The envelope is serialised now: later changes to the object need
        :meth:`Spool.update`.  On failure the Deferred errbacks and the
        message is not in the spool.
        """
        if not self._open or self._committing:
            raise SpoolError(f"{self.queue_id}: commit after commit or abort")
        if not envelope.queue_id:
            envelope.queue_id = self.queue_id
        elif envelope.queue_id != self.queue_id:
            raise SpoolError(f"envelope names queue id {envelope.queue_id}, "
                             f"but the body was spooled as {self.queue_id}")
        envelope.size = self.size
        self._committing = True
        # the envelope is written after the body, then the file is renamed into queue/
        result = self._spool.commit(Commit(self.queue_id, self.path, self._file, self._memory,
                                           encode_envelope(envelope), list(self._pending_drop)))

        def forget(outcome):
            self._open = False
            self._file = self._memory = None
            return outcome
        return result.addBoth(forget)

    def abort(self) -> None:
        """Discard the body (idempotent; ignored once commit() was called)."""
        if not self._open or self._committing:
            return
        self._open = False
        file, self._file, self._memory = self._file, None, None
        if file is None:
            return                           # held in memory: nothing on disk
        try:
            file.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __repr__(self) -> str:
        where = "in memory" if self._memory is not None else self.path
        return f"<SpoolWriter {self.queue_id} {self.size} bytes {where}>"
