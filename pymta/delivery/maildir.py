"""Local delivery into Maildir (and Maildir++ folders).

Each message is written to ``tmp/`` under a unique name
(``<sec>.M<usec>P<pid>Q<n>.<host>``), fsynced, then linked into ``new/`` as
``<unique>,S=<size>`` and ``new/`` is fsynced: a reader never sees a partial
file and a delivered file survives a crash.  Deliveries come in batches
(see :class:`pymta.delivery.mailbox.LocalMailboxBackend`): each file is
fsynced before its link, each ``new/`` directory once per batch, and no
delivery of the batch is reported before its directory was.  The file holds
``Return-Path:``, ``Delivered-To:``, the spooled prepended fields
(``Received:``) and the body exactly as received (CRLF line ends, which
Dovecot and other readers accept).

Files left in ``tmp/`` by a writer that crashed are removed once they are
36 hours old, as Dovecot and Postfix do: when delivering into a Maildir (or
folder), at most once an hour each, by a scan of its ``tmp/``.

Options (config table of the backend)::

    base = "mail"                  # required; relative to the config file; created if missing
    layout = "{domain}/{local}"    # the user's maildir under base
    recipient_delimiter = "+"      # each character is a delimiter; "" disables extensions
    folders = true                 # user+Folder@ -> Maildir++ folder ".Folder"
"""

from __future__ import annotations

import collections
import errno
import itertools
import os
import time
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from pymta.delivery.mailbox import LocalMailboxBackend, ensure_directory, os_error_result, unsafe_result
from pymta.filesync import fsync_directory
from pymta.plugin_api import DeliveryResult, IDeliveryBackend, safe_folder_name

log = Logger()

MAILDIR_SUBDIRS = ("cur", "new", "tmp")
CHUNK = 64 * 1024
#: files in tmp/ older than this (seconds since their last change, mtime and
#: ctime: a writer may set its file's mtime back, see MaildirBackend._sweep_tmp)
#: are removed
TMP_MAX_AGE = 36 * 3600
#: each tmp/ is scanned for them at most this often (seconds)
TMP_SWEEP_INTERVAL = 3600

# errors of os.link that mean "this file system has no hard links": rename instead
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


@dataclass
class _Linked:
    """A file linked into ``new/`` whose directory is not fsynced yet."""

    new_path: str
    name: str
    relay: str


@dataclass
class _Batch:
    """What the deliveries of one batch share: paths already checked."""

    #: address -> (maildir, extension), or the ValueError of an unsafe one
    located: dict[str, tuple[str, str | None] | ValueError] = field(default_factory=dict)
    #: target directory -> None when ready, or the result that refuses it
    prepared: dict[str, DeliveryResult | None] = field(default_factory=dict)


def maildir_hostname(hostname: str) -> str:
    """The host part of a unique name: "/" and ":" escaped as the Maildir spec says."""
    return hostname.replace("/", "\\057").replace(":", "\\072")


