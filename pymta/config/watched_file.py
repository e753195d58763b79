"""A side file a plugin reads at start-up and re-reads when it changes.

Map and password files named in plugin options (``file = "..."``) follow one
rule, like Postfix's maps: the file is parsed at start-up, where a problem is
a start-up error; afterwards it is checked for changes (mtime, ctime, size,
inode) at most once per :attr:`WatchedFile.check_interval` when the plugin
looks something up, and re-parsed when it changed.  A file that has become
unreadable or broken is logged and the previous contents stay in use, so a
half-edited map never takes the server down or opens it up.

Typical use::

    self._file = WatchedFile(path, parse_my_map, what="sender login map",
                             errors=(MyMapError,))
    ...
    table = self._file.current()   # reloads first if the file changed

A plugin that words its reload messages itself subclasses WatchedFile and
overrides :meth:`~WatchedFile.report_unreadable`,
:meth:`~WatchedFile.report_not_reloaded` and
:meth:`~WatchedFile.report_reloaded`.
"""

from __future__ import annotations

import os
import time
import weakref
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from twisted.logger import Logger

__all__ = ["WatchedFile", "file_signature"]

T = TypeVar("T")


def file_signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells that a file changed: (mtime, ctime, size, inode).

    ctime catches a chmod (a password file made world-readable); the inode
    catches an atomic replace within one mtime tick.
    """
    return (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)


class WatchedFile(Generic[T]):
    """The parsed contents of ``path``, re-parsed when the file changes.

    ``load(path)`` reads and parses the file.  At construction its exceptions
    propagate (OSError and whatever it raises for bad content): the plugin
    turns them into an OptionError.  At reload, OSError and the exception
    types in ``errors`` are logged with ``what`` and the path, and the
    previous contents are kept; anything else propagates (a bug).
    """

    #: seconds between two checks of the file for changes
    check_interval = 1.0
    log = Logger()
    #: every WatchedFile in use (the start-up checks which the run-as user can read)
    _instances: "weakref.WeakSet[WatchedFile]" = weakref.WeakSet()

    def __init__(self, path: str, load: Callable[[str], T], *, what: str,
                 errors: tuple[type[BaseException], ...] = (),
                 clock: Callable[[], float] = time.monotonic):
        self.path = path
        self.what = what
        self._load = load
        self._errors = (OSError, *errors)
        self._clock = clock
        self._signature: Any = file_signature(os.stat(path))
        self._value: T = load(path)
        self._checked_at = clock()
        WatchedFile._instances.add(self)

    @classmethod
    def instances(cls) -> list["WatchedFile"]:
        """The watched files in use (made and not yet garbage)."""
        return list(WatchedFile._instances)

    def current(self) -> T:
        """The contents, after re-reading the file if it changed (rate-limited)."""
        self.reload_if_changed()
        return self._value

    @property
    def value(self) -> T:
        """The contents as last loaded, without checking the file."""
        return self._value

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed (at most once per check_interval); True if reloaded."""
        now = self._clock()
        if now - self._checked_at < self.check_interval:
            return False
        self._checked_at = now
        try:
            signature: Any = file_signature(os.stat(self.path))
        except OSError as e:
            signature = ("unreadable", e.errno)
            if signature != self._signature:
                self._signature = signature
                self.report_unreadable(e)
            return False
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            value = self._load(self.path)
        except self._errors as e:
            self.report_not_reloaded(e)
            return False
        self._value = value
        self.report_reloaded(value)
        return True

    # How a reload is reported.  A subclass may override these to log in its
    # plugin's own words (and on its plugin's logger); each is called once
    # per change of the file, never per lookup.

    def report_unreadable(self, error: OSError) -> None:
        """The file cannot be stat()ed any more; the previous contents stay in use."""
        self.log.error("{what} {path} cannot be read ({problem}); keeping the previous contents",
                       what=self.what, path=self.path, problem=error.strerror or str(error))

    def report_not_reloaded(self, error: BaseException) -> None:
        """The changed file could not be read or parsed; the previous contents stay in use."""
        problem = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        self.log.error("{what} {path} not reloaded, keeping the previous contents: {problem}",
                       what=self.what, path=self.path, problem=problem)

    def report_reloaded(self, value: T) -> None:
        """The changed file was parsed; ``value`` is now in use."""
        self.log.info("{what} {path} reloaded", what=self.what, path=self.path)
