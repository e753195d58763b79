"""The durable spool: one body file and one envelope file per message.

Layout under the spool directory (all mode 0700)::

    tmp/<ID>.msg          body being received (not committed)
    tmp/<ID>.<n>.env      envelope being written (not committed)
    queue/<ID>.msg        committed body: the bytes as received, once per message
    queue/<ID>.env        committed envelope (JSON, see pymta.envelope)
    corrupt/              committed messages recover() could not load

A message is committed when ``queue/<ID>.env`` exists: the envelope is the
last thing made visible, after the body it names is on disk.  A body without
an envelope is garbage from an interrupted transaction.

Every change to ``queue/`` (commit, envelope update, removal) goes through one
flush pipeline that runs off the reactor thread and batches (group commit):
while one flush runs, new requests wait; when it ends they all go to disk
together in the next flush, and each request's Deferred fires when its batch
is durable.  One flush:

* ``sync="fsync"``: fsync every body and envelope temp file, rename them into
  ``queue/`` (body first), then one fsync of ``queue/``.
* ``sync="syncfs"``: write everything, rename, then one ``syncfs(2)`` for the
  whole file system.  When the batch replaces existing envelopes (updates),
  one more ``syncfs`` runs before the renames, so that a crash cannot leave a
  committed message with a half-written envelope.

Because the pipeline is sequential, requests for one message are applied in
the order they were made.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure

from pymta.envelope import Envelope
from pymta.spool.message import MessageView, SpooledMessage
from pymta.spool.queueid import is_queue_id, new_queue_id

log = Logger()

SYNC_MODES = ("fsync", "syncfs")

TMP_DIR = "tmp"
QUEUE_DIR = "queue"
CORRUPT_DIR = "corrupt"
BODY_SUFFIX = ".msg"
ENVELOPE_SUFFIX = ".env"

#: Python-side buffer of a body file being received
WRITE_BUFFER = 64 * 1024


class SpoolError(Exception):
    """A spool operation could not be carried out (the message names it)."""


def _fsync_directory(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        function = libc.syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def _encode_envelope(envelope: Envelope) -> bytes:
    return json.dumps(envelope.to_json(), ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8") + b"\n"


# -- requests travelling through the flush pipeline ---------------------------

@dataclass
class _Commit:
    queue_id: str
    body_file: BinaryIO
    body_tmp: str
    envelope_data: bytes
    done: defer.Deferred = field(default_factory=defer.Deferred)
    envelope_tmp: str = ""


@dataclass
class _Update:
    queue_id: str
    envelope_data: bytes
    done: defer.Deferred = field(default_factory=defer.Deferred)
    envelope_tmp: str = ""


@dataclass
class _Remove:
    queue_id: str
    done: defer.Deferred = field(default_factory=defer.Deferred)


_Request = Any  # _Commit | _Update | _Remove


class SpoolWriter:
    """A message being received: the body streams into a temp file."""

    def __init__(self, spool: "Spool", queue_id: str, path: str, file: BinaryIO):
        self._spool = spool
        self.queue_id = queue_id
        self.path = path
        self._file: BinaryIO | None = file
        #: body bytes written so far
        self.size = 0
        self._committing = False

    def write(self, data: bytes) -> None:
        """Append a chunk of the body (buffered, on the reactor thread)."""
        if self._file is None or self._committing:
            raise SpoolError(f"{self.queue_id}: write after commit or abort")
        self._file.write(data)
        self.size += len(data)

    def view(self) -> MessageView:
        """The body so far, for data-stage filters (flushes the Python buffer)."""
        if self._file is None:
            raise SpoolError(f"{self.queue_id}: view after commit or abort")
        if not self._committing:
            self._file.flush()
        return MessageView(self.path, self.size)

    def commit(self, envelope: Envelope) -> defer.Deferred:
        """Make body and envelope durable; the Deferred fires (with None) when they are.

        ``envelope.queue_id`` is set to this writer's id if empty (it must
        not name another message) and ``envelope.size`` to the body size.
        The envelope is serialised now: later changes to the object need
        :meth:`Spool.update`.  On failure the Deferred errbacks and the
        message is not in the spool.
        """
        if self._file is None or self._committing:
            raise SpoolError(f"{self.queue_id}: commit after commit or abort")
        if not envelope.queue_id:
            envelope.queue_id = self.queue_id
        elif envelope.queue_id != self.queue_id:
            raise SpoolError(f"envelope names queue id {envelope.queue_id}, "
                             f"but the body was spooled as {self.queue_id}")
        envelope.size = self.size
        request = _Commit(self.queue_id, self._file, self.path, _encode_envelope(envelope))
        self._committing = True
        result = self._spool._submit(request)

        def forget(outcome):
            self._file = None
            return outcome
        return result.addBoth(forget)

    def abort(self) -> None:
        """Discard the body (idempotent; ignored once commit() was called)."""
        if self._file is None or self._committing:
            return
        file, self._file = self._file, None
        try:
            file.close()
        finally:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __repr__(self) -> str:
        return f"<SpoolWriter {self.queue_id} {self.size} bytes>"


class Spool:
    """Durable message store; see the module docstring for layout and ordering."""

    def __init__(self, directory: str, reactor=None, sync: str = "fsync"):
        if sync not in SYNC_MODES:
            raise ValueError(f"spool sync mode must be one of {', '.join(SYNC_MODES)}, not {sync!r}")
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self._reactor = reactor
        self.directory = os.path.abspath(directory)
        self.tmp_dir = os.path.join(self.directory, TMP_DIR)
        self.queue_dir = os.path.join(self.directory, QUEUE_DIR)
        self.corrupt_dir = os.path.join(self.directory, CORRUPT_DIR)
        for path in (self.directory, self.tmp_dir, self.queue_dir, self.corrupt_dir):
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
        self._waiting: list[_Request] = []
        self._flushing = False
        self._temp_counter = 0

    # -- paths -------------------------------------------------------------

    def body_path(self, queue_id: str) -> str:
        return os.path.join(self.queue_dir, queue_id + BODY_SUFFIX)

    def envelope_path(self, queue_id: str) -> str:
        return os.path.join(self.queue_dir, queue_id + ENVELOPE_SUFFIX)

    # -- receiving -----------------------------------------------------------

    def new_message(self) -> SpoolWriter:
        """Allocate a queue id and open its temp body file."""
        for _ in range(100):
            queue_id = new_queue_id()
            if os.path.exists(self.envelope_path(queue_id)):
                continue
            path = os.path.join(self.tmp_dir, queue_id + BODY_SUFFIX)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            except OSError as e:
                raise SpoolError(f"cannot create spool file {path}: {e.strerror}") from e
            return SpoolWriter(self, queue_id, path, os.fdopen(fd, "wb", buffering=WRITE_BUFFER))
        raise SpoolError(f"spool {self.directory}: could not allocate a unique queue id")

    # -- committed messages --------------------------------------------------

    def message(self, envelope: Envelope) -> SpooledMessage:
        return SpooledMessage(envelope, self.body_path(envelope.queue_id))

    def update(self, envelope: Envelope) -> defer.Deferred:
        """Durably replace the stored envelope with ``envelope`` (serialised now)."""
        return self._submit(_Update(envelope.queue_id, _encode_envelope(envelope)))

    def remove(self, queue_id: str) -> defer.Deferred:
        """Durably delete a message: the envelope first, then the body."""
        return self._submit(_Remove(queue_id))

    def queue_ids(self) -> list[str]:
        """Ids of the committed messages, oldest first."""
        try:
            names = os.listdir(self.queue_dir)
        except FileNotFoundError:
            return []
        return sorted(name[:-len(ENVELOPE_SUFFIX)] for name in names
                      if name.endswith(ENVELOPE_SUFFIX) and is_queue_id(name[:-len(ENVELOPE_SUFFIX)]))

    def load(self, queue_id: str) -> Envelope:
        """Read one committed envelope (raises OSError or ValueError)."""
        with open(self.envelope_path(queue_id), "rb") as fp:
            envelope = Envelope.from_json(json.loads(fp.read().decode("utf-8")))
        if envelope.queue_id != queue_id:
            raise ValueError(f"envelope file names queue id {envelope.queue_id!r}")
        return envelope

    # -- start-up --------------------------------------------------------------

    def recover(self) -> list[Envelope]:
        """Clean up after a crash and return every committed envelope, oldest first.

        Runs at start-up, before anything else uses the spool, on the calling
        thread.  Temp files are uncommitted and deleted; a body in ``queue/``
        without an envelope is an interrupted commit and deleted too.  A
        committed envelope that cannot be read, or whose body is missing,
        unreadable or of the wrong size, is logged and moved (with its body)
        to ``corrupt/``.
        """
        committed = set(self.queue_ids())
        # A batch renames a message's body and then its envelope, and one
        # directory fsync makes both durable.  Should a crash persist the
        # envelope's rename but not the body's, the body (fsynced before the
        # renames) is still in tmp/: finish the move.
        for queue_id in committed:
            body = self.body_path(queue_id)
            orphan = os.path.join(self.tmp_dir, queue_id + BODY_SUFFIX)
            if not os.path.exists(body) and os.path.exists(orphan):
                os.rename(orphan, body)
                log.info("{queue_id}: recovered body from the spool's tmp directory", queue_id=queue_id)
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
            if "." + suffix == BODY_SUFFIX and is_queue_id(stem) and stem not in committed:
                os.unlink(os.path.join(self.queue_dir, name))
                log.info("{queue_id}: removed body of an uncommitted message", queue_id=stem)
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
        try:
            envelope = self.load(queue_id)
        except (OSError, ValueError, TypeError, KeyError) as e:
            return f"unreadable envelope {self.envelope_path(queue_id)}: {e}"
        body = self.body_path(queue_id)
        try:
            fd = os.open(body, os.O_RDONLY)
        except OSError as e:
            return f"body {body}: {e.strerror}"
        try:
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size != envelope.size:
            return f"body {body} has {size} bytes, the envelope says {envelope.size}"
        return envelope

    def _quarantine(self, queue_id: str, problem: str) -> None:
        log.error("{queue_id}: corrupt spool entry, moved to {corrupt}: {problem}",
                  queue_id=queue_id, corrupt=self.corrupt_dir, problem=problem)
        for path in (self.envelope_path(queue_id), self.body_path(queue_id)):
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

    # -- the flush pipeline (group commit) -------------------------------------

    def _submit(self, request: _Request) -> defer.Deferred:
        self._waiting.append(request)
        if not self._flushing:
            self._start_flush()
        return request.done

    def _start_flush(self) -> None:
        batch, self._waiting = self._waiting, []
        self._flushing = True
        for request in batch:
            if not isinstance(request, _Remove):
                self._temp_counter += 1
                request.envelope_tmp = os.path.join(
                    self.tmp_dir, f"{request.queue_id}.{self._temp_counter}{ENVELOPE_SUFFIX}")
        d = deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self._flush, batch)
        d.addBoth(self._flushed, batch)

    def _flushed(self, outcome, batch: list[_Request]) -> None:
        self._flushing = False
        if self._waiting:
            self._start_flush()
        for request in batch:
            if isinstance(outcome, Failure):
                error = outcome
            else:
                error = outcome.get(id(request))
            if error is None:
                request.done.callback(None)
            else:
                request.done.errback(error)

    def _flush(self, batch: list[_Request]) -> dict[int, Failure]:
        """Apply one batch durably (runs in a pool thread).

        Returns the failures of single requests by ``id(request)``; raising
        fails the whole batch.
        """
        errors: dict[int, Failure] = {}
        fsync = self.sync == "fsync"

        def failed(request: _Request, error: BaseException, doing: str) -> None:
            spool_error = SpoolError(f"{request.queue_id}: {doing}: {error}")
            spool_error.__cause__ = error
            errors[id(request)] = Failure(spool_error)

        # 1. the data: body files and envelope temps
        for request in batch:
            if isinstance(request, _Commit):
                try:
                    request.body_file.flush()
                    if fsync:
                        os.fsync(request.body_file.fileno())
                    request.body_file.close()
                except OSError as e:
                    failed(request, e, f"writing {request.body_tmp}")
                    continue
            if isinstance(request, (_Commit, _Update)):
                try:
                    self._write_file(request.envelope_tmp, request.envelope_data, fsync)
                except OSError as e:
                    failed(request, e, f"writing {request.envelope_tmp}")
        if not fsync and any(isinstance(r, _Update) and id(r) not in errors for r in batch):
            self._call_syncfs()  # replaced envelopes must never be half written
        # 2. the names, in request order; body before envelope
        for request in batch:
            if id(request) in errors:
                continue
            try:
                if isinstance(request, _Commit):
                    os.rename(request.body_tmp, self.body_path(request.queue_id))
                    os.rename(request.envelope_tmp, self.envelope_path(request.queue_id))
                elif isinstance(request, _Update):
                    if not os.path.exists(self.body_path(request.queue_id)):
                        raise FileNotFoundError(f"message {request.queue_id} is not in the spool")
                    os.replace(request.envelope_tmp, self.envelope_path(request.queue_id))
                else:
                    for path in (self.envelope_path(request.queue_id), self.body_path(request.queue_id)):
                        try:
                            os.unlink(path)
                        except FileNotFoundError:
                            pass
            except OSError as e:
                failed(request, e, "updating the queue directory")
        # clean up what failed requests left behind
        for request in batch:
            if id(request) in errors:
                for path in (getattr(request, "envelope_tmp", None), getattr(request, "body_tmp", None)):
                    if path:
                        try:
                            os.unlink(path)
                        except OSError:
                            pass
                if isinstance(request, _Commit):
                    try:
                        request.body_file.close()
                    except OSError:
                        pass
        # 3. one barrier for the whole batch
        try:
            if fsync:
                _fsync_directory(self.queue_dir)
            else:
                self._call_syncfs()
        except OSError:
            # nothing in this batch is known to be durable: take back the
            # new messages, whose senders are about to be told 4xx
            for request in batch:
                if isinstance(request, _Commit) and id(request) not in errors:
                    for path in (self.envelope_path(request.queue_id), self.body_path(request.queue_id)):
                        try:
                            os.unlink(path)
                        except OSError:
                            pass
            raise
        return errors

    @staticmethod
    def _write_file(path: str, data: bytes, fsync: bool) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)

    def _call_syncfs(self) -> None:
        fd = os.open(self.queue_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if self._syncfs(fd) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"syncfs: {os.strerror(errno)}", self.directory)
        finally:
            os.close(fd)
