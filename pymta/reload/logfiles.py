"""Reopening the log files at a reload, for logrotate's ``create`` method.

logrotate renames ``pymta.log`` and creates an empty one; the server, told
with SIGHUP, must then write to the new file.  twistd's ``--logfile`` is a
:class:`twisted.python.logfile.LogFile` behind the log observers (pymta's
:class:`pymta.logtext.ClassicTextObserver`, twistd's own, inside
``FilteringLogObserver`` wrappers); each one found is opened again by its
path.  A file that cannot be opened (after the privilege drop, in a
directory only root may write) is reported and the old one stays in use:
no line is lost.  Logging to stdout (``twistd -n``) has nothing to reopen.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from twisted.logger import FilteringLogObserver, LogPublisher, globalLogPublisher
from twisted.python.logfile import BaseLogFile


def _files_of(observer: Any, depth: int = 0) -> Iterator[tuple[Any, Any]]:
    """(file, the lock its writer takes or None) of each file ``observer`` writes to."""
    if depth > 8:
        return
    if isinstance(observer, FilteringLogObserver):
        yield from _files_of(getattr(observer, "_observer", None), depth + 1)
        return
    for attribute in ("_out", "_outFile"):     # ClassicTextObserver, FileLogObserver
        out = getattr(observer, attribute, None)
        if out is not None:
            yield out, getattr(observer, "_lock", None)


def _log_files(publisher: LogPublisher) -> dict[int, tuple[BaseLogFile, Any]]:
    found: dict[int, tuple[BaseLogFile, Any]] = {}
    for observer in list(getattr(publisher, "_observers", ())):
        for out, lock in _files_of(observer):
            if isinstance(out, BaseLogFile) and (id(out) not in found or lock is not None):
                found[id(out)] = (out, lock)
    return found


def log_files(publisher: LogPublisher = globalLogPublisher) -> list[BaseLogFile]:
    """The log files (twistd's ``--logfile``) the observers of ``publisher`` write to."""
    return [logfile for logfile, _ in _log_files(publisher).values()]


def reopen_log_files(publisher: LogPublisher = globalLogPublisher) -> list[str]:
    """Open each log file again by its path; the problems, one line each."""
    problems = []
    for logfile, lock in _log_files(publisher).values():
        with lock if lock is not None else contextlib.nullcontext():   # lines from pool threads
            previous = logfile._file
            try:
                logfile._openFile()        # what LogFile.reopen does, without closing first
            except OSError as e:
                logfile._file = previous
                logfile.closed = False
                problems.append(f"cannot reopen the log file {logfile.path}: {e.strerror or e}; "
                                "still writing to the file open before")
                continue
            previous.close()
    return problems
