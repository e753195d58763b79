"""Delivery status notifications (RFC 3464): the bytes of a multipart/report message.

One notification covers one message and any number of its recipients, all
with the same action: ``failed`` (a bounce), ``delayed`` (a warning),
``delivered`` or ``relayed`` (success, RFC 3461 NOTIFY=SUCCESS).  It has
three parts:

1. a text/plain explanation for humans, listing each recipient and why;
2. ``message/delivery-status``: the per-message fields (Reporting-MTA,
   Original-Envelope-Id, Arrival-Date) and per recipient Final-Recipient,
   Original-Recipient, Action, Status, Remote-MTA, Diagnostic-Code,
   Last-Attempt-Date (and Will-Retry-Until for a delay);
3. the original message (``message/rfc822``) or only its header section
   (``text/rfc822-headers``), as RET asks (RFC 3461 4.3); a bounce of a
   message larger than the return limit carries the headers only.

A message received with SMTPUTF8 is reported with the RFC 6533 types
(``message/global-delivery-status``, ``message/global``,
``message/global-headers``) and ``utf-8`` address types.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from email.utils import formatdate
from typing import BinaryIO

from pymta.envelope import Envelope, Recipient
from pymta.spool.message import open_body_file

FAILED = "failed"
DELAYED = "delayed"
DELIVERED = "delivered"
RELAYED = "relayed"

#: most octets of the original message returned in a bounce (Postfix: bounce_size_limit)
RETURN_SIZE_LIMIT = 50_000
#: most octets of the original header section returned
HEADER_SIZE_LIMIT = 64 * 1024

_SUBJECTS = {
    FAILED: "Undelivered Mail Returned to Sender",
    DELAYED: "Delayed Mail (still being retried)",
    DELIVERED: "Successful Mail Delivery Report",
    RELAYED: "Successful Mail Delivery Report",
}


@dataclass(frozen=True)
class Report:
    """A composed notification: its bytes and what the envelope needs to know."""
    content: bytes
    #: the content has octets above 127 (BODY=8BITMIME)
    eight_bit: bool
    #: the message needs SMTPUTF8 (non-ASCII addresses in it)
    smtputf8: bool


def _clean(text: str) -> str:
    """One header-safe line: no CR, LF or other control characters."""
    return "".join(" " if (ord(c) < 32 and c != "\t") or ord(c) == 127 else c for c in text)


def _address_field(address: str, utf8: bool) -> str:
    address = _clean(address)
    if address.isascii():
        return f"rfc822; {address}"
    return f"utf-8; {address}" if utf8 else f"rfc822; {address.encode('ascii', 'backslashreplace').decode()}"


def _status(recipient: Recipient, action: str) -> str:
    """The RFC 3463 code of a recipient's last result, in the class the action needs."""
    parts = (recipient.last_result or "").split(" ", 2)
    enhanced = parts[1] if len(parts) > 1 and parts[1][:1] in "245" and parts[1].count(".") == 2 else ""
    if action in (DELIVERED, RELAYED):
        return enhanced if enhanced.startswith("2") else "2.0.0"
    if action == DELAYED:
        return "4" + enhanced[1:] if enhanced else "4.0.0"
    return "5" + enhanced[1:] if enhanced else "5.0.0"


def _reason(recipient: Recipient) -> str:
    parts = (recipient.last_result or "").split(" ", 2)
    if len(parts) == 3 and parts[0].isdigit():
        return _clean(parts[2])
    return _clean(recipient.last_result or "no details")


def _diagnostic(recipient: Recipient) -> str | None:
    if recipient.diagnostic:
        return _clean(recipient.diagnostic)
    if recipient.last_result:
        return f"X-Pymta; {_clean(recipient.last_result)}"
    return None


def _read_header_section(prepend: bytes, body: BinaryIO) -> bytes:
    """The original's header section: the prepended fields and the body's up to the blank line."""
    out = bytearray(prepend)
    read = 0
    while read < HEADER_SIZE_LIMIT:
        line = body.readline(HEADER_SIZE_LIMIT - read)
        if not line or line in (b"\r\n", b"\n"):
            break
        read += len(line)
        out += line
    return bytes(out)


def _human_part(action: str, hostname: str, envelope: Envelope, recipients: list[Recipient],
                now: float, lifetime: float | None) -> str:
    lines = [f"This is the mail system at host {hostname}.", ""]
    if action == FAILED:
        lines += ["I'm sorry to have to inform you that your message could not",
                  "be delivered to one or more recipients. It's attached below.", "",
                  "For further assistance, please send mail to postmaster.", "",
                  "If you do so, please include this problem report. You can",
                  "delete your own text from the attached returned message."]
    elif action == DELAYED:
        hours = max(0.0, now - envelope.received_at) / 3600
        lines += ["####################################################################",
                  "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
                  "####################################################################", "",
                  f"Your message could not be delivered for {hours:.1f} hours."]
        if lifetime:
            lines.append(f"It will be retried until it is {lifetime / 86400:.1f} days old.")
    else:
        lines += ["Your message was successfully delivered to the destination(s)",
                  "listed below. If the message was delivered to mailbox you will",
                  "receive no further notifications. Otherwise you may still receive",
                  "notifications of mail delivery errors from other systems."]
    lines += ["", "                   The mail system", ""]
    for recipient in recipients:
        what = _reason(recipient)
        if action in (DELIVERED, RELAYED):
            what = "delivered to mailbox" if action == DELIVERED else "delivery via " \
                f"{recipient.remote_mta or 'the next hop'}: {what}"
        lines.append(f"<{_clean(recipient.address)}>: {what}")
    return "\r\n".join(lines) + "\r\n"


