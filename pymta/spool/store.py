"""The spool's reactor side: :class:`Spool`, the durable message store the server uses.

A message is received through a :class:`pymta.spool.writer.SpoolWriter`
(:meth:`Spool.new_message`), which holds a small body in memory, so the
reactor thread makes no file-system call for typical mail; a large body
spills into ``tmp/<ID>.msg`` as it arrives.  Once committed, a body held in
memory stays there (``BODY_CACHE_BYTES`` in all, oldest dropped first)
until the message is removed, so that its delivery need not read it back.

The Spool writes no files itself.  Its changes to ``queue/`` (commits,
envelope updates, removals) are requests that go through three batching
pipelines (:class:`pymta.worker.pipeline.BatchPipeline`), so that none waits
behind another; each batch is applied by the file side,
:class:`pymta.spool.disk.QueueDirectory`: in the child process of the
server's disk worker (:func:`pymta.spool.worker_calls.apply_spool_batch`), or in
the spool's own threads (``threads`` mode, and tests).  The on-disk format
is :mod:`pymta.spool.queuefile`.

Requests for one message are applied in the order they were made: an update
or removal waits for the message's earlier commit, update or removal.
"""

from __future__ import annotations

import os
from time import perf_counter
from typing import Any, ClassVar

from twisted.internet import defer
from twisted.python.failure import Failure

from pymta.envelope import Envelope
from pymta.spool.disk import Change, Commit, QueueDirectory, Remove, Update, prepare_directory
from pymta.spool.recovery import recover
from pymta.spool.worker_calls import DeliveryRecord, apply_spool_batch
from pymta.spool.message import SpooledMessage
from pymta.spool.queuefile import (BODY_SUFFIX, CORRUPT_DIR, ENVELOPE_SUFFIX, FREE_DIR, QUEUE_DIR,
                                   TMP_DIR, SpoolError, encode_envelope, load_queue_file, queue_ids,
                                   unlink_quietly)
from pymta.spool.queueid import new_queue_id
from pymta.spool.writer import MEMORY_BODY_LIMIT, SpoolWriter
from pymta.worker.pipeline import BatchPipeline, pipeline_threadpool

#: bodies committed from memory stay there for their delivery, up to this many bytes in all
BODY_CACHE_BYTES = 8 * 1024 * 1024


class _Request:
    """A change on its way through its pipeline, and the Deferred its sender waits on."""

    __slots__ = ("change", "queue_id", "done")
    #: the pipeline and batch kind
    kind: ClassVar[str]

    def __init__(self, change: Change) -> None:
        self.change = change
        self.queue_id = change.queue_id
        #: fires with None when the change was applied, or errbacks
        self.done = defer.Deferred()


class _Commit(_Request):
    __slots__ = ()
    kind = "commits"


class _Update(_Request):
    __slots__ = ()
    kind = "updates"


class _Remove(_Request):
    __slots__ = ()
    kind = "removals"


def _batch_observer(events: Any, kind: str):
    """The pipeline's ``observe`` for the metrics' events sink, or None without one."""
    if events is None:
        return None
    return lambda size, seconds: events.spool_batch(kind, size, seconds)


def _commit_landed(result, events: Any, started: float):
    events.spool_commit(perf_counter() - started)
    return result