@implementer(IDeliveryBackend)
class MaildirBackend(LocalMailboxBackend):
    """Deliver into ``<base>/<layout>/{cur,new,tmp}``."""

    kind = "maildir"
    extra_options = {"folders": bool}
    #: see TMP_MAX_AGE and TMP_SWEEP_INTERVAL
    tmp_max_age = TMP_MAX_AGE
    tmp_sweep_interval = TMP_SWEEP_INTERVAL

    def __init__(self, options: dict[str, Any], context):
        super().__init__(options, context)
        self.folders: bool = options.get("folders", True)
        self._host = maildir_hostname(self.hostname)
        self._counter = itertools.count(1)
        #: tmp/ directory -> time.monotonic() of its last sweep, oldest first;
        #: only those swept within the last interval
        self._swept: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._clock = time.monotonic
        #: the wall clock the files' ages are measured with
        self._wall = time.time

    def deliver_one(self, message, recipient) -> DeliveryResult:
        return self.deliver_jobs([(message, [recipient])])[0][0]

    def deliver_jobs(self, jobs):
        """Write every file of the batch, then fsync each ``new/`` directory once."""
        batch = _Batch()
        staged = [[self.guarded(self._stage, message, recipient, batch) for recipient in recipients]
                  for message, recipients in jobs]
        unsynced: dict[str, OSError | None] = {}
        for outcomes in staged:
            for outcome in outcomes:
                if isinstance(outcome, _Linked):
                    unsynced.setdefault(os.path.dirname(outcome.new_path), None)
        for directory in unsynced:
            try:
                fsync_directory(directory)
            except OSError as e:
                unsynced[directory] = e
        return [[self._settle(outcome, unsynced) for outcome in outcomes] for outcomes in staged]

    @staticmethod
    def _settle(outcome, unsynced: dict[str, OSError | None]) -> DeliveryResult:
        if not isinstance(outcome, _Linked):
            return outcome
        error = unsynced[os.path.dirname(outcome.new_path)]
        if error is None:
            return DeliveryResult.delivered(f"delivered to maildir as {outcome.name}", outcome.relay)
        try:
            os.unlink(outcome.new_path)   # not known to be durable: retried later, so not kept twice
        except OSError:
            pass
        return os_error_result(error, outcome.relay, "writing")

    def _stage(self, message, recipient, batch: _Batch) -> DeliveryResult | _Linked:
        """Write one recipient's copy into its ``new/`` (not yet fsynced), or say why not."""
        located = batch.located.get(recipient.address)
        if located is None:
            try:
                located = self.locator.locate(recipient.address)
            except ValueError as e:
                located = e
            batch.located[recipient.address] = located
        if isinstance(located, ValueError):
            return unsafe_result(located, self.kind)
        maildir, extension = located
        target = maildir
        if extension and self.folders:
            try:
                target = os.path.join(maildir, "." + safe_folder_name(extension))
            except ValueError as e:
                return unsafe_result(e, f"{self.kind}:{maildir}")
        relay = f"{self.kind}:{target}"
        if target not in batch.prepared:
            batch.prepared[target] = self._prepare(maildir, target, relay)
        refused = batch.prepared[target]
        if refused is not None:
            return refused
        try:
            name = self._store(message, recipient, target)
        except OSError as e:
            return os_error_result(e, relay, "writing")
        return _Linked(os.path.join(target, "new", name), name, relay)

    def _prepare(self, maildir: str, target: str, relay: str) -> DeliveryResult | None:
        """Create the maildir (and folder) if needed and check it stays inside base."""
        try:
            self._ensure_maildir(maildir)
            if target != maildir:
                self._ensure_maildir(target, folder=True)
            for sub in ("tmp", "new"):
                self.locator.check_inside(os.path.join(target, sub))
        except ValueError as e:
            return unsafe_result(e, relay)
        except OSError as e:
            return os_error_result(e, relay, "creating maildir")
        self._sweep_tmp(os.path.join(target, "tmp"))
        return None

    def _sweep_tmp(self, tmp: str) -> None:
        """Remove files older than ``tmp_max_age`` from ``tmp`` (at most once per interval).

        What a crashed writer left behind; a delivery in progress touched
        its file moments ago.  Both the file's mtime and its ctime must be
        that old, as in Dovecot's own cleanup: a writer may date its file
        with utime(2) before renaming it into new/ or cur/ (Dovecot does,
        saving with a received date), which sets the mtime back but not the
        ctime.  Problems are logged, never a delivery's.

        The Maildirs swept within the interval are remembered oldest first;
        those whose interval is over are forgotten as new ones come: a few
        operations per sweep, however many Maildirs there are.
        """
        now = self._clock()
        swept = self._swept
        last = swept.get(tmp)
        if last is not None and now - last < self.tmp_sweep_interval:
            return
        while swept:
            oldest, when = next(iter(swept.items()))
            if now - when < self.tmp_sweep_interval:
                break
            swept.popitem(last=False)
        swept[tmp] = now
        cutoff = self._wall() - self.tmp_max_age
        removed = 0
        try:
            with os.scandir(tmp) as entries:
                for entry in entries:
                    try:
                        if not entry.is_file(follow_symlinks=False):
                            continue
                        info = entry.stat(follow_symlinks=False)
                        if info.st_mtime < cutoff and info.st_ctime < cutoff:
                            os.unlink(entry.path)
                            removed += 1
                    except FileNotFoundError:
                        pass
        except OSError as e:
            log.warn("maildir: cannot clean up {tmp}: {error}", tmp=tmp, error=e.strerror or e)
            return
        if removed:
            log.info("maildir: removed {count} file(s) older than {hours} hours from {tmp}",
                     count=removed, hours=round(self.tmp_max_age / 3600), tmp=tmp)

    # -- file system -----------------------------------------------------------

    def _ensure_maildir(self, path: str, folder: bool = False) -> None:
        """Create cur/ new/ tmp/ (and a Maildir++ folder's marker) if missing."""
        missing = [sub for sub in MAILDIR_SUBDIRS if not os.path.isdir(os.path.join(path, sub))]
        marker = os.path.join(path, "maildirfolder")
        if not missing and (not folder or os.path.exists(marker)):
            return
        self.locator.check_inside(path)
        for sub in missing:
            ensure_directory(os.path.join(path, sub))
        if folder and not os.path.exists(marker):
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
        # make the new directories durable: each up to base
        directory = path
        base = os.path.realpath(self.base)
        while True:
            fsync_directory(directory)
            if os.path.realpath(directory) == base or directory == os.path.dirname(directory):
                break
            directory = os.path.dirname(directory)

    def unique_name(self) -> str:
        now = time.time()
        seconds = int(now)
        micros = int((now - seconds) * 1_000_000)
        return f"{seconds}.M{micros}P{os.getpid()}Q{next(self._counter)}.{self._host}"

    def _store(self, message, recipient, target: str) -> str:
        """Write the message into ``target``; returns the file name in ``new/``.

        The file is fsynced before it is linked; ``new/`` itself is not
        (:meth:`deliver_jobs` does that once for the batch).
        """
        while True:
            unique = self.unique_name()
            tmp_path = os.path.join(target, "tmp", unique)
            try:
                fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            break
        try:
            size = 0
            with os.fdopen(fd, "wb", buffering=CHUNK) as fp:
                for chunk in self.message_chunks(message, recipient, CHUNK):
                    fp.write(chunk)
                    size += len(chunk)
                fp.flush()
                os.fsync(fp.fileno())
            name = f"{unique},S={size}"
            new_path = os.path.join(target, "new", name)
            try:
                os.link(tmp_path, new_path)
            except OSError as e:
                if e.errno not in _NO_LINKS:
                    raise
                os.rename(tmp_path, new_path)
            else:
                try:
                    os.unlink(tmp_path)
                except OSError:
                    pass  # delivered; a stale tmp/ file is what Maildir readers clean up
        except BaseException:
            try:
                os.unlink(tmp_path)
            except OSError:
                pass
            raise
        return name
