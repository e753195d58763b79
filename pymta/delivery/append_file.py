"""Append a message to a file: the ``/path/to/file`` targets of the system alias file.

Run by the pipe backend in a process of its own, with the message on stdin::

    python -m pymta.delivery.append_file [--as UID:GID] /var/log/mail-archive.mbox

With ``--as`` (the server runs as root) it first becomes that user (its
groups dropped), before it touches the file, so the kernel decides whether
the backend's user may write it.  It is started as root for that because
the interpreter and pymta need not be readable by that user (a virtualenv
in root's home directory).  The message is
appended in mbox form (``From `` line, mboxrd quoting, a blank line after
it; see :mod:`pymta.delivery.mbox`) under an fcntl lock, then fsynced; a
failed write is cut off again.  A symbolic link, a FIFO or any other
non-regular file is refused.  Exit status (sysexits.h): 0 appended; 73
(EX_CANTCREAT, bounced) the file cannot be opened or is no regular file;
75 (EX_TEMPFAIL, retried) locked by another process for too long, disk
full, over quota or an I/O error; 64 (EX_USAGE) not one absolute path.
The envelope sender comes from ``$SENDER`` (set by the pipe backend).
"""

from __future__ import annotations

import errno
import os
import stat
import sys

from pymta.delivery.mbox import MailboxLocked, from_line, lock_file, mboxrd_escape
from pymta.delivery.sysexits import EX_CANTCREAT, EX_TEMPFAIL, EX_USAGE

#: seconds to wait for another writer's lock
LOCK_TIMEOUT = 20.0
CHUNK = 64 * 1024
#: open() and write() errors worth a retry; the others are bounced
TEMPORARY = {errno.EDQUOT, errno.ENOSPC, errno.EIO, errno.EAGAIN, errno.EINTR, errno.ENFILE,
             errno.EMFILE, errno.ENOMEM}


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def main(args: list[str] | None = None) -> int:
    args = sys.argv[1:] if args is None else list(args)
    if len(args) == 3 and args[0] == "--as":
        try:
            uid, gid = (int(n) for n in args[1].split(":"))
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        except (ValueError, OSError) as e:
            _say(f"cannot become {args[1]}: {e}")
            return EX_TEMPFAIL
        if os.getuid() != uid or os.geteuid() != uid or uid == 0:
            _say(f"cannot become {args[1]}")
            return EX_TEMPFAIL
        args = args[2:]
    if len(args) != 1 or not os.path.isabs(args[0]):
        _say("usage: python -m pymta.delivery.append_file [--as UID:GID] /absolute/path < message")
        return EX_USAGE
    path = args[0]
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
                     | os.O_NOCTTY | os.O_CLOEXEC, 0o600)
    except OSError as e:
        _say(f"cannot append to {path}: {e.strerror}")
        return EX_TEMPFAIL if e.errno in TEMPORARY else EX_CANTCREAT
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            _say(f"cannot append to {path}: not a regular file")
            return EX_CANTCREAT
        try:
            lock_file(fd, path, LOCK_TIMEOUT)
        except MailboxLocked as e:
            _say(str(e))
            return EX_TEMPFAIL
        size = os.fstat(fd).st_size
        try:
            _append(fd, os.environ.get("SENDER", ""))
        except OSError as e:
            os.ftruncate(fd, size)
            _say(f"cannot append to {path}: {e.strerror}")
            return EX_TEMPFAIL if e.errno in TEMPORARY else EX_CANTCREAT
    finally:
        os.close(fd)
    return 0


def _append(fd: int, sender: str) -> None:
    stdin = sys.stdin.buffer
    chunks = iter(lambda: stdin.read(CHUNK), b"")
    pieces = [from_line(sender)]
    for piece in mboxrd_escape(chunks):
        pieces.append(piece)
        if sum(map(len, pieces)) >= CHUNK:
            _write_all(fd, b"".join(pieces))
            pieces = []
    _write_all(fd, b"".join(pieces))
    os.fsync(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


if __name__ == "__main__":
    sys.exit(main())
