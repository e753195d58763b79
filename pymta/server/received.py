"""The Received: trace field we prepend to each accepted message (RFC 5321 4.4)."""

from __future__ import annotations

from email.utils import formatdate

from pymta import tls_description
from pymta.session import Session


def with_protocol(session: Session, smtputf8: bool) -> str:
    """RFC 3848 / RFC 6531 "with" keyword."""
    if not session.esmtp:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if session.tls else "") + ("A" if session.auth_user else "")


def received_header(session: Session, hostname: str, queue_id: str, recipients: list[str],
                    smtputf8: bool, when: float) -> str:
    helo = session.helo or "unknown"
    literal = f"IPv6:{session.client_ip}" if ":" in session.client_ip else session.client_ip
    lines = [f"Received: from {helo} ({session.client_name} [{literal}])"]
    if session.tls:
        lines.append(f"\t(using {tls_description.as_text(session.tls)})")
    if session.auth_user:
        lines.append(f"\t(Authenticated sender: {session.auth_user})")
    by = f"\tby {hostname} (pymta) with {with_protocol(session, smtputf8)} id {queue_id}"
    if len(recipients) == 1:
        lines.append(by)
        lines.append(f"\tfor <{recipients[0]}>; {formatdate(when)}")
    else:
        lines.append(f"{by}; {formatdate(when)}")
    return "\r\n".join(lines) + "\r\n"
