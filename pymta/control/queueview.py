"""What ``pymta queue`` shows of queued messages, and which ones a selection picks.

Pure functions over :class:`pymta.envelope.Envelope`: no Twisted, no files.
The running server (:mod:`pymta.control.service`) and the offline reader
(:mod:`pymta.control.offline`) both turn envelopes into the same rows;
the CLI formats them (text like ``mailq``, or JSON).

A message row is a dict with ``id``, ``arrival`` (unix time), ``size``,
``sender``, ``state`` and ``held`` (the reason, or ""); a recipient row has
``id`` (its message), ``address``, ``original``, ``route``, ``state``,
``attempts``, ``next_try`` (unix time, 0 = as soon as possible) and
``last_result``.

A message is **held** (never delivered nor expired until released),
**active** (a delivery of it is in flight), **deferred** (a recipient
waits for its retry after a failed attempt) or **queued** (waiting for its
first attempt).  A recipient is ``delivered``, ``failed``, ``active``,
``deferred`` or ``queued`` in the same sense.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

from pymta.addresses import domain_key
from pymta.envelope import DELIVERED, FAILED, PENDING, Envelope, Recipient

HELD = "held"
ACTIVE = "active"
DEFERRED = "deferred"
QUEUED = "queued"
MESSAGE_STATES = (HELD, ACTIVE, DEFERRED, QUEUED)

#: longest last result carried per recipient row (an AMP value holds at most 64 KiB)
RESULT_LIMIT = 1000


def recipient_state(recipient: Recipient, in_flight: bool) -> str:
    if recipient.state == DELIVERED:
        return "delivered"
    if recipient.state == FAILED:
        return "failed"
    if in_flight:
        return ACTIVE
    return DEFERRED if recipient.attempts else QUEUED


def message_state(envelope: Envelope, busy: Collection[int]) -> str:
    """held, active, deferred or queued (see the module docstring)."""
    if envelope.held:
        return HELD
    if busy:
        return ACTIVE
    if any(r.state == PENDING and r.attempts for r in envelope.recipients):
        return DEFERRED
    return QUEUED


def message_row(envelope: Envelope, busy: Collection[int] = ()) -> dict[str, Any]:
    return {"id": envelope.queue_id, "arrival": envelope.received_at, "size": envelope.size,
            "sender": envelope.sender, "state": message_state(envelope, busy),
            "held": envelope.held or ""}


def recipient_rows(envelope: Envelope, busy: Collection[int] = ()) -> list[dict[str, Any]]:
    return [{"id": envelope.queue_id, "address": r.address, "original": r.original or r.address,
             "route": r.route, "state": recipient_state(r, i in busy), "attempts": r.attempts,
             "next_try": r.next_attempt if r.state == PENDING else 0.0,
             "last_result": (r.last_result or "")[:RESULT_LIMIT]}
            for i, r in enumerate(envelope.recipients)]


def details(envelope: Envelope) -> dict[str, Any]:
    """What ``show`` adds to the listing: where the message came from, its DSN parameters."""
    return {"client_ip": envelope.client_ip, "client_name": envelope.client_name,
            "helo": envelope.helo, "protocol": envelope.protocol, "auth": envelope.auth or "",
            "body": envelope.body or "", "smtputf8": envelope.smtputf8, "ret": envelope.ret or "",
            "envid": envelope.envid or "", "notification": envelope.notification or ""}


def format_details(row: dict[str, Any]) -> str:
    """``show``'s envelope lines (those with something to say)."""
    client = f"client: {row['client_name']}[{row['client_ip']}]" if row["client_ip"] \
        else f"client: {row['client_name']}"
    client += f", helo=<{row['helo']}>, protocol={row['protocol']}"
    if row["auth"]:
        client += f", auth={row['auth']}"
    lines = [client]
    params = [f"{key}={row[key]}" for key in ("body", "ret", "envid") if row[key]]
    if row["smtputf8"]:
        params.append("smtputf8")
    if params:
        lines.append("parameters: " + " ".join(params))
    if row["notification"]:
        lines.append(f"notification: {row['notification']} (made by pymta)")
    return "".join(line + "\n" for line in lines)


# -- selections ---------------------------------------------------------------------

