"""Message content framing: the DATA terminator scan and line discipline.

Bodies are read in raw chunks and scanned with C-level bytes methods; they are
never split into Python lines on the hot path (a chunk of CRLF lines without
NUL costs a few ``bytes.find``/``count`` calls).  The rules, for both modes of
``[limits] bare_newlines``:

- Only ``CRLF "." CRLF`` ends DATA, where the CRLF before the dot is a real
  CRLF in the content the client sent.  The line end of the DATA command
  counts as one, whatever it was (under "normalize" it may be a bare LF, and
  Postfix 3.9 too reads ``DATA LF "." CRLF`` as an empty message): an
  immediate ``.`` CRLF is an empty message.  Within the content a bare CR or
  LF never takes part in the end of data, whatever the mode: ``LF "." LF``,
  ``CRLF "." LF``, ``LF "." CRLF``, ``CR "." CRLF`` and ``CRLF "." CR`` do
  not end DATA (no SMTP smuggling).

- ``"reject"``: a bare CR or LF, or a NUL, anywhere in the content makes the
  server refuse the message at its end (``550 5.6.11``, ``550 5.6.0``).

- ``"normalize"`` (as Postfix 3.9's ``smtpd_forbid_bare_newline = normalize``):
  a bare LF, and a bare CR too (Postfix keeps a bare CR inside the line), is
  a line end exactly as if the client had sent CRLF, for dot-unstuffing too: ``LF ".." LF`` is stored as ``CRLF "." CRLF``,
  and ``LF ".x"`` as ``CRLF "x"``.  A line of a single dot that is not the end
  of data (one of its two line ends is bare: ``LF "." LF``, ``LF "." CRLF``,
  ``CRLF "." LF``, ``CR "." CRLF`` …) is neither the end nor content: it is
  dropped, as Postfix drops it (a client that means a line "." sends "..").
  NUL octets are removed from the content (after dot-unstuffing, so the line
  ``NUL "."`` is stored as the line ".", which a relay sends as ".." again).
  What is stored, and therefore relayed, has CRLF line ends only.

- BDAT content is not dot-stuffed: only the line end rules and NUL apply.

(Command lines are read by the server machine: under "normalize" a bare LF
ends one too, a bare CR never does.)

The SIZE limit counts the stored octets (with CRLF line ends) plus every octet
normalization removed (dropped dot lines, NULs), so removing content never lets
a client send more.
"""

from __future__ import annotations

MAX_TEXT_LINE = 998   # octets of text before CRLF (RFC 5321 4.5.3.1.6: 1000 with CRLF)
_TERMINATOR = b"\r\n.\r\n"
_LONE_DOT = b"\r\n.\r\n"


def _to_crlf(data: bytes) -> bytes:
    """Every bare CR and bare LF becomes CRLF (a CR at the end counts as bare)."""
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _has_bare(data: bytes, crlf: int) -> bool:
    return data.count(b"\r") != crlf or data.count(b"\n") != crlf


class LineChecker:
    """Streams body bytes through the line rules; arbitrary chunk splits give the same result.

    ``bare_newlines``: "reject" records a violation (the caller refuses the
    message at its end); "normalize" rewrites a bare CR or LF to CRLF and
    removes NUL octets.
    """

    __slots__ = ("normalize", "crlf_only", "bare", "nul", "too_long", "removed", "_line", "_cr")

    def __init__(self, bare_newlines: str = "reject", crlf_only: bool = False) -> None:
        self.normalize = bare_newlines == "normalize"
        # the input is known to have CRLF line ends only (a normalizing
        # DataReader's output): the bare line end check is skipped
        self.crlf_only = crlf_only
        self.bare = False          # a bare CR or LF was seen
        self.nul = False           # a NUL octet was seen
        self.too_long = False      # a line over MAX_TEXT_LINE octets was seen
        self.removed = 0           # octets removed (NULs, in normalize mode)
        self._line = 0             # length of the current (unfinished) line
        self._cr = False           # the previous chunk ended with CR (held back)

    def feed(self, data: bytes) -> bytes:
        if self._cr:
            data = b"\r" + data
            self._cr = False
        if data.endswith(b"\r"):
            data = data[:-1]
            self._cr = True
        if not data:
            return b""
        if not self.crlf_only and _has_bare(data, data.count(b"\r\n")):
            self.bare = True
            if self.normalize:
                data = _to_crlf(data)
        if b"\x00" in data:
            self.nul = True
            if self.normalize:
                size = len(data)
                data = data.replace(b"\x00", b"")
                self.removed += size - len(data)
                if not data:
                    return b""
        if not self.too_long:
            first = data.find(b"\r\n")
            if first < 0:
                self._line += len(data)
            else:
                final = data.rfind(b"\r\n")
                last = len(data) - final - 2
                longest = self._line + first
                if final != first and len(data) - first - last - 4 > MAX_TEXT_LINE:
                    longest = max(longest, max(map(len, data[first + 2:len(data) - last - 2].split(b"\r\n"))))
                self._line = last
                if longest > MAX_TEXT_LINE:
                    self.too_long = True
            if self._line > MAX_TEXT_LINE:
                self.too_long = True
        return data

    def finish(self) -> bytes:
        """End of content: a held-back CR is bare."""
        if self._cr:
            self._cr = False
            self.bare = True
            return b"\r\n" if self.normalize else b"\r"
        return b""


