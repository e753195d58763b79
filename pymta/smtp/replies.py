"""SMTP replies: formatting (RFC 5321 4.2) with enhanced status codes (RFC 2034, 3463)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_UNSAFE = re.compile(r"[\x00-\x1f\x7f]")


def clean_text(text: str) -> str:
    """Reply text from plugins or clients: no CR, LF or other controls (no reply injection)."""
    return _UNSAFE.sub(" ", text)


@dataclass(frozen=True)
class Reply:
    code: int
    #: enhanced status code ("2.1.0"); None for replies that carry none
    #: (greeting, HELO/EHLO, 354: RFC 2034 section 3)
    enhanced: str | None
    text: str

    def render(self) -> bytes:
        lines = [clean_text(line) for line in self.text.split("\n")] or [""]
        prefix = f"{clean_text(self.enhanced)} " if self.enhanced else ""
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            text = f"{self.code}{sep}{prefix}{line}"
            # "334 " keeps its space: an empty SASL challenge (RFC 4954 4)
            out.append((text if self.code == 334 else text.rstrip(" ")) + "\r\n")
        return "".join(out).encode("utf-8")

    def from_host(self, hostname: str) -> Reply:
        """The reply with the server's name first, as a 421 that closes the session has it."""
        return Reply(self.code, self.enhanced, f"{hostname} {self.text}")

    @property
    def is_error(self) -> bool:
        return self.code >= 400


def multiline(code: int, lines: list[str]) -> bytes:
    """A multi-line reply without enhanced codes (EHLO)."""
    out = []
    for i, line in enumerate(lines):
        sep = " " if i == len(lines) - 1 else "-"
        out.append(f"{code}{sep}{clean_text(line)}\r\n")
    return "".join(out).encode("utf-8")


# Fixed replies of the protocol itself (text modelled on Postfix's wording).
OK = Reply(250, "2.0.0", "Ok")
MAIL_OK = Reply(250, "2.1.0", "Ok")
RCPT_OK = Reply(250, "2.1.5", "Ok")
START_DATA = Reply(354, None, "End data with <CR><LF>.<CR><LF>")
VRFY = Reply(252, "2.0.0", "Cannot VRFY user, but will accept message and attempt delivery")
BYE = Reply(221, "2.0.0", "Bye")
UNRECOGNIZED = Reply(500, "5.5.2", "Error: command not recognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Error: line too long")
BARE_NEWLINE_CMD = Reply(500, "5.5.2", "Error: bare <CR> or <LF> in command; lines must end with <CR><LF>")
BAD_BYTES = Reply(500, "5.5.2", "Error: invalid characters in command")
NOT_IMPLEMENTED = Reply(502, "5.5.1", "Error: command not implemented")
NEED_HELO = Reply(503, "5.5.1", "Error: send HELO/EHLO first")
NESTED_MAIL = Reply(503, "5.5.1", "Error: nested MAIL command")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
NEED_RCPT = Reply(554, "5.5.1", "Error: no valid recipients")
DATA_AFTER_BDAT = Reply(503, "5.5.1", "Error: DATA not allowed after BDAT")
RCPT_AFTER_BDAT = Reply(503, "5.5.1", "Error: RCPT not allowed after BDAT")
BDAT_NO_TRANSACTION = Reply(503, "5.5.1", "Error: BDAT without a mail transaction")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Error: too many recipients")
SIZE_EXCEEDED = Reply(552, "5.3.4", "Error: message size exceeds fixed maximum message size")
BARE_NEWLINE_DATA = Reply(550, "5.6.11", "Error: message contains bare <CR> or <LF>; lines must end with <CR><LF>")
NUL_IN_DATA = Reply(550, "5.6.0", "Error: message contains NUL characters")
DATA_LINE_TOO_LONG = Reply(550, "5.6.0", "Error: message has lines longer than 998 octets (RFC 5322 2.1.1)")
NEEDS_SMTPUTF8 = Reply(553, "5.6.7", "Error: non-ASCII address requires the SMTPUTF8 parameter on MAIL")
NO_PARAMS_AFTER_HELO = Reply(555, "5.5.4", "Error: MAIL/RCPT parameters need EHLO")
IN_TRANSACTION = Reply(503, "5.5.1", "Error: not allowed during a mail transaction")
TLS_READY = Reply(220, "2.0.0", "Ready to start TLS")
TLS_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")
MUST_STARTTLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
AUTH_NEEDS_TLS = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
AUTH_ALREADY = Reply(503, "5.5.1", "Error: already authenticated")
AUTH_UNKNOWN_MECH = Reply(504, "5.5.4", "Unrecognized authentication type")
AUTH_CANCELLED = Reply(501, "5.0.0", "Authentication aborted")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode the authentication response")
AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_FAILED = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPFAIL = Reply(454, "4.7.0", "Temporary authentication failure")
TOO_MANY_ERRORS = Reply(421, "4.7.0", "Error: too many errors")
TIMEOUT = Reply(421, "4.4.2", "Error: timeout exceeded")
SHUTDOWN = Reply(421, "4.3.2", "Service shutting down")
PREGREET = Reply(554, "5.5.1", "Error: SMTP protocol synchronization (talked before greeting)")
