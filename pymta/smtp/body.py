"""Message content framing: the DATA terminator scan and line discipline.

Bodies are read in raw chunks and scanned with C-level bytes methods; they are
never split into Python lines on the hot path.  Only ``CRLF "." CRLF`` ends
DATA: a bare CR or LF never does (no SMTP smuggling), whatever the policy for
bare line ends.
"""

from __future__ import annotations

MAX_TEXT_LINE = 998   # octets of text before CRLF (RFC 5321 4.5.3.1.6: 1000 with CRLF)
_TERMINATOR = b"\r\n.\r\n"


class LineChecker:
    """Streams body bytes through the line rules; arbitrary chunk splits give the same result.

    ``bare_newlines``: "reject" records a violation (the caller refuses the
    message at its end); "normalize" rewrites a bare CR or LF to CRLF.
    """

    __slots__ = ("normalize", "bare", "too_long", "_line", "_cr")

    def __init__(self, bare_newlines: str = "reject") -> None:
        self.normalize = bare_newlines == "normalize"
        self.bare = False          # a bare CR or LF was seen
        self.too_long = False      # a line over MAX_TEXT_LINE octets was seen
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
        crlf = data.count(b"\r\n")
        if data.count(b"\r") != crlf or data.count(b"\n") != crlf:
            self.bare = True
            if self.normalize:
                data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
                crlf = data.count(b"\r\n")
        if not self.too_long:
            if crlf == 0:
                self._line += len(data)
            else:
                first = data.find(b"\r\n")
                last = len(data) - data.rfind(b"\r\n") - 2
                longest = self._line + first
                if crlf > 1 and len(data) - first - last - 4 > MAX_TEXT_LINE:
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
    """

    __slots__ = ("_ctx",)

    def __init__(self) -> None:
        # bytes of context before the caller's buffer that were already emitted:
        # DATA starts at the beginning of a line, as if just after a CRLF.
        self._ctx = b"\r\n"

    def feed(self, buf: bytes) -> tuple[bytes, int, bool]:
        ctx = self._ctx
        off = len(ctx)
        data = ctx + buf if ctx else buf
        end = data.find(_TERMINATOR)
        if end >= 0:
            content = data[:end + 2]
            if b"\r\n." in content:
                content = content.replace(b"\r\n.", b"\r\n")
            self._ctx = b""
            return content[off:], end + 5 - off, True
        cut = data.rfind(b"\r\n")
        if cut < off:
            # no complete line in the new bytes: emit all but a trailing CR
            # (or wait for more if the only line break is the context one)
            if cut >= 0 and len(data) - cut < 3 + MAX_TEXT_LINE:
                return b"", 0, False
            keep = 1 if data.endswith(b"\r") else 0
            self._ctx = b""
            content = data[:len(data) - keep]
            if b"\r\n." in content:
                content = content.replace(b"\r\n.", b"\r\n")
            return content[off:], len(buf) - keep, False
        content = data[:cut + 2]
        if b"\r\n." in content:
            content = content.replace(b"\r\n.", b"\r\n")
        # keep the CRLF as context: the next byte may start a "." line
        self._ctx = b"\r\n"
        return content[off:], cut + 2 - off, False
