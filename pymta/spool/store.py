"""The durable spool: one file per message, holding its body and its envelope.

Layout under the spool directory (all mode 0700)::

    tmp/<ID>.msg          message being received or committed (not committed yet)
    tmp/<ID>.<n>.env      replacement envelope being written (not committed)
    queue/<ID>.msg        committed message: the body as received (once per
                          message), then its envelope as committed, then a
                          trailer line giving the envelope's length
    queue/<ID>.env        the envelope as last updated, once a delivery attempt
                          changed it; it replaces the one inside <ID>.msg
    corrupt/              committed messages recover() could not load
    free/<n>              files of removed messages, kept for reuse (see below)

The envelope is JSON (see :mod:`pymta.envelope`), one line.  The trailer is
``TRAILER_FORMAT``, fixed length, so that the envelope is found from the end
of the file; the body is the first ``envelope.size`` bytes.  A message is
committed when ``queue/<ID>.msg`` exists: it is renamed there, complete,
after it was written and synced, so one file sync per message makes body
and envelope durable together.  An ``<ID>.env`` without its ``<ID>.msg`` is
what a crash left of a removal.

Receiving (:class:`pymta.spool.writer.SpoolWriter`) holds a small body in
memory, so the reactor thread makes no file-system call for typical mail; a
large body spills into ``tmp/<ID>.msg`` as it arrives.  Once committed, such
a body stays in memory (``BODY_CACHE_BYTES`` in all, oldest dropped first)
until the message is removed, so that its delivery need not read it back.

Changes to ``queue/`` go through three pipelines that run off the reactor
thread, so that none waits behind another: in the child process of the
server's disk worker (:mod:`pymta.spool.diskworker`), or in the spool's own
threads (``threads`` mode, and tests):

* **commits** (group commit): while one flush runs, new commits wait; when
  it ends they all go to disk together in the next flush, and each commit's
  Deferred fires when its batch is durable.  One flush, ``sync="fsync"``:
  write and fsync every message's temp file (several at once, so that the
  file system can merge them into one journal commit), rename them into
  ``queue/``, then one fsync of ``queue/``.
  ``sync="syncfs"``: write everything, rename, then one ``syncfs(2)`` for the
  whole file system.
* **updates** (replaced envelopes, same batching): write (and fsync) the new
  envelopes, replace the old ones, then one fsync of ``queue/``; with
  ``syncfs``, one ``syncfs`` before the renames too, so that a crash cannot
  leave a committed message with a half-written envelope.
* **removals**: unlink the message file, then the updated envelope if there
  is one, without any barrier.  A crash before the unlinks reach the disk
  brings the message back at the next start, and it is delivered again: at
  least once is the contract.  A message whose delivery finishes it leaves
  the spool without this pipeline: the local backend removes it in the
  batch that delivered it, right after the mailbox sync
  (:class:`DeliveryRecord`; a delivery that does not finish the message
  marks its recipients delivered there), so that a crash repeats only the
  deliveries in flight, not those whose results were still on their way back.

Files are recycled: a removed message's files (and an envelope replaced by
an update) are renamed into ``free/`` rather than deleted, up to
``FREE_FILES_KEPT`` of them no larger than ``RECYCLE_MAX_BYTES``, and the
next commits and updates take their temp files from there: renamed into
``tmp/``, overwritten from the start, truncated to the new length and
fsynced like a new file.  A busy spool then allocates and frees no inodes,
which is what creating and deleting files costs most on ext4 (most of all
without a journal, where every allocation scans past the inodes freed in the
last minutes).  A recycled file never becomes visible in ``queue/`` before
it holds the new message, durably (with ``syncfs``, one more sync before
the renames: overwritten blocks are not ordered before a rename).  And a
removed message's file is reused only after a sync of ``queue/`` that began
after its removal: until then a crash could bring its old name back, which
must not then name another message's bytes.  (A crash on ext4 without a
journal needs ``fsck`` before the next start, as for any program.)

Requests for one message are applied in the order they were made: an update
or removal waits for the message's earlier commit, update or removal.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from pymta.envelope import DELIVERED, PENDING, Envelope
from pymta.filesync import SYNC_MODES
from pymta.filesync import fsync_directory as _fsync_directory
from pymta.libc import load_syncfs as _load_syncfs
from pymta.spool.message import SpooledMessage
from pymta.spool.pipeline import BatchPipeline, pipeline_threadpool
from pymta.spool.queueid import is_queue_id, new_queue_id
# re-exported: the writer's names were defined here before it had its own module
from pymta.spool.writer import (COPY_CHUNK, MEMORY_BODY_LIMIT, WRITE_BUFFER, SpoolError,  # noqa: F401
                                SpoolWriter, cut_ranges, header_field_spans, open_exclusive)

log = Logger()

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

#: files written and fsynced at once within one flush (fsync mode).  Measured
#: with 20 sessions on 2 cores and a virtio disk: 2 lanes beat 1 (the disk
#: merges concurrent flushes) and 4 or 8 (the lanes' threads then wait on
#: each other for the interpreter lock and the file system's locks).
PARALLEL_FSYNCS = 2
#: at most this many files of removed messages are kept in free/ for reuse
FREE_FILES_KEPT = 1024
#: larger files are deleted rather than kept for reuse
RECYCLE_MAX_BYTES = 256 * 1024
#: bodies committed from memory stay there for their delivery, up to this many bytes in all
BODY_CACHE_BYTES = 8 * 1024 * 1024


def _encode_envelope(envelope: Envelope) -> bytes:
    return json.dumps(envelope.to_json(), ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8") + b"\n"


def _trailer(envelope_data: bytes) -> bytes:
    return TRAILER_FORMAT % len(envelope_data)


def _read_embedded_envelope(fd: int) -> tuple[bytes, int]:
    """(the envelope inside a committed message file, the body's size); ValueError if damaged."""
    file_size = os.fstat(fd).st_size
    if file_size < TRAILER_BYTES:
        raise ValueError(f"{file_size} bytes: too short to hold an envelope")
    trailer = os.pread(fd, TRAILER_BYTES, file_size - TRAILER_BYTES)
    digits = trailer[len(_TRAILER_PREFIX):-1]
    if not (trailer.startswith(_TRAILER_PREFIX) and trailer.endswith(b"\n") and digits.isdigit()):
        raise ValueError("no envelope trailer at its end")
    length = int(digits)
    body_size = file_size - TRAILER_BYTES - length
    if body_size < 0:
        raise ValueError(f"its trailer names an envelope of {length} bytes, longer than the file")
    data = os.pread(fd, length, body_size)
    if len(data) != length:
        raise ValueError("short read of its envelope")
    return data, body_size


def _parse_envelope(data: bytes, queue_id: str) -> Envelope:
    envelope = Envelope.from_json(json.loads(data.decode("utf-8")))
    if envelope.queue_id != queue_id:
        raise ValueError(f"envelope names queue id {envelope.queue_id!r}")
    return envelope


def queue_file_content(body: bytes, envelope: Envelope) -> bytes:
    """The bytes of a committed message file (for tools that fill a spool themselves)."""
    data = _encode_envelope(envelope)
    return bytes(body) + data + _trailer(data)


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
            data, body_size = _read_embedded_envelope(fd)
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
    envelope = _parse_envelope(data, queue_id)
    if damage is not None and envelope.size != body_size:
        raise damage
    return envelope, body_size


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- requests travelling through the pipelines ----------------------------------

@dataclass
class _Commit:
    queue_id: str
    #: tmp/<ID>.msg: the spilled body file, or where the in-memory body goes;
    #: the envelope is written after the body, and the file renamed into queue/
    body_tmp: str
    #: the open spilled body file, or None
    body_file: BinaryIO | None
    #: the body held in memory, or None
    body_memory: bytearray | None
    envelope_data: bytes
    #: header ranges to cut from the spilled body file before it is synced (drop_headers)
    body_drop: list[tuple[int, int]] = field(default_factory=list)
    done: defer.Deferred = field(default_factory=defer.Deferred)
    #: does body_tmp hold this request's body (so that a failure must remove it)?
    body_written: bool = False
    #: the spilled body is in body_tmp, closed (sent to the disk worker): open it again
    reopen: bool = False
    #: body_tmp is a recycled file, overwritten in place
    recycled: bool = False


@dataclass
class _Update:
    queue_id: str
    envelope_data: bytes
    done: defer.Deferred = field(default_factory=defer.Deferred)
    envelope_tmp: str = ""


@dataclass
class _Remove:
    queue_id: str
    #: the body's size if the caller knows it (else the removal looks)
    size: int | None = None
    done: defer.Deferred = field(default_factory=defer.Deferred)


_Request = Any  # _Commit | _Update | _Remove


@dataclass
class DeliveryRecord:
    """What the spool records in the batch that delivered a message.

    The scheduler gives one to a delivery backend with the message
    (``SpooledMessage.record_delivery``) when the recipients it hands over
    are the only ones of the message in flight.  A local backend calls
    :meth:`apply` right after its mailbox sync, in the same disk worker call
    (or thread), before it answers: a crash then repeats at most the
    deliveries in flight, not those whose results were on their way back
    through the reactor to a later spool batch.

    ``finishes``: delivering every one of them finishes the message (no
    other recipient pending, no notification to send); when they all were
    delivered, the message then leaves the spool, as :meth:`Spool.remove`
    does.  Otherwise the recipients delivered are marked so in its envelope
    (the scheduler's update with the full results follows).

    ``spool``: the :class:`Spool` itself when delivery batches run in this
    process (``threads`` mode); it does not travel to the disk worker, whose
    child uses its own Spool of the directory (which keeps that free list).
    """

    directory: str
    sync: str
    queue_id: str
    size: int | None = None
    #: the recipients handed over, as indices into the envelope's recipients
    indices: tuple[int, ...] = ()
    finishes: bool = True
    #: the spool's file work runs in the disk worker's child
    in_worker: bool = False
    spool: Any = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "spool": None}

    def apply(self, outcomes: list[tuple[bool, str]]) -> bool:
        """Record ``outcomes`` (delivered?, result summary), one per recipient; True if removed.

        Only where the spool's files are kept: by the Spool given, or (a
        spool with a disk worker) in the worker's child; elsewhere it does
        nothing (the scheduler records the results as usual).
        """
        spool = self.spool
        if spool is None and self.in_worker:
            from pymta.spool.diskworker import child_spool
            spool = child_spool(self.directory, self.sync)
        if spool is None or not outcomes:
            return False
        if self.finishes and all(delivered for delivered, _ in outcomes):
            errors = spool._apply_removals([_Remove(self.queue_id, self.size)])
            for failure in errors.values():
                log.warn("{queue_id}: delivered, but not yet removed from the spool: {error}",
                         queue_id=self.queue_id, error=failure.getErrorMessage())
            return not errors
        delivered = [(index, summary) for index, (ok, summary) in zip(self.indices, outcomes) if ok]
        if delivered:
            spool._record_delivered(self.queue_id, delivered)
        return False


