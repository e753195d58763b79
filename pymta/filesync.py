"""Making files durable: the ways to sync the spool, and a directory's fsync.

``"fsync"`` syncs each file written, ``"syncfs"`` the whole file system once
(``syncfs(2)``, see :func:`pymta.libc.load_syncfs`); ``[spool] sync`` in the
config names one of :data:`SYNC_MODES`.  Maildir and the spool both sync a
directory after a rename into it, so that the new name survives a crash.
"""

from __future__ import annotations

import os

SYNC_MODES = ("fsync", "syncfs")


def fsync_directory(path: str) -> None:
    """fsync the directory ``path`` (the names in it become durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
