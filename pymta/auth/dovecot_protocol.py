"""The client side of Dovecot's authentication protocol (version 1.x), sans-I/O.

The protocol is line based (LF), one command per line, fields separated by
TAB; optional fields are ``name=value`` or a bare flag, and unknown ones are
ignored.  Values are tab-escaped with \\001 (\\001 + "t" is a TAB, "n" or
"l" an LF, "r" a CR, "0" a NUL, "1" the \\001 itself).  What this module
does::

    C: VERSION 1 2          C: CPID <pid>
    S: VERSION 1 x   S: MECH <name> [flags] ...   S: SPID / CUID / COOKIE   S: DONE
    C: AUTH <id> PLAIN service=smtp lip=.. rip=.. lport=.. rport=.. [secured] resp=<base64>
    S: OK <id> user=<name> [nologin reason=..]  |  FAIL <id> [temp] [reason=..]  |  CONT <id> <base64>

Usage: ``AuthClientConnection(pid)``; send ``data_to_send()``; feed
``receive_data(bytes)``; take events with ``next_event()`` (:class:`Handshake`
once, then one :class:`Result` or :class:`Continue` per reply) until it
returns None.  A protocol violation (or a major version other than 1)
raises :class:`AuthProtocolError`: the connection is unusable.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

#: the protocol version this client speaks (Dovecot 2.x answers 1.2 and later 1.x)
MAJOR, MINOR = 1, 2
#: longest line accepted (Dovecot's own limit is 16 KiB)
MAX_LINE = 16384

_UNESCAPE = {"t": "\t", "n": "\n", "l": "\n", "r": "\r", "0": "\0", "1": "\001"}


class AuthProtocolError(Exception):
    """The auth server said something this client does not understand."""


def unescape(value: str) -> str:
    if "\001" not in value:
        return value
    out, chars = [], iter(value)
    for c in chars:
        if c == "\001":
            nxt = next(chars, "")
            out.append(_UNESCAPE.get(nxt, nxt))
        else:
            out.append(c)
    return "".join(out)


def escape(value: str) -> str:
    return (value.replace("\001", "\0011").replace("\t", "\001t").replace("\n", "\001n")
            .replace("\r", "\001r").replace("\0", "\0010"))


@dataclass(frozen=True)
class AuthRequest:
    """One authentication: the mechanism, its initial response, and where the login comes from."""
    mechanism: str
    #: the SASL initial response (PLAIN: authzid NUL authcid NUL password), or None (LOGIN)
    initial_response: bytes | None
    service: str = "smtp"
    local_ip: str = ""
    local_port: int = 0
    remote_ip: str = ""
    remote_port: int = 0
    #: the session is encrypted (TLS): Dovecot then allows plaintext mechanisms
    secured: bool = False
    #: ask Dovecot not to delay failures by its per-IP auth penalty
    no_penalty: bool = False


@dataclass(frozen=True)
class Handshake:
    """The server's handshake is complete: its version and mechanisms (upper case) with flags."""
    version: tuple[int, int]
    mechanisms: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class Continue:
    """CONT: the server wants the next step of request ``request_id``; ``challenge`` decoded."""
    request_id: int
    challenge: bytes


@dataclass(frozen=True)
class Result:
    """OK or FAIL for request ``request_id``."""
    request_id: int
    ok: bool
    #: the user name Dovecot authenticated (user= of OK; may differ from the login name)
    user: str | None = None
    #: FAIL with "temp" or code=temp_fail: the server could not decide (Postfix: 454)
    temporary: bool = False
    #: a text for the user (reason=), if the server gave one
    reason: str | None = None
    #: OK with "nologin": the password was right but the user may not log in
    nologin: bool = False
    fields: dict[str, str] = field(default_factory=dict)


def plain_response(username: str, password: str, authzid: str = "") -> bytes:
    """The PLAIN (RFC 4616) initial response."""
    return f"{authzid}\0{username}\0{password}".encode("utf-8")


