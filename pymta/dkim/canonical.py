"""Streamed DKIM body canonicalization and body hash (RFC 6376 3.4.3, 3.4.4, 3.7).

dkimpy canonicalizes a body with regular expressions over the whole body at
once; :class:`BodyCanonicalizer` gives the same bytes fed piece by piece, so
that a body of any size is hashed in short steps (each a few milliseconds of
C code) that never hold the GIL for long.  Line ends: a bare LF counts as
CRLF, as in dkimpy (the spool holds CRLF only anyway).
"""

from __future__ import annotations

import base64
import hashlib
import re

__all__ = ["BodyCanonicalizer", "BodyHash", "CANONICALIZATIONS", "HASHES"]

CANONICALIZATIONS = ("simple", "relaxed")
#: DKIM a= hash names -> hashlib names
HASHES = {"sha256": "sha256", "sha1": "sha1"}

_TRAILING_WSP = re.compile(rb"[\t ]+\r\n")
_WSP_RUN = re.compile(rb"[\t ]+")
_BARE_LF = re.compile(rb"(?<!\r)\n")
CRLF = b"\r\n"


class BodyCanonicalizer:
    """Feed the body in pieces with :meth:`feed`; each call returns canonical bytes."""

    def __init__(self, method: str) -> None:
        if method not in CANONICALIZATIONS:
            raise ValueError(f"unknown body canonicalization {method!r}")
        self.relaxed = method == "relaxed"
        self._carry = b""          # the incomplete last line so far
        self._empty_lines = 0      # empty lines held back (dropped if nothing follows)
        self._emitted = False

    def feed(self, data: bytes) -> bytes:
        buffer = self._carry + data
        end = buffer.rfind(b"\n") + 1
        if not end:
            self._carry = buffer
            return b""
        self._carry = buffer[end:]
        return self._lines(buffer[:end])

    def _lines(self, lines: bytes) -> bytes:
        """Whole lines (ending in LF) in canonical form, trailing empty lines held back."""
        if lines.count(b"\n") != lines.count(CRLF):
            lines = _BARE_LF.sub(CRLF, lines)
        if self.relaxed:
            lines = _WSP_RUN.sub(b" ", _TRAILING_WSP.sub(CRLF, lines))
        run = len(lines) - len(lines.rstrip(CRLF))
        pairs = run // 2
        while pairs and lines[len(lines) - 2 * pairs:] != CRLF * pairs:
            pairs -= 1            # a bare CR among the line ends
        if 2 * pairs == len(lines):           # only empty lines
            self._empty_lines += pairs
            return b""
        out = CRLF * self._empty_lines + lines[:len(lines) - 2 * pairs + 2]
        self._empty_lines = pairs - 1
        self._emitted = True
        return out

    def end(self) -> bytes:
        """The rest: the last line (given a CRLF if it had none), or the empty body."""
        carry, self._carry = self._carry, b""
        if carry:
            if self.relaxed:
                carry = _WSP_RUN.sub(b" ", carry)
            self._emitted = True
            return CRLF * self._empty_lines + carry + CRLF
        if self._emitted or self.relaxed:
            return b""
        return CRLF                         # simple: an empty body is one CRLF


class BodyHash:
    """The ``bh=`` value of one (canonicalization, hash, length limit) over a fed body."""

    def __init__(self, canonicalization: str, hash_name: str = "sha256",
                 limit: int | None = None) -> None:
        if hash_name not in HASHES:
            raise ValueError(f"unknown hash {hash_name!r}")
        self.canonicalizer = BodyCanonicalizer(canonicalization)
        self._hash = hashlib.new(HASHES[hash_name])
        self.limit = limit
        #: octets of canonical body hashed so far
        self.length = 0

    def _take(self, data: bytes) -> None:
        if self.limit is not None:
            data = data[:max(self.limit - self.length, 0)]
        self.length += len(data)
        if data:
            self._hash.update(data)

    def feed(self, data: bytes) -> None:
        self._take(self.canonicalizer.feed(data))

    def digest(self) -> bytes:
        self._take(self.canonicalizer.end())
        return self._hash.digest()

    def b64digest(self) -> bytes:
        return base64.b64encode(self.digest())