def records_of_requests(kind: str, batch: list[_Request]) -> list[tuple]:
    """The plain, picklable fields of a batch's requests (for the disk worker).

    A spilled body's file is flushed and closed here: the worker opens it
    again by its name.
    """
    if kind == "commits":
        records = []
        for r in batch:
            spilled = r.body_file is not None
            if spilled:
                r.body_file.close()              # flushes Python's buffer
                r.body_file = None
            records.append((r.queue_id, r.body_tmp, spilled, r.body_memory, r.envelope_data,
                            r.body_drop))
        return records
    if kind == "updates":
        return [(r.queue_id, r.envelope_data, r.envelope_tmp) for r in batch]
    return [(r.queue_id, r.size) for r in batch]


def requests_from_records(kind: str, records: list[tuple]) -> list[_Request]:
    """The requests again, from :func:`records_of_requests` (in the disk worker)."""
    if kind == "commits":
        requests = []
        for queue_id, body_tmp, spilled, memory, envelope_data, body_drop in records:
            requests.append(_Commit(queue_id, body_tmp, None, memory, envelope_data,
                                    list(body_drop), reopen=spilled))
        return requests
    if kind == "updates":
        return [_Update(queue_id, data, envelope_tmp=tmp) for queue_id, data, tmp in records]
    return [_Remove(queue_id, size) for queue_id, size in records]


