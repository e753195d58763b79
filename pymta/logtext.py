"""The text log file, written faster than twistd's own observer writes it.

twistd logs through ``twisted.logger.textFileLogObserver``: for every event
it builds a ``datetime`` with a fixed-offset time zone for the time stamp,
formats the message with Twisted's ``string.Formatter`` subclass (which also
allows ``{method()}`` calls) and writes the line.  At a few lines per
message that formatting was a tenth of the reactor thread's time under load
(measured with ``bench/run.py`` and cProfile).

:class:`ClassicTextObserver` writes the same lines, byte for byte, for the
events pymta logs: the time stamp is formatted once per second and the
message with ``str.format_map``.  Any event it does not handle itself (a
traceback, a legacy ``log.msg`` event with its own system, a format that
``str.format_map`` cannot apply) goes to twistd's formatter, as before.
:func:`speed_up_text_log` puts it in place of twistd's observer and leaves
any other observer (``twistd --logger``, a JSON log) alone.
"""

from __future__ import annotations

import threading
import time
from typing import IO, Any, Callable

from twisted.logger import FileLogObserver, FilteringLogObserver, LogPublisher
from twisted.python.logfile import LogFile

#: twistd's time stamp format (twisted.logger.timeFormatRFC3339)
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S%z"


class ClassicTextObserver:
    """Writes events as ``<time> [<namespace>#<level>] <text>`` lines, like twistd."""

    def __init__(self, out_file: IO[Any], fallback: Callable[[dict], str | None]):
        self._out = out_file
        self._fallback = fallback
        # events may come from pool threads too; and from a signal handler (twistd's
        # "Received SIGTERM") run by the thread that holds the lock: reentrant
        self._lock = threading.RLock()
        #: (second, its time stamp), replaced as one so that threads never mix them
        self._stamp: tuple[int | None, str] = (None, "")

    def __call__(self, event: dict) -> None:
        text = self.format(event)
        if not text:
            return
        with self._lock:
            self._out.write(text)
            self._out.flush()

    def format(self, event: dict) -> str | None:
        """The log line of ``event`` (with its newline), or None for no line."""
        fmt = event.get("log_format")
        when = event.get("log_time")
        level = event.get("log_level")
        namespace = event.get("log_namespace")
        if (fmt is None or when is None or level is None or namespace is None
                or "log_failure" in event or "log_system" in event):
            return self._fallback(event)
        try:
            text = fmt.format_map(event)
        except Exception:     # a format only Twisted's formatter applies ("{f()}"), or a bad one
            return self._fallback(event)
        return f"{self._timestamp(when)} [{namespace}#{level.name}] {text.replace(chr(10), chr(10) + chr(9))}\n"

    def _timestamp(self, when: float) -> str:
        second = int(when)
        cached_second, stamp = self._stamp
        if second != cached_second:
            stamp = time.strftime(TIME_FORMAT, time.localtime(second))
            self._stamp = (second, stamp)
        return stamp


def _no_size_rotation(out_file: Any) -> None:
    if isinstance(out_file, LogFile):
        out_file.rotateLength = None


def _is_twistd_text_observer(observer: Any) -> bool:
    """Is this the observer ``textFileLogObserver`` made (twistd's log file or stdout)?"""
    if not isinstance(observer, FileLogObserver):
        return False
    formatter = getattr(observer, "formatEvent", None)
    return (getattr(formatter, "__qualname__", "") == "textFileLogObserver.<locals>.formatEvent"
            and hasattr(observer, "_outFile"))


def speed_up_text_log(publisher: LogPublisher,
                      replacement: Callable[[IO[Any], Callable[[dict], str | None]], Any]
                      = ClassicTextObserver) -> int:
    """Replace twistd's text-file observers among ``publisher``'s; returns how many.

    An observer may sit directly in the publisher or inside (nested)
    ``FilteringLogObserver`` wrappers, which stay as they are.  The new
    observer is ``replacement(out_file, twistd_formatter)``: the classic
    text lines, or :class:`pymta.logjson.JSONLineObserver`.

    A ``--logfile`` twistd opened is no longer rotated by size (twistd's
    ``LogFile`` renames it every 1 MB, without end): rotating it is
    logrotate's job (``etc/logrotate.d/pymta``), or ``kill -USR1``'s.
    """
    replaced = 0
    for observer in list(publisher._observers):
        if _is_twistd_text_observer(observer):
            publisher.removeObserver(observer)
            _no_size_rotation(observer._outFile)
            publisher.addObserver(replacement(observer._outFile, observer.formatEvent))
            replaced += 1
            continue
        wrapper = observer
        while isinstance(wrapper, FilteringLogObserver):
            inner = getattr(wrapper, "_observer", None)
            if _is_twistd_text_observer(inner):
                _no_size_rotation(inner._outFile)
                wrapper._observer = replacement(inner._outFile, inner.formatEvent)
                replaced += 1
                break
            wrapper = inner
    return replaced
