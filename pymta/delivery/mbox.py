"""Local delivery into mbox files (mboxrd).

Each message is appended as a ``From <sender> <date>`` line, the message
with CRLF turned into LF and every line matching ``^>*From `` quoted with one
more ``>`` (mboxrd: reversible), and a blank line.  While appending, the
mailbox is locked with a dot-lock (``<mbox>.lock``, created with O_EXCL,
broken when older than five minutes) and an fcntl lock, the way mail readers
expect.  The append is fsynced; on a write error the file is truncated back
to its old size, so a mailbox never holds half a message.

Options (config table of the backend)::

    base = "mail"                  # required; relative to the config file; created if missing
    layout = "{domain}/{local}"    # the user's mbox file under base
    recipient_delimiter = "+"      # user+ext@ goes to user's mbox; "" disables
    lock_timeout = 20              # seconds to wait for the locks, then defer
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import time
from typing import Any, Iterable, Iterator

from twisted.logger import Logger
from zope.interface import implementer

from pymta.delivery.mailbox import (LocalMailboxBackend, ensure_directory, os_error_result,
                                    unsafe_result)
from pymta.plugin_api import DeliveryResult, IDeliveryBackend, OptionError

log = Logger()

#: a dot-lock older than this is left over from a crash and is removed
STALE_LOCK_SECONDS = 300.0
DEFAULT_LOCK_TIMEOUT = 20.0
WRITE_BATCH = 64 * 1024

_FROM_LINE = re.compile(rb">*From ")


class MailboxLocked(Exception):
    """The mailbox lock could not be taken in time."""


def mboxrd_escape(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Convert a message (CRLF or LF lines) to mbox form: LF lines, mboxrd quoting.

    Yields pieces of output; the last piece ends the message with a line
    break and the blank line that separates it from the next one.
    """
    pending = b""
    for chunk in chunks:
        if not chunk:
            continue
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()
        out = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if _FROM_LINE.match(line):
                line = b">" + line
            out.append(line)
        if out:
            yield b"\n".join(out) + b"\n"
    if pending:
        if pending.endswith(b"\r"):
            pending = pending[:-1]
        if _FROM_LINE.match(pending):
            pending = b">" + pending
        yield pending + b"\n"
    yield b"\n"


def mboxrd_unescape_line(line: bytes) -> bytes:
    """Undo mboxrd quoting for one line of a message read from an mbox."""
    if line.startswith(b">") and _FROM_LINE.match(line):
        return line[1:]
    return line


def from_line(sender: str, when: float | None = None) -> bytes:
    """The ``From `` line that starts a message in an mbox."""
    who = "".join("_" if c.isspace() else c for c in sender) or "MAILER-DAEMON"
    return f"From {who} {time.asctime(time.localtime(when))}\n".encode("utf-8")


class DotLock:
    """``<path>.lock`` created with O_EXCL; a stale one (by mtime) is broken."""

    def __init__(self, path: str, timeout: float, stale_after: float = STALE_LOCK_SECONDS):
        self.path = path
        self.timeout = timeout
        self.stale_after = stale_after
        self._held = False

    def acquire(self) -> None:
        deadline = time.monotonic() + self.timeout
        pause = 0.01
        while True:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                try:
                    age = time.time() - os.stat(self.path).st_mtime
                except FileNotFoundError:
                    continue                     # released meanwhile: try again at once
                if age > self.stale_after:
                    try:
                        os.unlink(self.path)
                    except FileNotFoundError:
                        pass
                    log.warn("removed stale lock {path} ({age:.0f} seconds old)",
                             path=self.path, age=age)
                    continue
                if time.monotonic() >= deadline:
                    raise MailboxLocked(f"{self.path} is held by another process") from None
                time.sleep(pause)
                pause = min(pause * 2, 0.1)
                continue
            try:
                os.write(fd, f"{os.getpid()}\n".encode())
            finally:
                os.close(fd)
            self._held = True
            return

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                log.warn("lock {path} vanished while held", path=self.path)


def lock_file(fd: int, path: str, timeout: float) -> None:
    """Take an exclusive fcntl lock on ``fd``, waiting at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    pause = 0.01
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EAGAIN):
                raise
        if time.monotonic() >= deadline:
            raise MailboxLocked(f"{path} is locked (fcntl) by another process")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


@implementer(IDeliveryBackend)
class MboxBackend(LocalMailboxBackend):
    """Append to ``<base>/<layout>`` (one mbox file per user)."""

    kind = "mbox"
    extra_options = {"lock_timeout": (int, float)}

    def __init__(self, options: dict[str, Any], context):
        super().__init__(options, context)
        self.lock_timeout = float(options.get("lock_timeout", DEFAULT_LOCK_TIMEOUT))
        if self.lock_timeout < 0:
            raise OptionError("lock_timeout", "must not be negative")

    def deliver_one(self, message, recipient) -> DeliveryResult:
        try:
            path, _extension = self.locator.locate(recipient.address)  # user+ext -> user
        except ValueError as e:
            return unsafe_result(e, self.kind)
        relay = f"{self.kind}:{path}"
        try:
            ensure_directory(os.path.dirname(path))
            self.locator.check_inside(path)
        except ValueError as e:
            return unsafe_result(e, relay)
        except OSError as e:
            return os_error_result(e, relay, "creating directory for")
        lock = DotLock(path + ".lock", self.lock_timeout)
        try:
            lock.acquire()
        except MailboxLocked as e:
            return DeliveryResult.deferred(f"mailbox busy: {e}", 451, "4.2.0", relay)
        except OSError as e:
            return os_error_result(e, relay, "locking")
        try:
            self._append(message, recipient, path)
        except MailboxLocked as e:
            return DeliveryResult.deferred(f"mailbox busy: {e}", 451, "4.2.0", relay)
        except OSError as e:
            return os_error_result(e, relay, "appending to")
        finally:
            lock.release()
        return DeliveryResult.delivered("delivered to mailbox", relay)

    def _append(self, message, recipient, path: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", path)
            lock_file(fd, path, self.lock_timeout)
            original_size = os.fstat(fd).st_size
            try:
                batch = [from_line(message.envelope.sender)]
                batched = len(batch[0])
                for piece in mboxrd_escape(self.message_chunks(message, recipient)):
                    batch.append(piece)
                    batched += len(piece)
                    if batched >= WRITE_BATCH:
                        _write_all(fd, b"".join(batch))
                        batch, batched = [], 0
                _write_all(fd, b"".join(batch))
                os.fsync(fd)
            except BaseException:
                self._truncate(fd, path, original_size)
                raise
        finally:
            os.close(fd)  # also releases the fcntl lock

    @staticmethod
    def _truncate(fd: int, path: str, size: int) -> None:
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
        except OSError as e:
            log.critical("cannot truncate {path} back to {size} bytes after a failed "
                         "delivery: {error}; the mailbox may hold a partial message",
                         path=path, size=size, error=e.strerror)