class AuthClientConnection:
    """One connection to Dovecot's auth-client socket."""

    def __init__(self, pid: int) -> None:
        self.handshake: Handshake | None = None
        self._out = [f"VERSION\t{MAJOR}\t{MINOR}\nCPID\t{pid}\n".encode("ascii")]
        self._in = bytearray()
        self._version: tuple[int, int] | None = None
        self._mechanisms: dict[str, tuple[str, ...]] = {}
        self._events: list = []

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    # -- requests -----------------------------------------------------------------
    def request(self, request_id: int, req: AuthRequest) -> None:
        """Send AUTH (after the handshake: the caller waits for :class:`Handshake`)."""
        if self.handshake is None:
            raise AuthProtocolError("AUTH before the handshake was complete")
        fields = ["AUTH", str(request_id), req.mechanism.upper(), f"service={req.service}"]
        if req.local_ip:
            fields.append(f"lip={req.local_ip}")
        if req.remote_ip:
            fields.append(f"rip={req.remote_ip}")
        if req.local_port:
            fields.append(f"lport={req.local_port}")
        if req.remote_port:
            fields.append(f"rport={req.remote_port}")
        if req.secured:
            fields.append("secured")
        if req.no_penalty:
            fields.append("no-penalty")
        if req.initial_response is not None:
            fields.append("resp=" + base64.b64encode(req.initial_response).decode("ascii"))
        self._line(fields)

    def respond(self, request_id: int, response: bytes) -> None:
        """CONT: the next step of a request the server continued."""
        self._line(["CONT", str(request_id), base64.b64encode(response).decode("ascii")])

    def _line(self, fields: list[str]) -> None:
        self._out.append(("\t".join(escape(f) for f in fields) + "\n").encode("utf-8"))

    # -- replies ---------------------------------------------------------------------
    def receive_data(self, data: bytes) -> None:
        self._in += data
        while True:
            nl = self._in.find(b"\n")
            if nl < 0:
                if len(self._in) > MAX_LINE:
                    raise AuthProtocolError(f"line longer than {MAX_LINE} octets")
                return
            line = self._in[:nl].decode("utf-8", "replace")
            del self._in[:nl + 1]
            self._handle(line.split("\t"))

    def next_event(self):
        return self._events.pop(0) if self._events else None

    def _handle(self, fields: list[str]) -> None:
        command, args = fields[0], fields[1:]
        if self.handshake is None:
            self._handle_handshake(command, args)
            return
        if command in ("OK", "FAIL", "CONT"):
            if not args or not args[0].isdigit():
                raise AuthProtocolError(f"{command} without a request id")
            request_id = int(args[0])
            if command == "CONT":
                self._events.append(Continue(request_id, _b64(args[1] if len(args) > 1 else "")))
            else:
                self._events.append(_result(request_id, command == "OK", args[1:]))
        # anything else (a newer server's notices) is ignored, as the protocol says

    def _handle_handshake(self, command: str, args: list[str]) -> None:
        if command == "VERSION":
            if len(args) < 2 or not args[0].isdigit() or not args[1].isdigit():
                raise AuthProtocolError(f"bad VERSION line: {args!r}")
            self._version = (int(args[0]), int(args[1]))
            if self._version[0] != MAJOR:
                raise AuthProtocolError(f"auth server speaks protocol version "
                                        f"{self._version[0]}.{self._version[1]}, not {MAJOR}.x")
        elif command == "MECH" and args:
            self._mechanisms[args[0].upper()] = tuple(args[1:])
        elif command == "DONE":
            if self._version is None:
                raise AuthProtocolError("handshake without VERSION")
            self.handshake = Handshake(self._version, dict(self._mechanisms))
            self._events.append(self.handshake)


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise AuthProtocolError(f"bad base64 in CONT: {text[:40]!r}") from None


def _result(request_id: int, ok: bool, args: list[str]) -> Result:
    fields: dict[str, str] = {}
    for arg in args:
        name, sep, value = arg.partition("=")
        fields[name] = unescape(value) if sep else ""
    temporary = not ok and ("temp" in fields or fields.get("code") == "temp_fail")
    return Result(request_id, ok, user=fields.get("user"), temporary=temporary,
                  reason=fields.get("reason"), nologin=ok and "nologin" in fields, fields=fields)
