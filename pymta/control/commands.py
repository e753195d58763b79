"""The control socket's AMP commands, their typed arguments and errors.

Both sides import this module: :mod:`pymta.control.service` answers the
commands, :mod:`pymta.control.client` sends them.  An AMP value holds at
most 65,535 bytes, so a listing comes in pages (:func:`page`) and a
message's content in chunks (:data:`CHUNK_BYTES`).

A selection (:data:`SELECTION`) names messages by id (each must be in the
queue, or the command fails with :class:`NoSuchMessage` and changes
nothing), or takes every message (``all``) or those matching the list
filters.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.protocols import amp

from pymta.control.queueview import QueueFilter, message_row, recipient_rows

#: bytes of message content per ReadMessage answer
CHUNK_BYTES = 60000
#: bytes of rows per ListQueue answer (each list must stay under AMP's 64 KiB per value)
PAGE_BYTES = 60000


class NoSuchMessage(Exception):
    """No message of that id is in the queue (the text is the id)."""


class BadSelection(Exception):
    """The selection cannot be carried out as given (the text says why)."""


FILTERS = [
    (b"sender", amp.Unicode(optional=True)),
    (b"rcpt", amp.Unicode(optional=True)),
    (b"domain", amp.Unicode(optional=True)),
    (b"held", amp.Boolean(optional=True)),
    (b"deferred", amp.Boolean(optional=True)),
]
SELECTION = [(b"ids", amp.ListOf(amp.Unicode())), (b"all", amp.Boolean())] + FILTERS

MESSAGE_FIELDS = [(b"id", amp.Unicode()), (b"arrival", amp.Float()), (b"size", amp.Integer()),
                  (b"sender", amp.Unicode()), (b"state", amp.Unicode()), (b"held", amp.Unicode())]
RECIPIENT_FIELDS = [(b"id", amp.Unicode()), (b"address", amp.Unicode()),
                    (b"original", amp.Unicode()), (b"route", amp.Unicode()),
                    (b"state", amp.Unicode()), (b"attempts", amp.Integer()),
                    (b"next_try", amp.Float()), (b"last_result", amp.Unicode())]

#: what a change answers: how many messages it changed, and a note for each it
#: changed in a particular way or could not change (at most NOTES_LIMIT)
CHANGE_RESPONSE = [(b"changed", amp.Integer()),
                   (b"notes", amp.AmpList([(b"id", amp.Unicode()), (b"note", amp.Unicode())])),
                   (b"more_notes", amp.Integer())]
NOTES_LIMIT = 300
ERRORS = {NoSuchMessage: b"NO_SUCH_MESSAGE", BadSelection: b"BAD_SELECTION"}


class ListQueue(amp.Command):
    """One page of the listing: the messages matching the filters (or ``queue_id``)."""
    arguments = [(b"queue_id", amp.Unicode(optional=True)), *FILTERS,
                 (b"after", amp.Unicode(optional=True)), (b"after_index", amp.Integer(optional=True))]
    response = [(b"messages", amp.AmpList(MESSAGE_FIELDS)),
                (b"recipients", amp.AmpList(RECIPIENT_FIELDS)),
                (b"next_id", amp.Unicode(optional=True)), (b"next_index", amp.Integer(optional=True)),
                (b"now", amp.Float())]
    errors = ERRORS


class Details(amp.Command):
    """Where a message came from and its DSN parameters (queueview.details)."""
    arguments = [(b"queue_id", amp.Unicode())]
    response = [(b"client_ip", amp.Unicode()), (b"client_name", amp.Unicode()),
                (b"helo", amp.Unicode()), (b"protocol", amp.Unicode()), (b"auth", amp.Unicode()),
                (b"body", amp.Unicode()), (b"smtputf8", amp.Boolean()), (b"ret", amp.Unicode()),
                (b"envid", amp.Unicode()), (b"notification", amp.Unicode())]
    errors = ERRORS


class ReadMessage(amp.Command):
    """Up to CHUNK_BYTES of a message's content (its prepended headers, then the body)."""
    arguments = [(b"queue_id", amp.Unicode()), (b"offset", amp.Integer())]
    response = [(b"data", amp.String()), (b"total", amp.Integer())]
    errors = ERRORS


class Hold(amp.Command):
    arguments = SELECTION
    response = CHANGE_RESPONSE
    errors = ERRORS


class Release(amp.Command):
    arguments = SELECTION
    response = CHANGE_RESPONSE
    errors = ERRORS


class Delete(amp.Command):
    arguments = SELECTION + [(b"confirmed", amp.Boolean())]
    response = CHANGE_RESPONSE
    errors = ERRORS


class Requeue(amp.Command):
    arguments = SELECTION
    response = CHANGE_RESPONSE
    errors = ERRORS


class Bounce(amp.Command):
    arguments = [(b"ids", amp.ListOf(amp.Unicode())), (b"reason", amp.Unicode(optional=True))]
    response = CHANGE_RESPONSE
    errors = ERRORS


class Flush(amp.Command):
    """Deliver now: the messages ``ids``, the recipients at ``domain``, or everything."""
    arguments = [(b"ids", amp.ListOf(amp.Unicode())), (b"domain", amp.Unicode(optional=True)),
                 (b"all", amp.Boolean())]
    response = CHANGE_RESPONSE
    errors = ERRORS


def queue_filter(arguments: dict[str, Any]) -> QueueFilter:
    """The QueueFilter of a command's filter arguments."""
    return QueueFilter(sender=arguments.get("sender"), rcpt=arguments.get("rcpt"),
                       domain=arguments.get("domain"), held=bool(arguments.get("held")),
                       deferred=bool(arguments.get("deferred")))


# -- paging ----------------------------------------------------------------------------

def _row_bytes(row: dict[str, Any]) -> int:
    """At least the bytes of ``row`` as an AMP box (4 per key and value, 2 to end it)."""
    size = 2
    for key, value in row.items():
        text = value if isinstance(value, str) else repr(value)
        size += 4 + len(key) + len(text.encode("utf-8"))
    return size


def page(entries: Iterable[tuple[Any, Any]], after: str | None, after_index: int,
         budget: int = PAGE_BYTES) -> tuple[list[dict], list[dict], tuple[str, int] | None]:
    """(message rows, recipient rows, where the next page starts or None) from ``after``.

    ``entries`` are (envelope, indices in flight), sorted by id.  The page
    resumes at message ``after``, recipient ``after_index`` (or the next id
    if that message is gone).  A message whose recipients span pages is in
    the message rows of each.
    """
    messages: list[dict] = []
    recipients: list[dict] = []
    used = 0
    for envelope, busy in entries:
        if after is not None and envelope.queue_id < after:
            continue
        start = after_index if envelope.queue_id == after else 0
        row = message_row(envelope, busy)
        cost = _row_bytes(row)
        if messages and used + cost > budget:
            return messages, recipients, (envelope.queue_id, start)
        messages.append(row)
        used += cost
        rows = recipient_rows(envelope, busy)
        for index in range(start, len(rows)):
            cost = _row_bytes(rows[index])
            if used + cost > budget:
                return messages, recipients, (envelope.queue_id, index)
            recipients.append(rows[index])
            used += cost
    return messages, recipients, None