class Spool:
    """Durable message store; see the module docstring for layout and ordering."""

    def __init__(self, directory: str, reactor=None, sync: str = "fsync",
                 memory_limit: int = MEMORY_BODY_LIMIT, threadpool=None, worker=None):
        """``memory_limit``: bodies up to this many bytes are held in memory until
        their commit (0: every body streams into its temp file from the
        start).  ``threadpool``: where the pipelines run; by default a pool
        of the spool's own, or the reactor's pool for a reactor that cannot
        run and stop one (a test clock).  ``worker``: a
        :class:`pymta.spool.diskworker.DiskWorker`; the pipelines' file work
        then runs in its child process instead of threads.
        """
        if sync not in SYNC_MODES:
            raise ValueError(f"spool sync mode must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
        if memory_limit < 0:
            raise ValueError(f"spool memory limit must not be negative, not {memory_limit}")
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._reactor = reactor
        self.directory = os.path.abspath(directory)
        self.tmp_dir = os.path.join(self.directory, TMP_DIR)
        self.queue_dir = os.path.join(self.directory, QUEUE_DIR)
        self.corrupt_dir = os.path.join(self.directory, CORRUPT_DIR)
        self.free_dir = os.path.join(self.directory, FREE_DIR)
        for path in (self.directory, self.tmp_dir, self.queue_dir, self.corrupt_dir, self.free_dir):
            try:
                os.makedirs(path, mode=0o700, exist_ok=True)
            except OSError as e:
                raise SpoolError(f"cannot create spool directory {path}: {e.strerror}") from e
        self._syncfs = _load_syncfs() if sync == "syncfs" else None
        if sync == "syncfs" and self._syncfs is None:
            log.warn("spool {directory}: syncfs(2) is not available here; using fsync",
                     directory=self.directory)
            sync = "fsync"
        self.sync = sync
        self.memory_limit = memory_limit
        self._worker = worker
        self._fsync_workers: ThreadPoolExecutor | None = None
        self._fsync_workers_made = threading.Lock()
        if worker is not None:
            self._commits = BatchPipeline(reactor, None, lambda batch: self._in_worker("commits", batch))
            self._updates = BatchPipeline(reactor, None, lambda batch: self._in_worker("updates", batch),
                                          self._name_temp_files)
            self._removals = BatchPipeline(reactor, None, lambda batch: self._in_worker("removals", batch))
        else:
            if threadpool is None:
                threadpool = pipeline_threadpool(reactor, 3, "pymta.spool")
            # (looked up per batch, so that tests can wrap the methods)
            self._commits = BatchPipeline(reactor, threadpool, lambda batch: self._flush(batch))
            self._updates = BatchPipeline(reactor, threadpool, lambda batch: self._flush_updates(batch),
                                          self._name_temp_files)
            self._removals = BatchPipeline(reactor, threadpool, lambda batch: self._apply_removals(batch))
        #: queue id -> Deferred that fires when the last change submitted for it is applied
        self._changes: dict[str, defer.Deferred] = {}
        self._temp_counter = 0
        # names in free/ ready for reuse (deque: taken and given back by pipeline
        # threads); with a disk worker, its child's spool keeps the list
        self._free: deque[str] = deque()
        # names retired into free/ whose removal from queue/ is not durable yet
        # (no queue/ barrier since): reusable only after the next one
        self._retired: list[str] = []
        self._retired_lock = threading.Lock()
        self._free_serial = itertools.count(1)
        # envelope replacements: update batches and DeliveryRecord's, one at a time
        self._envelopes_replacing = threading.Lock()
        self._record_serial = itertools.count(1)
        if worker is None:
            self._take_stock_of_free_files()
        # bodies committed from memory, kept for their first delivery (oldest first)
        self._bodies: dict[str, bytearray] = {}
        self._bodies_bytes = 0

    # -- paths -------------------------------------------------------------

    def body_path(self, queue_id: str) -> str:
        """The committed message's file: its body (``envelope.size`` bytes), then its envelope."""
        return os.path.join(self.queue_dir, queue_id + BODY_SUFFIX)

    def envelope_path(self, queue_id: str) -> str:
        """Where an update puts the message's envelope (it then wins over the embedded one)."""
        return os.path.join(self.queue_dir, queue_id + ENVELOPE_SUFFIX)

    # -- receiving -----------------------------------------------------------

    def new_message(self) -> SpoolWriter:
        """Allocate a queue id for a message being received.

        The id generator is unique within the process, so this makes no
        file-system call while the body fits in memory; the commit creates
        the body file with ``O_EXCL`` and refuses an id already in the queue,
        should the impossible happen.  With ``memory_limit`` 0 the temp body
        file is created here (SpoolError if it cannot be).
        """
        if self.memory_limit > 0:
            queue_id = new_queue_id()
            return SpoolWriter(self, queue_id, os.path.join(self.tmp_dir, queue_id + BODY_SUFFIX),
                               self.memory_limit)
        for _ in range(100):
            queue_id = new_queue_id()
            if os.path.exists(self.body_path(queue_id)):
                continue
            writer = SpoolWriter(self, queue_id, os.path.join(self.tmp_dir, queue_id + BODY_SUFFIX), 0)
            try:
                writer._spill()
            except FileExistsError:
                continue
            except OSError as e:
                raise SpoolError(f"cannot create spool file {writer.path}: {e.strerror}") from e
            return writer
        raise SpoolError(f"spool {self.directory}: could not allocate a unique queue id")

    def _commit(self, queue_id: str, body_tmp: str, body_file: BinaryIO | None,
                body_memory: bytearray | None, envelope: Envelope,
                body_drop: list[tuple[int, int]] | None = None) -> defer.Deferred:
        """SpoolWriter.commit's request: make the body and ``envelope`` durable.

        ``body_drop``: byte ranges of the spilled body file to cut first
        (it is then ``envelope.size`` bytes long).
        """
        done = self._submit(_Commit(queue_id, body_tmp, body_file, body_memory,
                                    _encode_envelope(envelope), list(body_drop or ())))
        if body_memory is not None and len(body_memory) <= BODY_CACHE_BYTES // 16:
            def keep(result):
                self._keep_body(queue_id, body_memory)
                return result
            done.addCallback(keep)
        return done

    def _keep_body(self, queue_id: str, body: bytearray) -> None:
        """Hold a just-committed body for its delivery; the oldest go past the budget."""
        self._bodies[queue_id] = body
        self._bodies_bytes += len(body)
        while self._bodies_bytes > BODY_CACHE_BYTES:
            oldest = next(iter(self._bodies))
            self._bodies_bytes -= len(self._bodies.pop(oldest))

    def _forget_body(self, queue_id: str) -> None:
        body = self._bodies.pop(queue_id, None)
        if body is not None:
            self._bodies_bytes -= len(body)

    # -- committed messages --------------------------------------------------

    def message(self, envelope: Envelope) -> SpooledMessage:
        return SpooledMessage(envelope, self.body_path(envelope.queue_id),
                              self._bodies.get(envelope.queue_id))

    def update(self, envelope: Envelope) -> defer.Deferred:
        """Durably replace the stored envelope with ``envelope`` (serialised now)."""
        return self._submit(_Update(envelope.queue_id, _encode_envelope(envelope)))

    def remove(self, queue_id: str, size: int | None = None) -> defer.Deferred:
        """Remove a delivered message: its file, then its updated envelope (recycled, see above).

        No durability barrier: should a crash undo the removal, the message
        is delivered again (at least once).  The Deferred fires when both
        files are unlinked.
        """
        self._forget_body(queue_id)
        return self._submit(_Remove(queue_id, size))

    def is_queued(self, queue_id: str) -> bool:
        """Is the committed message's file still in ``queue/``? (One ``stat``.)

        False for a message that an administrator removed behind the
        server's back (``rm queue/ID.msg``); its leftover ``ID.env``, if any,
        does not count: without the message file it is what recover() deletes.
        """
        return os.path.exists(self.body_path(queue_id))

    def delivery_record(self, envelope: Envelope, indices: tuple[int, ...],
                        finishes: bool) -> DeliveryRecord | None:
        """What to record of the delivery to ``indices`` in its batch (see the class).

        None while a change of that message is on its way to disk: changes
        of one message are applied in order, and the record would overtake it.
        """
        if envelope.queue_id in self._changes:
            return None
        if self._worker is not None:
            return DeliveryRecord(self.directory, self.sync, envelope.queue_id, envelope.size,
                                  indices, finishes, in_worker=True)
        return DeliveryRecord(self.directory, self.sync, envelope.queue_id, envelope.size,
                              indices, finishes, spool=self)

    def removed_on_delivery(self, queue_id: str) -> None:
        """A :class:`DeliveryRecord` removed ``queue_id``: forget what is kept of it here."""
        self._forget_body(queue_id)

    def queue_ids(self) -> list[str]:
        """Ids of the committed messages, oldest first."""
        try:
            names = os.listdir(self.queue_dir)
        except FileNotFoundError:
            return []
        return sorted(name[:-len(BODY_SUFFIX)] for name in names
                      if name.endswith(BODY_SUFFIX) and is_queue_id(name[:-len(BODY_SUFFIX)]))

    def load(self, queue_id: str) -> Envelope:
        """Read one committed message's envelope (raises OSError or ValueError).

        The updated one (``queue/<ID>.env``) if there is one, else the one
        inside the message file.
        """
        return load_queue_file(self.queue_dir, queue_id)[0]

    # -- start-up --------------------------------------------------------------

    def recover(self) -> list[Envelope]:
        """Clean up after a crash and return every committed envelope, oldest first.

        Runs at start-up, before anything else uses the spool, on the calling
        thread.  Temp files are uncommitted and deleted; an updated envelope
        in ``queue/`` without its message file is what a crash left of a
        removal, and deleted too.  A committed message whose envelope cannot
        be read or whose body is not the size its envelope says is logged
        and moved (with its updated envelope) to ``corrupt/``.
        """
        committed = set(self.queue_ids())
        for name in os.listdir(self.tmp_dir):
            path = os.path.join(self.tmp_dir, name)
            try:
                os.unlink(path)
            except IsADirectoryError:
                log.warn("spool: ignoring unexpected directory {path}", path=path)
            except FileNotFoundError:
                pass
            else:
                log.info("spool: removed uncommitted temp file {path}", path=path)
        for name in os.listdir(self.queue_dir):
            stem, _, suffix = name.rpartition(".")
            if "." + suffix == ENVELOPE_SUFFIX and is_queue_id(stem) and stem not in committed:
                os.unlink(os.path.join(self.queue_dir, name))
                log.info("{queue_id}: removed the envelope of a removed message", queue_id=stem)
            elif not (is_queue_id(stem) and "." + suffix in (BODY_SUFFIX, ENVELOPE_SUFFIX)):
                log.warn("spool: ignoring unexpected file {path}",
                         path=os.path.join(self.queue_dir, name))
        envelopes = []
        for queue_id in sorted(committed):
            problem = self._check_committed(queue_id)
            if isinstance(problem, Envelope):
                envelopes.append(problem)
            else:
                self._quarantine(queue_id, problem)
        _fsync_directory(self.queue_dir)
        return envelopes

    def _check_committed(self, queue_id: str) -> Envelope | str:
        path = self.body_path(queue_id)
        try:
            envelope, size = load_queue_file(self.queue_dir, queue_id)
        except OSError as e:
            return f"{e.filename or path}: {e.strerror}"
        except (ValueError, TypeError, KeyError) as e:
            return f"unreadable envelope in {path}: {e}"
        if size != envelope.size:
            return f"{path} holds a body of {size} bytes, the envelope says {envelope.size}"
        return envelope

    def _quarantine(self, queue_id: str, problem: str) -> None:
        log.error("{queue_id}: corrupt spool entry, moved to {corrupt}: {problem}",
                  queue_id=queue_id, corrupt=self.corrupt_dir, problem=problem)
        for path in (self.body_path(queue_id), self.envelope_path(queue_id)):
            if not os.path.exists(path):
                continue
            target = os.path.join(self.corrupt_dir, os.path.basename(path))
            n = 0
            while os.path.exists(target):
                n += 1
                target = os.path.join(self.corrupt_dir, f"{os.path.basename(path)}.{n}")
            try:
                os.rename(path, target)
            except OSError as e:
                log.error("{queue_id}: cannot move {path} to {target}: {error}",
                          queue_id=queue_id, path=path, target=target, error=e.strerror)

    # -- recycled files --------------------------------------------------------------

    def _take_stock_of_free_files(self) -> None:
        """Fill the free list from free/ (start-up); names continue after the highest.

        A name in free/ that is also a file in queue/ (a crash between an
        update's link and its replace, or a rename that a crash left half
        done) or that has another link is only unlinked: reusing it would
        overwrite a committed message.  queue/ is synced first: a removal
        the previous process made (or a child that died) may not be durable
        yet, and its file must not be reused until it is.
        """
        _fsync_directory(self.queue_dir)
        with os.scandir(self.queue_dir) as entries:
            queued = {entry.inode() for entry in entries}
        highest = 0
        with os.scandir(self.free_dir) as entries:
            for entry in entries:
                name = entry.name
                try:
                    usable = (name.isdigit() and entry.is_file(follow_symlinks=False)
                              and entry.inode() not in queued
                              and entry.stat(follow_symlinks=False).st_nlink == 1)
                except OSError:
                    usable = False
                if usable:
                    highest = max(highest, int(name))
                if not usable or len(self._free) >= FREE_FILES_KEPT:
                    _unlink_quietly(entry.path)
                    continue
                self._free.append(name)
        self._free_serial = itertools.count(highest + 1)

    @property
    def free_files(self) -> int:
        """How many recycled files wait in free/ for reuse."""
        return len(self._free) + len(self._retired)

    def _new_file(self, path: str) -> tuple[int, bool]:
        """A file to write at ``path`` (in tmp/): (descriptor, recycled?).

        A recycled file still holds old bytes: write from the start, then
        truncate to what was written (:meth:`_write_fd` does).  Without one
        to reuse the file is created (``O_EXCL``).
        """
        while True:
            try:
                name = self._free.pop()
            except IndexError:
                if not self._retired:
                    return open_exclusive(path), False
                self._release_retired(lambda: _fsync_directory(self.queue_dir))
                continue
            try:
                os.rename(os.path.join(self.free_dir, name), path)
            except FileNotFoundError:
                continue                       # removed behind our back: take the next
            return os.open(path, os.O_WRONLY | os.O_CLOEXEC), True

    def _retire(self, path: str, keep: bool) -> None:
        """Take ``path`` out of queue/: into free/ when ``keep`` and there is room, else unlink."""
        if keep and self.free_files < FREE_FILES_KEPT:
            name = str(next(self._free_serial))
            os.rename(path, os.path.join(self.free_dir, name))
            with self._retired_lock:
                self._retired.append(name)
        else:
            os.unlink(path)

    def _keep_old_envelope(self, queue_id: str) -> str | None:
        """Before an update replaces queue/<ID>.env: link the old file into free/.

        The link keeps its inode for reuse; the name in queue/ stays until
        the atomic replace, so the message is never without an envelope.
        Returns the name in free/, which the caller puts on the free list
        only once the replace is durable (until then the file is still the
        message's envelope), or None.
        """
        if self.free_files >= FREE_FILES_KEPT:
            return None
        name = str(next(self._free_serial))
        try:
            os.link(self.envelope_path(queue_id), os.path.join(self.free_dir, name))
        except OSError:
            return None                        # no hard links here: the replace frees it
        return name

    # -- the pipelines -------------------------------------------------------------

    def _submit(self, request: _Request) -> defer.Deferred:
        """Hand a request to its pipeline, after the earlier changes of its message."""
        pipeline = (self._commits if isinstance(request, _Commit)
                    else self._updates if isinstance(request, _Update) else self._removals)
        queue_id = request.queue_id
        earlier = self._changes.get(queue_id)
        settled = defer.Deferred()
        self._changes[queue_id] = settled

        def applied(outcome):
            if self._changes.get(queue_id) is settled:
                del self._changes[queue_id]
            settled.callback(None)
            return outcome
        request.done.addBoth(applied)
        if earlier is None:
            pipeline.submit(request)
        else:
            def start(_) -> None:
                pipeline.submit(request)
            earlier.addCallback(start)
        return request.done

    # -- in the disk worker's process ---------------------------------------------

    def _in_worker(self, kind: str, batch: list[_Request]) -> defer.Deferred:
        """Apply a batch in the disk worker's child; fires with the failures by id(request)."""
        from pymta.spool.diskworker import apply_spool_batch
        try:
            records = records_of_requests(kind, batch)
        except OSError as e:                   # closing a spilled body file failed
            d = defer.fail(SpoolError(f"spool {kind}: {e}"))
        else:
            d = self._worker.call(apply_spool_batch, self.directory, self.sync, kind, records)

        def mapped(errors: dict[int, str]) -> dict[int, Failure]:
            return {id(batch[n]): Failure(SpoolError(text)) for n, text in errors.items()}

        def failed(failure: Failure) -> Failure:
            # Not known to be durable (the child may have died half-way): the
            # senders of new messages are told 4xx, so those must not stay.
            # (Rare: this runs on the reactor thread.)
            for request in batch:
                if kind == "commits":
                    _unlink_quietly(self.body_path(request.queue_id))
                    _unlink_quietly(request.body_tmp)
                if kind == "updates":
                    _unlink_quietly(request.envelope_tmp)
            return failure
        return d.addCallbacks(mapped, failed)

    def apply_batch(self, kind: str, batch: list[_Request]) -> dict[int, Failure]:
        """Apply one pipeline batch on the calling thread (the disk worker's entry)."""
        if kind == "commits":
            return self._flush(batch)
        if kind == "updates":
            return self._flush_updates(batch)
        if kind == "removals":
            return self._apply_removals(batch)
        raise ValueError(f"unknown spool batch kind {kind!r}")

    def _name_temp_files(self, batch: list[_Update]) -> None:
        for request in batch:
            self._temp_counter += 1
            request.envelope_tmp = os.path.join(
                self.tmp_dir, f"{request.queue_id}.{self._temp_counter}{ENVELOPE_SUFFIX}")

    def _write_each(self, batch: list[_Request], write: Callable[[_Request, bool], None],
                    errors: dict[int, Failure], fsync: bool) -> None:
        """``write(request, fsync)`` for every request; several at once when fsyncing.

        Concurrent fsyncs let the file system merge them into one journal
        commit.  A SpoolError from ``write`` fails that request only.
        """
        def write_all(requests: list[_Request]) -> None:
            for request in requests:
                try:
                    write(request, fsync)
                except SpoolError as e:
                    errors[id(request)] = Failure(e)

        lanes = min(PARALLEL_FSYNCS, len(batch)) if fsync else 1
        if lanes <= 1:
            write_all(batch)
            return
        with self._fsync_workers_made:       # commits and updates may get here at once
            if self._fsync_workers is None:
                self._fsync_workers = ThreadPoolExecutor(PARALLEL_FSYNCS - 1,
                                                         thread_name_prefix="pymta.spool.fsync")
        others = [self._fsync_workers.submit(write_all, batch[lane::lanes])
                  for lane in range(1, lanes)]
        try:
            write_all(batch[0::lanes])
        finally:
            problems = [future.exception() for future in others]   # waits for every lane
        for problem in problems:
            if problem is not None:
                raise problem

    @staticmethod
    def _failed(request: _Request, error: BaseException, doing: str) -> SpoolError:
        spool_error = SpoolError(f"{request.queue_id}: {doing}: {error}")
        spool_error.__cause__ = error
        return spool_error

    def _write_commit(self, request: _Commit, fsync: bool) -> None:
        """The data of one commit: the message file, body then envelope and trailer."""
        tail = (request.envelope_data, _trailer(request.envelope_data))
        try:
            if request.body_memory is not None:
                fd, recycled = self._new_file(request.body_tmp)
                request.body_written = True
                request.recycled = recycled
                self._write_fd(fd, (request.body_memory, *tail), fsync, recycled)
            else:
                request.body_written = True
                if request.reopen:
                    request.body_file = open(request.body_tmp, "r+b")
                if request.body_drop:
                    cut_ranges(request.body_tmp, request.body_file, request.body_drop)
                request.body_file.seek(0, os.SEEK_END)
                for part in tail:
                    request.body_file.write(part)
                request.body_file.flush()
                if fsync:
                    os.fsync(request.body_file.fileno())
                request.body_file.close()
        except OSError as e:
            raise self._failed(request, e, f"writing {request.body_tmp}")

    def _write_envelope(self, request: _Update, fsync: bool) -> None:
        try:
            fd, recycled = self._new_file(request.envelope_tmp)
            self._write_fd(fd, (request.envelope_data,), fsync, recycled)
        except OSError as e:
            raise self._failed(request, e, f"writing {request.envelope_tmp}")

    @staticmethod
    def _write_fd(fd: int, parts: tuple[bytes | bytearray, ...], fsync: bool,
                  recycled: bool = False) -> None:
        """Write ``parts`` one after the other to ``fd``, fsync it if asked, close it.

        ``recycled``: the file held other bytes; cut it to what was written.
        """
        try:
            views = [memoryview(part) for part in parts if len(part)]
            total = sum(len(view) for view in views)
            while views:
                written = os.writev(fd, views)
                while views and written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                if views and written:
                    views[0] = views[0][written:]
            if recycled:
                os.ftruncate(fd, total)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _flush(self, batch: list[_Commit]) -> dict[int, Failure]:
        """Commit one batch durably (runs in a pool thread).

        Returns the failures of single requests by ``id(request)``; raising
        fails the whole batch.
        """
        errors: dict[int, Failure] = {}
        fsync = self.sync == "fsync"
        # 1. the data: body files and envelope temps
        self._write_each(batch, self._write_commit, errors, fsync)
        if not fsync and any(r.recycled for r in batch if id(r) not in errors):
            # Overwritten blocks are not ordered before a later rename (not
            # even by a journal): a recycled file must be on disk with its
            # new bytes before its name appears in queue/.
            self._call_syncfs()
        # 2. the names, in request order
        for request in batch:
            if id(request) in errors:
                continue
            try:
                if (os.path.lexists(self.body_path(request.queue_id))
                        or os.path.lexists(self.envelope_path(request.queue_id))):
                    raise FileExistsError(f"queue id {request.queue_id} is already in the spool")
                os.rename(request.body_tmp, self.body_path(request.queue_id))
            except OSError as e:
                errors[id(request)] = Failure(self._failed(request, e, "updating the queue directory"))
        # clean up what failed requests left behind
        for request in batch:
            if id(request) in errors:
                if request.body_file is not None:
                    try:
                        request.body_file.close()
                    except OSError:
                        pass
                if request.body_written:
                    _unlink_quietly(request.body_tmp)
        # 3. one barrier for the whole batch
        try:
            self._barrier(fsync)
        except OSError:
            # nothing in this batch is known to be durable: take back the
            # new messages, whose senders are about to be told 4xx
            for request in batch:
                if id(request) not in errors:
                    _unlink_quietly(self.body_path(request.queue_id))
            raise
        return errors

    def _flush_updates(self, batch: list[_Update]) -> dict[int, Failure]:
        """Replace the envelopes of one batch durably (runs in a pool thread)."""
        with self._envelopes_replacing:
            return self._replace_envelopes(batch)

    def _record_delivered(self, queue_id: str, delivered: list[tuple[int, str]]) -> None:
        """Mark recipients delivered in the stored envelope, durably (DeliveryRecord).

        ``delivered``: (index into the recipients, result summary).  Read,
        changed and replaced while no update batch runs, so that the
        envelope another update wrote meanwhile is kept.  Problems are only
        logged: the scheduler's own update follows.  A message no longer
        in the spool is left to the scheduler, which reports it (removed
        behind the server's back) once.
        """
        with self._envelopes_replacing:
            try:
                envelope = load_queue_file(self.queue_dir, queue_id)[0]
            except FileNotFoundError:
                return
            except (OSError, ValueError) as e:
                log.warn("{queue_id}: cannot record its deliveries in the spool: {error}",
                         queue_id=queue_id, error=e)
                return
            now = time.time()
            for index, summary in delivered:
                recipient = envelope.recipients[index]
                if recipient.state == PENDING:
                    recipient.state, recipient.finished_at = DELIVERED, now
                    recipient.attempts += 1
                    recipient.last_result = summary
            request = _Update(queue_id, _encode_envelope(envelope), envelope_tmp=os.path.join(
                self.tmp_dir, f"{queue_id}.d{next(self._record_serial)}{ENVELOPE_SUFFIX}"))
            try:
                errors = self._replace_envelopes([request])
            except OSError as e:
                errors = {id(request): Failure(e)}
            for failure in errors.values():
                log.warn("{queue_id}: cannot record its deliveries in the spool: {error}",
                         queue_id=queue_id, error=failure.getErrorMessage())

    def _replace_envelopes(self, batch: list[_Update]) -> dict[int, Failure]:
        errors: dict[int, Failure] = {}
        fsync = self.sync == "fsync"
        try:
            self._write_each(batch, self._write_envelope, errors, fsync)
            if not fsync and len(errors) < len(batch):
                self._call_syncfs()  # replaced envelopes must never be half written
        except BaseException:
            for request in batch:
                _unlink_quietly(request.envelope_tmp)
            raise
        kept: list[str] = []
        for request in batch:
            if id(request) in errors:
                _unlink_quietly(request.envelope_tmp)
                continue
            old = None
            try:
                if not os.path.exists(self.body_path(request.queue_id)):
                    raise FileNotFoundError(f"message {request.queue_id} is not in the spool")
                old = self._keep_old_envelope(request.queue_id)
                os.replace(request.envelope_tmp, self.envelope_path(request.queue_id))
            except OSError as e:
                errors[id(request)] = Failure(self._failed(request, e, "updating the queue directory"))
                _unlink_quietly(request.envelope_tmp)
                if old is not None:                    # still the message's envelope
                    _unlink_quietly(os.path.join(self.free_dir, old))
                continue
            if old is not None:
                kept.append(old)
        self._barrier(fsync)
        self._free.extend(kept)                        # replaced durably: reusable now
        return errors

    def _apply_removals(self, batch: list[_Remove]) -> dict[int, Failure]:
        """Retire each message's file, then its updated envelope; no barrier (runs in a pool thread).

        The message file goes first: a crash between the two leaves an
        envelope without its message, which recover() deletes, rather than
        the message with its envelope as first committed, which would be
        delivered again to every recipient.
        """
        errors: dict[int, Failure] = {}
        for request in batch:
            for path in (self.body_path(request.queue_id), self.envelope_path(request.queue_id)):
                try:
                    if path.endswith(ENVELOPE_SUFFIX):
                        small = True
                    else:
                        size = request.size if request.size is not None else os.stat(path).st_size
                        small = size <= RECYCLE_MAX_BYTES
                    self._retire(path, keep=small)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    errors[id(request)] = Failure(self._failed(request, e, f"removing {path}"))
                    break
        return errors

    def _barrier(self, fsync: bool) -> None:
        self._release_retired(lambda: _fsync_directory(self.queue_dir) if fsync else self._call_syncfs())

    def _release_retired(self, barrier: Callable[[], None]) -> None:
        """Run ``barrier`` (a sync of queue/); then the files retired before it are reusable.

        Removals have no barrier of their own: until queue/ is synced after
        a file was renamed out of it, a crash can bring the old name back,
        and it must not then name a file that holds another message.
        """
        with self._retired_lock:
            covered, self._retired = self._retired, []
        try:
            barrier()
        except BaseException:
            with self._retired_lock:
                self._retired[:0] = covered
            raise
        self._free.extend(covered)

    def _call_syncfs(self) -> None:
        fd = os.open(self.queue_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if self._syncfs(fd) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"syncfs: {os.strerror(errno)}", self.directory)
        finally:
            os.close(fd)