def _status_part(action: str, hostname: str, envelope: Envelope, recipients: list[Recipient],
                 now: float, lifetime: float | None, utf8: bool) -> str:
    fields = [f"Reporting-MTA: dns; {hostname}", f"X-Pymta-Queue-ID: {envelope.queue_id}"]
    if envelope.sender:
        fields.append(f"X-Pymta-Sender: {_address_field(envelope.sender, utf8)}")
    if envelope.envid:
        fields.append(f"Original-Envelope-Id: {_clean(envelope.envid)}")
    fields.append(f"Arrival-Date: {formatdate(envelope.received_at)}")
    blocks = ["\r\n".join(fields)]
    for recipient in recipients:
        lines = [f"Final-Recipient: {_address_field(recipient.address, utf8)}"]
        if recipient.orcpt:
            addr_type, _, address = recipient.orcpt.partition(";")
            lines.append(f"Original-Recipient: {_clean(addr_type)}; {_clean(address)}")
        elif recipient.original and recipient.original != recipient.address \
                and "@" in recipient.original:
            lines.append(f"Original-Recipient: {_address_field(recipient.original, utf8)}")
        lines += [f"Action: {action}", f"Status: {_status(recipient, action)}"]
        if recipient.remote_mta:
            lines.append(f"Remote-MTA: dns; {_clean(recipient.remote_mta)}")
        diagnostic = _diagnostic(recipient)
        if diagnostic and action not in (DELIVERED,):
            lines.append(f"Diagnostic-Code: {diagnostic}")
        attempt = recipient.finished_at if recipient.finished_at else now
        lines.append(f"Last-Attempt-Date: {formatdate(attempt)}")
        if action == DELAYED and lifetime:
            lines.append(f"Will-Retry-Until: {formatdate(envelope.received_at + lifetime)}")
        blocks.append("\r\n".join(lines))
    return "\r\n\r\n".join(blocks) + "\r\n"


def compose(*, action: str, hostname: str, envelope: Envelope, recipients: list[Recipient],
            prepend: bytes, body_path: str, to: str, now: float, lifetime: float | None = None,
            body_size: int | None = None,
            full: bool = False, return_limit: int = RETURN_SIZE_LIMIT,
            postmaster_copy: bool = False) -> Report:
    """The notification ``action`` about ``recipients`` of ``envelope``, addressed to ``to``.

    ``full`` asks for the whole original (a bounce without RET=HDRS); it is
    returned when it is at most ``return_limit`` octets, else only its
    header section.  ``body_size``: the body is that many bytes from the
    start of ``body_path`` (a spool file holds the envelope after it); None:
    the whole file.
    """
    utf8 = envelope.smtputf8 or not to.isascii() or not envelope.sender.isascii() \
        or not all(r.address.isascii() and r.original.isascii() for r in recipients)
    boundary = f"{envelope.queue_id}.{uuid.uuid4().hex}/{hostname}"
    if body_size is None:
        body_size = os.path.getsize(body_path)
    size = len(prepend) + body_size
    whole = full and size <= return_limit
    with open_body_file(body_path, body_size) as fp:
        original = prepend + fp.read() if whole else _read_header_section(prepend, fp)
    if whole:
        original_type = "message/global" if envelope.smtputf8 else "message/rfc822"
        description = "Undelivered Message" if action == FAILED else "Message"
    else:
        original_type = "message/global-headers" if envelope.smtputf8 else "text/rfc822-headers"
        description = "Undelivered Message Headers" if action == FAILED else "Message Headers"
    if not original.endswith(b"\n"):
        original += b"\r\n"
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    subject = _SUBJECTS[action]
    if postmaster_copy:
        subject = f"Postmaster Copy: {subject}"
    human = _human_part(action, hostname, envelope, recipients, now, lifetime)
    if full and not whole:
        human += (f"\r\nThe message was {size} octets, more than the {return_limit} returned: "
                  "only its header section is attached.\r\n")
    status = _status_part(action, hostname, envelope, recipients, now, lifetime, utf8)
    eight_bit = not original.isascii() or not (human + status).isascii()
    head = [
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)",
        f"To: {_clean(to)}",
        f"Subject: {subject}",
        f"Date: {formatdate(now)}",
        f"Message-ID: <{envelope.queue_id}.{int(now)}.{action}@{hostname}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f"Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"",
        f"Content-Transfer-Encoding: {'8bit' if eight_bit else '7bit'}",
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "",
    ]
    parts = [
        "\r\n".join(head) + "\r\n" + human,
        "\r\n".join(["", f"--{boundary}", "Content-Description: Delivery report",
                     f"Content-Type: {status_type}", "", ""]) + status,
        "\r\n".join(["", f"--{boundary}", f"Content-Description: {description}",
                     f"Content-Type: {original_type}", "", ""]),
    ]
    content = "".join(parts).encode("utf-8") + original + f"\r\n--{boundary}--\r\n".encode()
    return Report(content, eight_bit, utf8)
