"""Local delivery into Maildir (and Maildir++ folders).

Each message is written to ``tmp/`` under a unique name
(``<sec>.M<usec>P<pid>Q<n>.<host>``), fsynced, then linked into ``new/`` as
``<unique>,S=<size>`` and ``new/`` is fsynced: a reader never sees a partial
file and a delivered file survives a crash.  The file holds
``Return-Path:``, ``Delivered-To:``, the spooled prepended fields
(``Received:``) and the body exactly as received (CRLF line ends, which
Dovecot and other readers accept).

Options (config table of the backend)::

    base = "mail"                  # required; relative to the config file; created if missing
    layout = "{domain}/{local}"    # the user's maildir under base
    recipient_delimiter = "+"      # each character is a delimiter; "" disables extensions
    folders = true                 # user+Folder@ -> Maildir++ folder ".Folder"
"""

from __future__ import annotations

import errno
import itertools
import os
import time
from typing import Any

from zope.interface import implementer

from pymta.delivery.mailbox import (LocalMailboxBackend, ensure_directory, fsync_directory,
                                    os_error_result, safe_folder_name, unsafe_result)
from pymta.delivery.result import DeliveryResult
from pymta.interfaces import IDeliveryBackend

MAILDIR_SUBDIRS = ("cur", "new", "tmp")
CHUNK = 64 * 1024

# errors of os.link that mean "this file system has no hard links": rename instead
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK}


def maildir_hostname(hostname: str) -> str:
    """The host part of a unique name: "/" and ":" escaped as the Maildir spec says."""
    return hostname.replace("/", "\\057").replace(":", "\\072")


@implementer(IDeliveryBackend)
class MaildirBackend(LocalMailboxBackend):
    """Deliver into ``<base>/<layout>/{cur,new,tmp}``."""

    kind = "maildir"
    extra_options = {"folders": bool}

    def __init__(self, options: dict[str, Any], context):
        super().__init__(options, context)
        self.folders: bool = options.get("folders", True)
        self._host = maildir_hostname(self.hostname)
        self._counter = itertools.count(1)

    def deliver_one(self, message, recipient) -> DeliveryResult:
        try:
            maildir, extension = self.locator.locate(recipient.address)
        except ValueError as e:
            return unsafe_result(e, self.kind)
        target = maildir
        if extension and self.folders:
            try:
                target = os.path.join(maildir, "." + safe_folder_name(extension))
            except ValueError as e:
                return unsafe_result(e, f"{self.kind}:{maildir}")
        relay = f"{self.kind}:{target}"
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
        try:
            name = self._store(message, recipient, target)
        except OSError as e:
            return os_error_result(e, relay, "writing")
        return DeliveryResult.delivered(f"delivered to maildir as {name}", relay)

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
        """Write the message into ``target``; returns the file name in ``new/``."""
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
        fsync_directory(os.path.join(target, "new"))
        return name
