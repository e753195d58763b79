"""What the local delivery backends share: paths, options, results.

Mailbox, domain and folder names are made from addresses by the rules of
:mod:`pymta.mailbox_names`, the ones the recipient validator applies too.
"""

from __future__ import annotations

import errno
import os
import socket
import string
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pymta.addresses import split_address, split_extension
from pymta.config.errors import OptionError
from pymta.delivery.result import DELIVERED, DeliveryResult
from pymta.envelope import Envelope, Recipient
from pymta.interfaces import IClosable
from pymta.mailbox_names import safe_domain_name, safe_mailbox_name
from pymta.delivery.worker_call import deliver_local
from pymta.worker.pipeline import BatchPipeline, pipeline_threadpool, release_threadpool

log = Logger()

#: the placeholders a ``layout`` may use
LAYOUT_FIELDS = ("domain", "local")


def _header_safe(text: str) -> str:
    return text.replace("\r", "").replace("\n", "")


def local_delivery_headers(envelope: Envelope, recipient: Recipient) -> bytes:
    """``Return-Path:`` and ``Delivered-To:`` for a local delivery (CRLF lines)."""
    return (f"Return-Path: <{_header_safe(envelope.sender_for(recipient))}>\r\n"
            f"Delivered-To: {_header_safe(recipient.address)}\r\n").encode("utf-8")


# -- options ------------------------------------------------------------------

def check_options(options: dict[str, Any], known: dict[str, type | tuple[type, ...]],
                  required: tuple[str, ...]) -> None:
    """Refuse unknown, missing and wrongly typed options (OptionError)."""
    for key, value in options.items():
        if key not in known:
            raise OptionError(key, f"unknown option (known: {', '.join(sorted(known))})")
        wanted = known[key]
        # bool is an int in Python; a number option must not take true/false
        if isinstance(value, bool) and bool not in (wanted if isinstance(wanted, tuple) else (wanted,)):
            raise OptionError(key, f"must be {_type_name(wanted)}, not a boolean")
        if not isinstance(value, wanted):
            raise OptionError(key, f"must be {_type_name(wanted)}, not {type(value).__name__}")
    for key in required:
        if key not in options:
            raise OptionError(key, "is required")