class DataReader:
    """Consumes DATA content up to ``CRLF . CRLF``, undoing dot-stuffing.

    ``feed(buffer)`` returns ``(content, consumed, done)``: unstuffed content
    ready to store, how many bytes of ``buffer`` were used, and whether the
    terminator was reached.  Unused bytes stay with the caller (after the
    terminator they are the next pipelined command).

    With ``normalize`` a bare CR or LF is a line end for dot-unstuffing and
    the content comes out with CRLF line ends only (see the module
    docstring); ``removed`` counts the octets of dropped lone-dot lines.
    Without it only CRLF ends a line and bare ones pass through unchanged
    (for the LineChecker to flag).
    """

    __slots__ = ("normalize", "removed", "_ctx")

    def __init__(self, bare_newlines: str = "reject") -> None:
        self.normalize = bare_newlines == "normalize"
        self.removed = 0
        # the line end before the caller's buffer, already emitted: DATA starts
        # at the beginning of a line, as if just after a CRLF.  With normalize
        # a bare line end is kept as b"\n" (a bare CR too: it is passed on only
        # once the next byte is known not to be LF)
        self._ctx = b"\r\n"

    def feed(self, buf: bytes) -> tuple[bytes, int, bool]:
        ctx = self._ctx
        off = len(ctx)
        data = ctx + buf if ctx else buf
        end = data.find(_TERMINATOR)
        if end >= 0:
            self._ctx = b""
            return self._unstuff(data[:end + 2], off), end + 5 - off, True
        if self.normalize:
            # the end of the last line end of any kind; a CR at the very end
            # may be the first half of a CRLF and waits
            cut = max(data.rfind(b"\n"), data.rfind(b"\r", 0, len(data) - 1)) + 1
        else:
            cut = data.rfind(b"\r\n") + 2
            if cut == 1:
                cut = 0
        if cut <= off:
            # no complete line in the new bytes: emit all but a trailing CR
            # (or wait for more if the only line break is the context one)
            if cut > 0 and len(data) - cut <= MAX_TEXT_LINE:
                return b"", 0, False
            keep = 1 if data.endswith(b"\r") else 0
            self._ctx = b""
            return self._unstuff(data[:len(data) - keep], off), len(buf) - keep, False
        # keep the line end as context: the next byte may start a "." line
        self._ctx = b"\r\n" if cut >= 2 and data.startswith(b"\r\n", cut - 2) else b"\n"
        return self._unstuff(data[:cut], off), cut - off, False

    def _unstuff(self, content: bytes, off: int) -> bytes:
        """``content`` less its first ``off`` bytes (the context), unstuffed."""
        if self.normalize:
            crlf = content.count(b"\r\n")
            if _has_bare(content, crlf):
                content = _to_crlf(content)
                off = 2 if off else 0
                if _LONE_DOT in content:
                    # a dot line next to a bare line end: not the end, not content.
                    # Consecutive ones overlap in their line ends: repeat.
                    size = len(content)
                    while _LONE_DOT in content:
                        content = content.replace(_LONE_DOT, b"\r\n")
                    self.removed += size - len(content)
        if b"\r\n." in content:
            content = content.replace(b"\r\n.", b"\r\n")
        return content[off:]
