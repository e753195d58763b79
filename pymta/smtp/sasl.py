"""SASL response decoding for AUTH (RFC 4954): PLAIN (RFC 4616) and LOGIN.

Pure functions beside the machine (as h11 keeps ``_readers.py``); the
exchange itself (334 challenges, ``*`` to cancel, states) is the server's.
They raise :class:`SASLError` with the reply a server should give.
"""

from __future__ import annotations

import binascii
from base64 import b64decode

from pymta.smtp import replies as R

#: LOGIN's challenges: "Username:" and "Password:" in base64
LOGIN_USERNAME = "VXNlcm5hbWU6"
LOGIN_PASSWORD = "UGFzc3dvcmQ6"


class SASLError(ValueError):
    """A malformed response; carries the reply to give (the exchange ends)."""

    def __init__(self, reply: R.Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


def first_challenge(mechanism: str) -> str:
    """The 334 text when AUTH came without an initial response."""
    return "" if mechanism == "PLAIN" else LOGIN_USERNAME


def decode_response(encoded: bytes) -> str:
    """A response line (base64 of UTF-8) → text."""
    try:
        return b64decode(encoded, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise SASLError(R.AUTH_BAD_BASE64) from None


def parse_plain(text: str) -> tuple[str, str, str]:
    """PLAIN's message → (authzid, username, password) (RFC 4616 2)."""
    fields = text.split("\0")
    if len(fields) != 3 or not fields[1]:
        raise SASLError(R.Reply(501, "5.5.2", "Invalid PLAIN response (RFC 4616)"))
    authzid, username, password = fields
    return authzid, username, password


def login_username(text: str) -> str:
    """LOGIN's first response: the user name, not empty."""
    if not text:
        raise SASLError(R.Reply(501, "5.5.2", "Empty user name"))
    return text