def _type_name(wanted) -> str:
    types = wanted if isinstance(wanted, tuple) else (wanted,)
    names = {str: "a string", bool: "true or false", int: "a number", float: "a number"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def check_layout(layout: str) -> str:
    """Validate a ``layout`` template; returns it."""
    if not layout:
        raise OptionError("layout", "must not be empty")
    try:
        parsed = list(string.Formatter().parse(layout))
    except ValueError as e:
        raise OptionError("layout", f"bad template {layout!r}: {e}") from None
    for literal, name, spec, conversion in parsed:
        if name is None:
            continue
        if name not in LAYOUT_FIELDS:
            raise OptionError("layout", f"unknown placeholder {{{name}}} in {layout!r} "
                                        f"(use {{domain}} and {{local}})")
        if spec or conversion:
            raise OptionError("layout", f"placeholder {{{name}}} in {layout!r} takes no format")
    if layout.startswith("/"):
        raise OptionError("layout", f"{layout!r} must be relative to base")
    if any(part in ("", ".", "..") for part in layout.split("/")):
        raise OptionError("layout", f"{layout!r} has an empty, '.' or '..' path component")
    return layout


@dataclass(frozen=True)
class MailboxLocator:
    """Turns a recipient address into a path under ``base``, safely."""

    base: str
    layout: str = "{domain}/{local}"
    recipient_delimiter: str = "+"

    def locate(self, address: str) -> tuple[str, str | None]:
        """(absolute path of the mailbox, extension or None).

        Raises ValueError when the address does not give a safe mailbox
        under ``base``.
        """
        local, domain = split_address(address)
        user, extension = split_extension(local, self.recipient_delimiter)
        fields = {"local": safe_mailbox_name(user),
                  "domain": safe_domain_name(domain) if domain else ""}
        if "{domain}" in self.layout and not domain:
            raise ValueError(f"address {address!r} has no domain for the layout {self.layout!r}")
        relative = self.layout.format(**fields)
        path = os.path.join(self.base, relative)
        self.check_inside(path)
        return path, extension

    def check_inside(self, path: str) -> None:
        """Raise ValueError unless ``path`` (symlinks resolved) lies inside ``base``."""
        base = os.path.realpath(self.base)
        real = os.path.realpath(path)
        if os.path.commonpath([base, real]) != base or real == base:
            raise ValueError(f"mailbox {path} resolves to {real}, outside {base}")


# -- errors -----------------------------------------------------------------

def os_error_result(error: OSError, relay: str, doing: str) -> DeliveryResult:
    """A temporary result for a file system problem (the admin can fix it)."""
    where = f"{doing} {error.filename}" if error.filename else doing
    text = f"{where}: {error.strerror or error}"
    if error.errno == errno.EDQUOT:
        return DeliveryResult.deferred(f"mailbox over quota: {text}", 452, "4.2.2", relay)
    if error.errno == errno.ENOSPC:
        return DeliveryResult.deferred(f"mail system full: {text}", 452, "4.3.1", relay)
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return DeliveryResult.deferred(f"permission problem: {text}", 451, "4.3.0", relay)
    return DeliveryResult.deferred(text, 451, "4.3.0", relay)


def unsafe_result(error: ValueError, relay: str) -> DeliveryResult:
    """A permanent result for an address that gives no safe mailbox."""
    return DeliveryResult.failed(f"bad destination mailbox: {error}", 550, "5.1.3", relay)


# -- the common part of the maildir and mbox backends ---------------------------

@dataclass
class DeliveryJob:
    """One ``deliver(message, recipients)`` call waiting for the delivery thread."""

    message: Any
    recipients: list
    results: list = field(default_factory=list)
    done: defer.Deferred = field(default_factory=defer.Deferred)

    @property
    def queue_id(self) -> str:
        return self.message.envelope.queue_id


@implementer(IClosable)
class LocalMailboxBackend:
    """Base of the local backends: options, path checks, batched delivery in one thread.

    Subclasses set ``kind`` and ``extra_options`` and implement
    :meth:`deliver_one`, which runs in the backend's delivery thread and may
    block; a subclass that can share work between the deliveries of a batch
    (Maildir: one fsync of each ``new/`` directory) overrides
    :meth:`deliver_jobs` instead.

    Deliveries go in batches: while a batch is being written, new
    deliveries wait and then go together
    (:class:`pymta.worker.pipeline.BatchPipeline`).  A batch runs in the
    server's disk worker process (:mod:`pymta.worker.process`) when the
    server gave the backend one (:meth:`use_disk_worker`), else in one
    thread of the backend's own: not one thread per
    concurrent delivery, since each file-system call releases and retakes
    the interpreter lock, and more threads mostly add lock hand-offs with
    the reactor thread.
    """

    kind = "local"
    extra_options: dict[str, type | tuple[type, ...]] = {}

    def __init__(self, options: dict[str, Any], context):
        known: dict[str, type | tuple[type, ...]] = {
            "base": str, "layout": str, "recipient_delimiter": str, **self.extra_options}
        check_options(options, known, required=("base",))
        if not options["base"]:
            raise OptionError("base", "must not be empty")
        self.options = dict(options)
        base = context.resolve_path(options["base"])
        delimiter = options.get("recipient_delimiter", "+")
        if any(c in delimiter for c in "/\\.@") or any(unicodedata.category(c) == "Cc" for c in delimiter):
            raise OptionError("recipient_delimiter", f"{delimiter!r} may not contain '/', '\\', '.', '@' "
                                                     "or control characters")
        self.locator = MailboxLocator(base=base,
                                      layout=check_layout(options.get("layout", "{domain}/{local}")),
                                      recipient_delimiter=delimiter)
        self.hostname = getattr(context, "hostname", None) or _local_hostname()
        self._reactor = getattr(context, "reactor", None)
        self._pipeline: BatchPipeline | None = None
        #: the server's pymta.worker.process.DiskWorker (see use_disk_worker), or None
        self._worker = None
        # what the disk worker's child needs to build the same backend
        self.worker_spec = (type(self).__module__, type(self).__qualname__, dict(options), self.hostname,
                            tuple(getattr(context, "domains", ())),
                            getattr(context, "config_dir", None) or os.getcwd())

    @property
    def base(self) -> str:
        return self.locator.base

    def use_disk_worker(self, worker) -> None:
        """Run the delivery batches in ``worker``'s child process, not in a thread.

        ``worker`` is the server's :class:`pymta.worker.process.DiskWorker`
        (pymta.tap gives it to every backend that has this method); called
        before the first delivery.
        """
        self._worker = worker

    def close(self) -> None:
        """IClosable: a reload retired this backend and no delivery uses it: stop its thread."""
        pipeline, self._pipeline = self._pipeline, None
        if pipeline is not None and pipeline._threadpool is not None:
            reactor = self._reactor
            if reactor is None:
                from twisted.internet import reactor  # type: ignore[no-redef]
            release_threadpool(reactor, pipeline._threadpool)

    def deliver(self, message, recipients):
        """IDeliveryBackend: queue for the backend's delivery thread (see the class).

        When the server gave the backend its disk worker (:meth:`use_disk_worker`),
        the batches go to the worker's child process instead of a thread.
        """
        if self._pipeline is None:
            reactor = self._reactor
            if reactor is None:
                from twisted.internet import reactor  # type: ignore[no-redef]
            worker = self._worker
            if worker is not None:
                self._pipeline = BatchPipeline(reactor, None,
                                               lambda jobs: self._apply_jobs_in_worker(worker, jobs))
            else:
                self._pipeline = BatchPipeline(reactor, pipeline_threadpool(reactor, 1, f"pymta.{self.kind}"),
                                               self._apply_jobs)
        job = DeliveryJob(message, list(recipients))
        self._pipeline.submit(job)
        return job.done.addCallback(lambda _: job.results)

    def _apply_jobs(self, jobs: list[DeliveryJob]) -> dict:
        """BatchPipeline's apply: every job gets its results (no job fails as a whole)."""
        self._settle_jobs(jobs, *self.deliver_and_record([(job.message, job.recipients) for job in jobs]))
        return {}

    def _apply_jobs_in_worker(self, worker, jobs: list[DeliveryJob]) -> defer.Deferred:
        """The same, in the disk worker's child (a dead child defers the whole batch)."""
        d = worker.call(deliver_local, self.worker_spec,
                        [(job.message, job.recipients) for job in jobs])

        def failed(failure):
            log.error("{kind} delivery batch failed in the disk worker: {error}", kind=self.kind,
                      error=failure.getErrorMessage())
            result = DeliveryResult.deferred(f"{self.kind} delivery error: {failure.getErrorMessage()}",
                                             451, "4.3.0", self.kind)
            delivered = DeliveryResult.delivered("delivered; the disk worker ended after removing "
                                                 "it from the spool", self.kind)
            results, removed = [], []
            for job in jobs:
                # The child removes a message from the spool only once it is
                # delivered (and synced): one whose spool file is gone was
                # delivered before the child ended (a rare path: the check
                # runs on the reactor thread).
                record = getattr(job.message, "record_delivery", None)
                gone = (record is not None and record.finishes
                        and not os.path.exists(job.message.body_path))
                results.append([delivered if gone else result] * len(job.recipients))
                removed.append(gone)
            return results, removed
        d.addErrback(failed)
        d.addCallback(lambda answer: self._settle_jobs(jobs, *answer) or {})
        return d

    @staticmethod
    def _settle_jobs(jobs: list[DeliveryJob], results: list[list[DeliveryResult]],
                     removed: list[bool]) -> None:
        for job, job_results, job_removed in zip(jobs, results, removed):
            job.results = job_results
            if job_removed:
                job.message.removed = True

    def deliver_sync(self, message, recipients) -> list[DeliveryResult]:
        """Deliver on the calling thread (blocking); one result per recipient."""
        return self.deliver_all([(message, list(recipients))])[0]

    def deliver_and_record(self, jobs: list[tuple[Any, list]]) -> tuple[list[list[DeliveryResult]], list[bool]]:
        """:meth:`deliver_all`, then each job's deliveries recorded in the spool.

        A message the scheduler sent with a ``record_delivery``
        (:class:`pymta.spool.worker_calls.DeliveryRecord`) has its delivered
        recipients recorded here, right after the mailbox sync and before
        the batch answers: the message leaves the spool when that finished
        it.  Returns the results and, per job, whether its message left the
        spool.
        """
        results = self.deliver_all(jobs)
        removed = []
        for (message, _), job_results in zip(jobs, results):
            record = getattr(message, "record_delivery", None)
            done = False
            if record is not None and any(r.status == DELIVERED for r in job_results):
                try:
                    done = record.apply([(r.status == DELIVERED, r.summary()) for r in job_results])
                except Exception:   # a bug: the scheduler records the results as usual
                    log.failure("{queue_id}: recording the delivery in the spool failed",
                                queue_id=record.queue_id)
            removed.append(done)
        return results, removed

    def deliver_all(self, jobs: list[tuple[Any, list]]) -> list[list[DeliveryResult]]:
        """Deliver several messages on the calling thread; a list of results per job."""
        if not os.path.isdir(self.base):
            try:
                ensure_directory(self.base)
            except OSError as e:
                result = os_error_result(e, self.kind, f"creating {self.kind} base directory")
                return [[result] * len(recipients) for _, recipients in jobs]
            log.info("created {kind} base directory {base}", kind=self.kind, base=self.base)
        return self.deliver_jobs(jobs)

    def deliver_jobs(self, jobs: list[tuple[Any, list]]) -> list[list[DeliveryResult]]:
        """Each recipient of each job through :meth:`deliver_one` (the base exists)."""
        return [[self.guarded(self.deliver_one, message, recipient) for recipient in recipients]
                for message, recipients in jobs]

    def guarded(self, step, message, recipient, *args) -> Any:
        """``step(message, recipient, *args)``; an exception (a bug) becomes a deferred result."""
        try:
            return step(message, recipient, *args)
        except Exception as e:  # a bug, not the recipient's fault: retry later
            log.failure("{queue_id}: {kind} delivery to {to} failed",
                        queue_id=message.envelope.queue_id, kind=self.kind, to=recipient.address)
            return DeliveryResult.deferred(f"{self.kind} delivery error: {e}", 451, "4.3.0", self.kind)

    def deliver_one(self, message, recipient) -> DeliveryResult:
        raise NotImplementedError

    def message_chunks(self, message, recipient, chunk_size: int = 64 * 1024):
        """The bytes to store: delivery headers, prepended fields, then the body."""
        yield local_delivery_headers(message.envelope, recipient) + message.prepend_bytes()
        with message.open_body() as body:
            while True:
                chunk = body.read(chunk_size)
                if not chunk:
                    return
                yield chunk


def _local_hostname() -> str:
    return socket.gethostname() or "localhost"


def ensure_directory(path: str, mode: int = 0o700) -> None:
    """Create ``path`` and missing parents (0700); an existing one is fine."""
    os.makedirs(path, mode=mode, exist_ok=True)
