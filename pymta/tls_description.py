"""How pymta describes an established TLS session, on either side of it.

The server keeps :func:`describe`'s dict on the session (the Received:
field's ``(using TLSv1.3 with cipher ...)`` and the log), the relay client
the same words (:func:`as_text`) for the connection it made.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def describe(connection: Any) -> dict[str, str]:
    """{"version": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"} for an established connection."""
    try:
        return {"version": connection.get_protocol_version_name(),
                "cipher": connection.get_cipher_name() or "unknown"}
    except Exception:
        return {"version": "TLS", "cipher": "unknown"}


def as_text(description: Mapping[str, str]) -> str:
    """ "TLSv1.3 with cipher TLS_AES_256_GCM_SHA384" for a :func:`describe` dict."""
    return f"{description.get('version', 'TLS')} with cipher {description.get('cipher', 'unknown')}"