class Spool:
    """Durable message store (the reactor side); see the module docstring."""

    def __init__(self, directory: str, reactor=None, sync: str = "fsync",
                 memory_limit: int = MEMORY_BODY_LIMIT, threadpool=None, worker=None,
                 events: Any = None):
        """``memory_limit``: bodies up to this many bytes are held in memory until
        their commit (0: every body streams into its temp file from the
        start).  ``threadpool``: where the pipelines run; by default a pool
        of the spool's own, or the reactor's pool for a reactor that cannot
        run and stop one (a test clock).  ``worker``: a
        :class:`pymta.worker.process.DiskWorker`; the pipelines' file work
        then runs in its child process instead of threads.  ``events``: the
        metrics' events sink, told each batch's size and time and each
        commit's wait; None: nothing is measured.
        """
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
        self.memory_limit = memory_limit
        self._worker = worker
        self._events = events
        observe = {kind: _batch_observer(events, kind) for kind in ("commits", "updates", "removals")}
        #: the file side, when it runs in this process (no disk worker); with
        #: a disk worker its child keeps its own (and the free list)
        self.disk: QueueDirectory | None = None
        if worker is not None:
            self.sync = prepare_directory(self.directory, sync)[0]
            self._commits = BatchPipeline(reactor, None, lambda batch: self._in_worker("commits", batch),
                                          observe=observe["commits"])
            self._updates = BatchPipeline(reactor, None, lambda batch: self._in_worker("updates", batch),
                                          self._name_temp_files, observe["updates"])
            self._removals = BatchPipeline(reactor, None, lambda batch: self._in_worker("removals", batch),
                                           observe=observe["removals"])
        else:
            self.disk = QueueDirectory(self.directory, sync)
            self.sync = self.disk.sync
            if threadpool is None:
                threadpool = pipeline_threadpool(reactor, 3, "pymta.spool")
            self._commits = BatchPipeline(reactor, threadpool, lambda batch: self._here("commits", batch),
                                          observe=observe["commits"])
            self._updates = BatchPipeline(reactor, threadpool, lambda batch: self._here("updates", batch),
                                          self._name_temp_files, observe["updates"])
            self._removals = BatchPipeline(reactor, threadpool, lambda batch: self._here("removals", batch),
                                           observe=observe["removals"])
        self._pipelines = {"commits": self._commits, "updates": self._updates,
                           "removals": self._removals}
        #: queue id -> Deferred that fires when the last change submitted for it is applied
        self._changes: dict[str, defer.Deferred] = {}
        self._temp_counter = 0
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

    @property
    def free_files(self) -> int:
        """How many recycled files wait in free/ for reuse (kept by this process)."""
        return self.disk.free_files if self.disk is not None else 0

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
                writer.spill()
            except FileExistsError:
                continue
            except OSError as e:
                raise SpoolError(f"cannot create spool file {writer.path}: {e.strerror}") from e
            return writer
        raise SpoolError(f"spool {self.directory}: could not allocate a unique queue id")

    def commit(self, request: Commit) -> defer.Deferred:
        """A :class:`SpoolWriter`'s request: make its body and envelope durable.

        The Deferred fires (with None) when they are; on failure it
        errbacks and the message is not in the spool.
        """
        done = self._submit(_Commit(request))
        if self._events is not None:
            done.addCallback(_commit_landed, self._events, perf_counter())
        body_memory = request.body_memory
        if body_memory is not None and len(body_memory) <= BODY_CACHE_BYTES // 16:
            queue_id = request.queue_id

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
        return self._submit(_Update(Update(envelope.queue_id, encode_envelope(envelope))))

    def remove(self, queue_id: str, size: int | None = None) -> defer.Deferred:
        """Remove a delivered message: its file, then its updated envelope.

        Their files are recycled (see :mod:`pymta.spool.disk`).  No durability barrier: should a crash undo the removal, the message
        is delivered again (at least once).  The Deferred fires when both
        files are unlinked.
        """
        self._forget_body(queue_id)
        return self._submit(_Remove(Remove(queue_id, size)))

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
                              indices, finishes, spool=self.disk)

    def removed_on_delivery(self, queue_id: str) -> None:
        """A :class:`DeliveryRecord` removed ``queue_id``: forget what is kept of it here."""
        self._forget_body(queue_id)

    def queue_ids(self) -> list[str]:
        """Ids of the committed messages, oldest first."""
        return queue_ids(self.queue_dir)

    def load(self, queue_id: str) -> Envelope:
        """Read one committed message's envelope (raises OSError or ValueError).

        The updated one (``queue/<ID>.env``) if there is one, else the one
        inside the message file.
        """
        return load_queue_file(self.queue_dir, queue_id)[0]

    # -- start-up --------------------------------------------------------------

    def recover(self) -> list[Envelope]:
        """Clean up after a crash and return every committed envelope, oldest first.

        See :func:`pymta.spool.recovery.recover`: on the calling thread, at
        start-up, before anything else uses the spool.
        """
        return recover(self.directory)

    # -- the pipelines -------------------------------------------------------------

    def _submit(self, request: _Request) -> defer.Deferred:
        """Hand a request to its pipeline, after the earlier changes of its message."""
        pipeline = self._pipelines[request.kind]
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

    def _name_temp_files(self, batch: list[_Request]) -> None:
        for request in batch:
            self._temp_counter += 1
            request.change.envelope_tmp = os.path.join(
                self.tmp_dir, f"{request.queue_id}.{self._temp_counter}{ENVELOPE_SUFFIX}")

    def _here(self, kind: str, batch: list[_Request]) -> dict[int, Failure]:
        """Apply a batch in this process (runs in a pool thread); the failures by id(request)."""
        errors = self.disk.apply(kind, [request.change for request in batch])
        return {id(request): Failure(errors[id(request.change)]) for request in batch
                if id(request.change) in errors}

    def _in_worker(self, kind: str, batch: list[_Request]) -> defer.Deferred:
        """Apply a batch in the disk worker's child; fires with the failures by id(request)."""
        changes = [request.change for request in batch]
        try:
            if kind == "commits":
                for change in changes:
                    if change.body_file is not None:
                        # the child opens the spilled body again by its name
                        change.body_file.close()          # flushes Python's buffer
                        change.body_file, change.reopen = None, True
        except OSError as e:                   # closing a spilled body file failed
            d = defer.fail(SpoolError(f"spool {kind}: {e}"))
        else:
            d = self._worker.call(apply_spool_batch, self.directory, self.sync, kind, changes)

        def mapped(errors: dict[int, str]) -> dict[int, Failure]:
            return {id(batch[n]): Failure(SpoolError(text)) for n, text in errors.items()}

        def failed(failure: Failure) -> Failure:
            # Not known to be durable (the child may have died half-way): the
            # senders of new messages are told 4xx, so those must not stay.
            # (Rare: this runs on the reactor thread.)
            for change in changes:
                if kind == "commits":
                    unlink_quietly(self.body_path(change.queue_id))
                    unlink_quietly(change.body_tmp)
                if kind == "updates":
                    unlink_quietly(change.envelope_tmp)
            return failure
        return d.addCallbacks(mapped, failed)
