"""The spool's file side: :class:`QueueDirectory` applies changes to ``queue/``.

It runs where the file work runs: in the child process of the server's disk
worker (:func:`pymta.spool.worker_calls.apply_spool_batch` is the call the reactor side sends there),
or in the spool's own threads (``threads`` mode, and tests).  Plain file
calls on the calling thread: no reactor, no Deferreds.  The format of the
files is :mod:`pymta.spool.queuefile`; the reactor side, which batches the
requests and keeps their order, is :class:`pymta.spool.store.Spool`.

Changes come in batches of one kind:

* **commits** (group commit), ``sync="fsync"``: write and fsync every
  message's temp file (several at once, so that the file system can merge
  them into one journal commit), rename them into ``queue/``, then one fsync
  of ``queue/``.  ``sync="syncfs"``: write everything, rename, then one
  ``syncfs(2)`` for the whole file system.  A commit alone in its batch (a
  lone session) is written to a new file, renamed, and then the file and
  ``queue/`` are synced together: one journal commit rather than two, which
  is most of the time a lone session waits for its 250
  (:meth:`QueueDirectory._commit_lone`).
* **updates** (replaced envelopes): write (and fsync) the new envelopes,
  replace the old ones, then one fsync of ``queue/``; with ``syncfs``, one
  ``syncfs`` before the renames too, so that a crash cannot leave a
  committed message with a half-written envelope.
* **removals**: unlink the message file, then the updated envelope if there
  is one, without any barrier.  A crash before the unlinks reach the disk
  brings the message back at the next start, and it is delivered again: at
  least once is the contract.  A message whose delivery finishes it leaves
  the spool without a removal request: the local backend removes it in the
  batch that delivered it, right after the mailbox sync
  (:class:`pymta.spool.worker_calls.DeliveryRecord`; a delivery that does not finish the message
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

Only one QueueDirectory per spool directory may hand out its free files:
the server's Spool owns one in ``threads`` mode; with a disk worker the
child makes its own on first use (:func:`pymta.spool.worker_calls.worker_directory`).
"""

from __future__ import annotations

import ctypes
import itertools
import os
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

from twisted.logger import Logger

from pymta.envelope import DELIVERED, PENDING
from pymta.filesync import SYNC_MODES
from pymta.filesync import fsync_directory as _fsync_directory
from pymta.libc import load_syncfs as _load_syncfs
from pymta.spool.queuefile import (BODY_SUFFIX, CORRUPT_DIR, ENVELOPE_SUFFIX, FREE_DIR, QUEUE_DIR,
                                   TMP_DIR, SpoolError, cut_ranges, encode_envelope, load_queue_file,
                                   open_exclusive, trailer, unlink_quietly)

# the namespace the spool's log lines had before the file side had its own module
log = Logger(namespace="pymta.spool.store")

#: files written and fsynced at once within one flush (fsync mode).  Measured
#: with 20 sessions on 2 cores and a virtio disk: 2 lanes beat 1 (the disk
#: merges concurrent flushes) and 4 or 8 (the lanes' threads then wait on
#: each other for the interpreter lock and the file system's locks).
PARALLEL_FSYNCS = 2
#: at most this many files of removed messages are kept in free/ for reuse
FREE_FILES_KEPT = 1024
#: larger files are deleted rather than kept for reuse
RECYCLE_MAX_BYTES = 256 * 1024