@dataclass(frozen=True)
class QueueFilter:
    """The list filters: every one given must match (an empty filter matches all)."""
    sender: str | None = None
    #: a recipient address (as delivered to, or as given at RCPT)
    rcpt: str | None = None
    #: a recipient domain; "@domain" also takes its subdomains (as ETRN)
    domain: str | None = None
    held: bool = False
    deferred: bool = False

    @property
    def empty(self) -> bool:
        return not (self.sender is not None or self.rcpt is not None or self.domain is not None
                    or self.held or self.deferred)

    def matches(self, envelope: Envelope, busy: Collection[int] = ()) -> bool:
        if self.sender is not None and envelope.sender.lower() != self.sender.lower():
            return False
        if self.held and not envelope.held:
            return False
        if self.deferred and message_state(envelope, busy) != DEFERRED:
            return False
        if self.rcpt is not None:
            wanted = self.rcpt.lower()
            if not any(wanted in (r.address.lower(), (r.original or "").lower())
                       for r in envelope.recipients):
                return False
        if self.domain is not None:
            match = _domain_matcher(self.domain)
            if not any(match(r.address) for r in envelope.recipients):
                return False
        return True


def _domain_matcher(domain: str):
    subdomains = domain.startswith("@")
    try:
        wanted = domain_key(domain.lstrip("@"))
    except ValueError:
        wanted = domain.lstrip("@").lower()

    def match(address: str) -> bool:
        got = address.rpartition("@")[2]
        try:
            got = domain_key(got)
        except ValueError:
            got = got.lower()
        return got == wanted or (subdomains and got.endswith("." + wanted))
    return match


# -- the summary and the text ---------------------------------------------------------

def summary(messages: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """Counts by state, bytes and the oldest message's age (seconds) of the rows."""
    counts = {state: 0 for state in MESSAGE_STATES}
    for row in messages:
        counts[row["state"]] = counts.get(row["state"], 0) + 1
    oldest = min((row["arrival"] for row in messages), default=None)
    return {"messages": len(messages), **counts, "bytes": sum(row["size"] for row in messages),
            "oldest_age": max(0.0, now - oldest) if oldest is not None else 0.0}


def format_age(seconds: float) -> str:
    """A short age: 45s, 12m, 3.5h, 2.1d."""
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h".replace(".0h", "h")
    return f"{seconds / 86400:.1f}d".replace(".0d", "d")


def format_time(when: float) -> str:
    return datetime.datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M:%S")


def summary_line(total: dict[str, Any]) -> str:
    if not total["messages"]:
        return "-- queue empty"
    states = ", ".join(f"{total[s]} {s}" for s in MESSAGE_STATES if total[s])
    plural = "" if total["messages"] == 1 else "s"
    return (f"-- {total['messages']} message{plural} ({states}), {total['bytes']} bytes, "
            f"oldest {format_age(total['oldest_age'])}")


def _recipient_line(row: dict[str, Any], now: float) -> str:
    parts = [row["state"]]
    if row["attempts"]:
        parts.append(f"{row['attempts']} attempt{'' if row['attempts'] == 1 else 's'}")
    if row["state"] in (DEFERRED, QUEUED):
        due = row["next_try"]
        parts.append("next try now" if due <= now else f"next try {format_time(due)}")
    line = f"    {row['address']}  " + ", ".join(parts)
    if row["last_result"] and row["state"] != "delivered":
        line += f"\n        ({row['last_result']})"
    return line


def format_text(messages: list[dict[str, Any]], recipients: Iterable[dict[str, Any]],
                now: float) -> str:
    """The ``mailq``-like listing, ending with the summary line."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for row in recipients:
        by_id.setdefault(row["id"], []).append(row)
    lines = []
    if messages:
        lines.append(f"{'Queue ID':<20} {'Size':>9}  {'Arrival':<19}  State     Sender/Recipients")
    for row in messages:
        state = row["state"]
        lines.append(f"{row['id']:<20} {row['size']:>9}  {format_time(row['arrival'])}  "
                     f"{state:<8}  <{row['sender']}>")
        if row["held"]:
            lines.append(f"    held: {row['held']}")
        lines.extend(_recipient_line(r, now) for r in by_id.get(row["id"], ()))
    lines.append(summary_line(summary(messages, now)))
    return "\n".join(lines) + "\n"


def format_json(messages: list[dict[str, Any]], recipients: Iterable[dict[str, Any]],
                now: float) -> str:
    """The listing as one JSON object: ``{"messages": [...], "summary": {...}}``."""
    by_id: dict[str, list[dict[str, Any]]] = {}
    for row in recipients:
        by_id.setdefault(row["id"], []).append({k: v for k, v in row.items() if k != "id"})
    out = [{**row, "recipients": by_id.get(row["id"], [])} for row in messages]
    return json.dumps({"messages": out, "summary": summary(messages, now)}, indent=2,
                      ensure_ascii=False) + "\n"
