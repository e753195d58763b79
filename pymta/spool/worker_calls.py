"""The spool's calls in the disk worker's child, and what a delivery records there.

:func:`apply_spool_batch` is the call the reactor side
(:class:`pymta.spool.store.Spool`) sends to the worker for one batch of
changes; :class:`DeliveryRecord` is what a local delivery applies to the
spool in the same worker call that delivered the message.  Both use this
process's one :class:`~pymta.spool.disk.QueueDirectory` per directory
(:func:`worker_directory`), which owns that directory's free list.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger

from pymta.spool.disk import Change, QueueDirectory, Remove
from pymta.worker.process import in_child

# the namespace the spool's log lines had before the file side had its own module
log = Logger(namespace="pymta.spool.store")


_directories: dict[tuple[str, str], QueueDirectory] = {}
#: calls run in several threads of the child: one QueueDirectory per directory
_made = threading.Lock()


def worker_directory(directory: str, sync: str) -> QueueDirectory:
    """This process's QueueDirectory of ``directory`` (made on first use).

    Only for the disk worker's child: there it keeps the free list of
    ``directory``, and a second one on the same directory would hand out
    its files twice.
    """
    with _made:
        disk = _directories.get((directory, sync))
        if disk is None:
            disk = _directories[(directory, sync)] = QueueDirectory(directory, sync)
    return disk


def apply_spool_batch(directory: str, sync: str, kind: str, batch: list[Change]) -> dict[int, str]:
    """One batch of a spool pipeline ("commits", "updates" or "removals"), in the disk worker's child.

    Returns the errors of single requests by position.  Raising fails the
    whole batch.
    """
    errors = worker_directory(directory, sync).apply(kind, batch)
    return {n: str(errors[id(request)]) for n, request in enumerate(batch) if id(request) in errors}


# -- recorded in the batch that delivered the message -------------------------------------

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

    ``spool``: the spool's :class:`QueueDirectory` when delivery batches
    run in this process (``threads`` mode); it does not travel to the disk
    worker, whose child uses its own (:func:`worker_directory`, which keeps
    that free list).
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

        Only where the spool's files are kept: by the QueueDirectory given, or (a
        spool with a disk worker) in the worker's child; elsewhere it does
        nothing (the scheduler records the results as usual).
        """
        disk = self.spool
        if disk is None and self.in_worker and in_child():
            disk = worker_directory(self.directory, self.sync)
        if disk is None or not outcomes:
            return False
        if self.finishes and all(delivered for delivered, _ in outcomes):
            errors = disk.remove([Remove(self.queue_id, self.size)])
            for error in errors.values():
                log.warn("{queue_id}: delivered, but not yet removed from the spool: {error}",
                         queue_id=self.queue_id, error=str(error))
            return not errors
        delivered = [(index, summary) for index, (ok, summary) in zip(self.indices, outcomes) if ok]
        if delivered:
            disk.record_delivered(self.queue_id, delivered)
        return False