def prepare_directory(directory: str, sync: str) -> tuple[str, Callable[[int], int] | None]:
    """Create the spool's directories; (the sync mode to use, syncfs or None).

    ``syncfs`` falls back to ``fsync`` (with a warning) where the system has none.
    """
    if sync not in SYNC_MODES:
        raise ValueError(f"spool sync mode must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
    for path in [directory] + [os.path.join(directory, name)
                               for name in (TMP_DIR, QUEUE_DIR, CORRUPT_DIR, FREE_DIR)]:
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
        except OSError as e:
            raise SpoolError(f"cannot create spool directory {path}: {e.strerror}") from e
    syncfs = _load_syncfs() if sync == "syncfs" else None
    if sync == "syncfs" and syncfs is None:
        log.warn("spool {directory}: syncfs(2) is not available here; using fsync",
                 directory=directory)
        sync = "fsync"
    return sync, syncfs


# -- the requests, as the file side gets them (picklable: they travel to the worker) ------

@dataclass
class Commit:
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
    #: does body_tmp hold this request's body (so that a failure must remove it)?
    body_written: bool = False
    #: the spilled body is in body_tmp, closed (sent to the disk worker): open it again
    reopen: bool = False
    #: body_tmp is a recycled file, overwritten in place
    recycled: bool = False


@dataclass
class Update:
    queue_id: str
    envelope_data: bytes
    envelope_tmp: str = ""


@dataclass
class Remove:
    queue_id: str
    #: the body's size if the caller knows it (else the removal looks)
    size: int | None = None


Change = Any  # Commit | Update | Remove


class QueueDirectory:
    """The files of one spool directory, changed in batches; see the module docstring."""

    #: a commit alone in its batch takes a new file and one sync (see _commit_lone);
    #: False: it takes a recycled file like a batch (the recycling tests)
    lone_commits_fresh = True

    def __init__(self, directory: str, sync: str = "fsync") -> None:
        self.directory = os.path.abspath(directory)
        self.tmp_dir = os.path.join(self.directory, TMP_DIR)
        self.queue_dir = os.path.join(self.directory, QUEUE_DIR)
        self.corrupt_dir = os.path.join(self.directory, CORRUPT_DIR)
        self.free_dir = os.path.join(self.directory, FREE_DIR)
        self.sync, self._syncfs = prepare_directory(self.directory, sync)
        self._fsync_workers: ThreadPoolExecutor | None = None
        self._fsync_workers_made = threading.Lock()
        # names in free/ ready for reuse (deque: taken and given back by several threads)
        self._free: deque[str] = deque()
        # names retired into free/ whose removal from queue/ is not durable yet
        # (no queue/ barrier since): reusable only after the next one
        self._retired: list[str] = []
        self._retired_lock = threading.Lock()
        self._free_serial = itertools.count(1)
        # envelope replacements: update batches and DeliveryRecord's, one at a time
        self._envelopes_replacing = threading.Lock()
        self._record_serial = itertools.count(1)
        self._take_stock_of_free_files()

    def body_path(self, queue_id: str) -> str:
        return os.path.join(self.queue_dir, queue_id + BODY_SUFFIX)

    def envelope_path(self, queue_id: str) -> str:
        return os.path.join(self.queue_dir, queue_id + ENVELOPE_SUFFIX)

    def apply(self, kind: str, batch: list[Change]) -> dict[int, Exception]:
        """Apply one batch of ``kind`` ("commits", "updates", "removals") on the calling thread.

        Returns the errors of single requests by ``id(request)``; raising
        fails the whole batch.
        """
        if kind == "commits":
            return self.commit(batch)
        if kind == "updates":
            return self.update(batch)
        if kind == "removals":
            return self.remove(batch)
        raise ValueError(f"unknown spool batch kind {kind!r}")

    def _write_each(self, batch: list[Change], write: Callable[[Change, bool], None],
                    errors: dict[int, Exception], fsync: bool) -> None:
        """``write(request, fsync)`` for every request; several at once when fsyncing.

        Concurrent fsyncs let the file system merge them into one journal
        commit.  A SpoolError from ``write`` fails that request only.
        """
        def write_all(requests: list[Change]) -> None:
            for request in requests:
                try:
                    write(request, fsync)
                except SpoolError as e:
                    errors[id(request)] = e

        lanes = min(PARALLEL_FSYNCS, len(batch)) if fsync else 1
        if lanes <= 1:
            write_all(batch)
            return
        others = [self._sync_pool().submit(write_all, batch[lane::lanes]) for lane in range(1, lanes)]
        try:
            write_all(batch[0::lanes])
        finally:
            problems = [future.exception() for future in others]   # waits for every lane
        for problem in problems:
            if problem is not None:
                raise problem

    def _sync_pool(self) -> ThreadPoolExecutor:
        """The threads that sync beside the calling one (made on first use)."""
        with self._fsync_workers_made:       # commits and updates may get here at once
            if self._fsync_workers is None:
                self._fsync_workers = ThreadPoolExecutor(PARALLEL_FSYNCS - 1,
                                                         thread_name_prefix="pymta.spool.fsync")
        return self._fsync_workers

    @staticmethod
    def _failed(request: Change, error: BaseException, doing: str) -> SpoolError:
        spool_error = SpoolError(f"{request.queue_id}: {doing}: {error}")
        spool_error.__cause__ = error
        return spool_error

    def _write_commit(self, request: Commit, fsync: bool, recycle: bool = True) -> None:
        """The data of one commit: the message file, body then envelope and trailer."""
        tail = (request.envelope_data, trailer(request.envelope_data))
        try:
            if request.body_memory is not None:
                fd, recycled = self._new_file(request.body_tmp, recycle)
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

    def _write_envelope(self, request: Update, fsync: bool) -> None:
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

    def commit(self, batch: list[Commit]) -> dict[int, Exception]:
        """Commit one batch durably.

        Returns the failures of single requests by ``id(request)``; raising
        fails the whole batch.
        """
        if len(batch) == 1 and self.lone_commits_fresh:
            return self._commit_lone(batch[0])
        errors: dict[int, Exception] = {}
        fsync = self.sync == "fsync"
        # 1. the data: body files and envelope temps
        self._write_each(batch, self._write_commit, errors, fsync)
        if not fsync and any(r.recycled for r in batch if id(r) not in errors):
            # Overwritten blocks are not ordered before a later rename (not
            # even by a journal): a recycled file must be on disk with its
            # new bytes before its name appears in queue/.
            self._call_syncfs()
        # 2. the names, in request order
        self._name_in_queue(batch, errors)
        # 3. one barrier for the whole batch
        try:
            self._barrier(fsync)
        except OSError:
            # nothing in this batch is known to be durable: take back the
            # new messages, whose senders are about to be told 4xx
            for request in batch:
                if id(request) not in errors:
                    unlink_quietly(self.body_path(request.queue_id))
            raise
        return errors

    def _commit_lone(self, request: Commit) -> dict[int, Exception]:
        """A commit alone in its batch (a lone session): one journal commit instead of two.

        A new file (never a recycled one) is written and named in queue/;
        then the file and queue/ are fsynced at the same time, so that the
        file system makes both durable in one journal commit (``syncfs``:
        one syncfs).  Until then a crash of the machine can leave the name
        with a short or empty file: recovery finds no valid trailer and
        moves it to corrupt/ (it was never answered 250).  A kill of the
        server cannot: the file is whole before it is renamed.  A recycled
        file could show a removed message's bytes under the new name after
        a crash of the machine: recycled files keep the batch protocol.
        """
        errors: dict[int, Exception] = {}
        self._write_each([request], lambda r, _fsync: self._write_commit(r, False, recycle=False),
                         errors, False)
        self._name_in_queue([request], errors)
        if errors:
            return errors
        path = self.body_path(request.queue_id)
        if self.sync != "fsync":
            barrier = None
        else:
            barrier = self._sync_pool().submit(self._barrier, True)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                errors[id(request)] = self._failed(request, e, f"syncing {path}")
        try:
            if barrier is None:
                self._barrier(False)
            else:
                barrier.result()
        except OSError:
            unlink_quietly(path)               # not known to be durable: the sender gets 4xx
            raise
        if errors:
            unlink_quietly(path)
        return errors

    def _name_in_queue(self, batch: list[Commit], errors: dict[int, Exception]) -> None:
        """Rename each written file into queue/, in request order; clean up the failed ones."""
        for request in batch:
            if id(request) in errors:
                continue
            try:
                if (os.path.lexists(self.body_path(request.queue_id))
                        or os.path.lexists(self.envelope_path(request.queue_id))):
                    raise FileExistsError(f"queue id {request.queue_id} is already in the spool")
                os.rename(request.body_tmp, self.body_path(request.queue_id))
            except OSError as e:
                errors[id(request)] = self._failed(request, e, "updating the queue directory")
        for request in batch:
            if id(request) in errors:
                if request.body_file is not None:
                    try:
                        request.body_file.close()
                    except OSError:
                        pass
                if request.body_written:
                    unlink_quietly(request.body_tmp)

    def update(self, batch: list[Update]) -> dict[int, Exception]:
        """Replace the envelopes of one batch durably."""
        with self._envelopes_replacing:
            return self._replace_envelopes(batch)

    def record_delivered(self, queue_id: str, delivered: list[tuple[int, str]]) -> None:
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
            request = Update(queue_id, encode_envelope(envelope), envelope_tmp=os.path.join(
                self.tmp_dir, f"{queue_id}.d{next(self._record_serial)}{ENVELOPE_SUFFIX}"))
            try:
                errors = self._replace_envelopes([request])
            except OSError as e:
                errors = {id(request): e}
            for error in errors.values():
                log.warn("{queue_id}: cannot record its deliveries in the spool: {error}",
                         queue_id=queue_id, error=str(error))

    def _replace_envelopes(self, batch: list[Update]) -> dict[int, Exception]:
        errors: dict[int, Exception] = {}
        fsync = self.sync == "fsync"
        try:
            self._write_each(batch, self._write_envelope, errors, fsync)
            if not fsync and len(errors) < len(batch):
                self._call_syncfs()  # replaced envelopes must never be half written
        except BaseException:
            for request in batch:
                unlink_quietly(request.envelope_tmp)
            raise
        kept: list[str] = []
        for request in batch:
            if id(request) in errors:
                unlink_quietly(request.envelope_tmp)
                continue
            old = None
            try:
                if not os.path.exists(self.body_path(request.queue_id)):
                    raise FileNotFoundError(f"message {request.queue_id} is not in the spool")
                old = self._keep_old_envelope(request.queue_id)
                os.replace(request.envelope_tmp, self.envelope_path(request.queue_id))
            except OSError as e:
                errors[id(request)] = self._failed(request, e, "updating the queue directory")
                unlink_quietly(request.envelope_tmp)
                if old is not None:                    # still the message's envelope
                    unlink_quietly(os.path.join(self.free_dir, old))
                continue
            if old is not None:
                kept.append(old)
        self._barrier(fsync)
        self._free.extend(kept)                        # replaced durably: reusable now
        return errors

    def remove(self, batch: list[Remove]) -> dict[int, Exception]:
        """Retire each message's file, then its updated envelope; no barrier .

        The message file goes first: a crash between the two leaves an
        envelope without its message, which recover() deletes, rather than
        the message with its envelope as first committed, which would be
        delivered again to every recipient.
        """
        errors: dict[int, Exception] = {}
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
                    errors[id(request)] = self._failed(request, e, f"removing {path}")
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
                    unlink_quietly(entry.path)
                    continue
                self._free.append(name)
        self._free_serial = itertools.count(highest + 1)

    @property
    def free_files(self) -> int:
        """How many recycled files wait in free/ for reuse."""
        return len(self._free) + len(self._retired)

    def _new_file(self, path: str, recycle: bool = True) -> tuple[int, bool]:
        """A file to write at ``path`` (in tmp/): (descriptor, recycled?).

        A recycled file still holds old bytes: write from the start, then
        truncate to what was written (:meth:`_write_fd` does).  Without one
        to reuse (or with ``recycle`` false) the file is created (``O_EXCL``).
        """
        if not recycle:
            return open_exclusive(path), False
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
