"""The log as JSON lines: one object per event, one event per line.

Each object has the fields of the text line (:mod:`pymta.logtext`)::

    {"time": "2026-12-03T20:15:02+0000", "level": "info", "namespace": "pymta.delivery",
     "text": "1K0T...: to=<alice@example.org>, relay=local[maildir:...], delay=0.012, status=sent (...)",
     "fields": {"queue_id": "1K0T...", "to": "alice@example.org", "status": "sent", ...}}

``time``, ``level``, ``namespace`` and ``text`` are what the text line
shows (``time`` in the same format, ``text`` the same message); ``fields``
holds the event's own values (those a log call passes besides its format:
a queue id, a client, a recipient, a status), strings, numbers, booleans
and null as they are, an exception as its message, other objects left out.
An event with a traceback has it in ``traceback`` (the text line writes it
under the line); a legacy event (``twisted.python.log.msg``) has its
``system`` (the text line shows it instead of namespace#level).

Two ways to get it:

* ``[log] format = "json"`` in the config: the server's log (twistd's
  ``--logfile``, or its standard output with ``--nodaemon``) becomes JSON
  lines when the server starts;  the lines twistd writes before that (its
  version, the reactor) stay text;
* ``twistd --logger pymta.logjson.observer ...``: JSON lines on standard
  output from twistd's first line on (``--logfile`` is then not used): the
  way to feed journald, a container's log or a pipe.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Any

from twisted.logger import eventAsText

from pymta.logtext import ClassicTextObserver

__all__ = ["JSONLineObserver", "observer", "LOG_FORMATS"]

#: the values of ``[log] format``
LOG_FORMATS = ("text", "json")

#: keys of legacy (twisted.python.log) events that are metadata, not the event's own values
_LEGACY_KEYS = frozenset(("message", "isError", "system", "time", "format", "why", "failure", "printed"))


def _json_value(value: Any) -> Any:
    """A value as JSON can hold it, or ``_SKIP``."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, BaseException):
        return str(value)
    return _SKIP


_SKIP = object()


class JSONLineObserver(ClassicTextObserver):
    """Writes events as JSON objects, one a line (the module docstring lists the fields)."""

    def format(self, event: dict) -> str | None:
        failure = event.get("log_failure")
        text = self._text(event)
        if not text and failure is None:
            return None
        level = event.get("log_level")
        when = event.get("log_time")
        record: dict[str, Any] = {
            "time": self._timestamp(when) if when is not None else None,
            "level": level.name if level is not None else "info",
            "namespace": event.get("log_namespace"),
            "text": text,
        }
        if "log_system" in event:
            record["system"] = event["log_system"]
        if failure is not None:
            try:
                record["traceback"] = failure.getTraceback()
            except Exception:
                record["traceback"] = repr(failure)
        fields = {}
        for key, value in event.items():
            if key.startswith("log_") or key in _LEGACY_KEYS:
                continue
            value = _json_value(value)
            if value is not _SKIP:
                fields[key] = value
        if fields:
            record["fields"] = fields
        return json.dumps(record, ensure_ascii=False, separators=(", ", ": "), default=str) + "\n"

    @staticmethod
    def _text(event: dict) -> str:
        fmt = event.get("log_format")
        if fmt is not None and "log_system" not in event:
            try:
                return fmt.format_map(event)
            except Exception:     # a format only Twisted's formatter applies, or a broken one
                pass
        return eventAsText(event, includeTraceback=False, includeTimestamp=False,
                           includeSystem=False)


def observer(out_file: IO[Any] | None = None) -> JSONLineObserver:
    """The observer factory for ``twistd --logger pymta.logjson.observer``: JSON on stdout."""
    out = sys.stdout if out_file is None else out_file
    return JSONLineObserver(out, lambda event: None)
