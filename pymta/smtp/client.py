"""The ESMTP client state machine (RFC 5321 and extensions), sans-I/O.

Usage, as with h11 and :mod:`pymta.smtp.server`::

    conn = ClientConnection("mx.example.org")      # our EHLO name
    conn.receive_data(bytes_from_socket)           # b"" means the server closed
    while (event := conn.next_event()) is not NEED_DATA and event is not CLOSED:
        ...                                        # Ready -> start_transaction(), BodyWanted -> send_body() ...
    socket.send(conn.data_to_send())

What the machine does by itself: EHLO (HELO when EHLO is refused with 5xx),
RSET before every transaction but the first on a connection, PIPELINING
(RFC 2920) when offered, SIZE (RFC 1870), BODY=8BITMIME (RFC 6152), SMTPUTF8
(RFC 6531), DSN parameters (RFC 3461) and CHUNKING/BDAT (RFC 3030) when
offered and needed, dot-stuffing that is independent of how the caller cuts
the content into chunks, and per-recipient results.  What the caller
decides: whether to STARTTLS and AUTH (and it switches the transport to TLS),
which transaction to run, and when to QUIT.

With ``lmtp=True`` the same machine speaks LMTP (RFC 2033): LHLO instead of
EHLO (a refused LHLO fails the session: there is no HELO), the content is
never pipelined ahead of the RCPT replies, and the end of the content (the
final "." or BDAT LAST) gets one reply per accepted recipient, in RCPT
order, each deciding its own recipient.

Every transition is listed in :mod:`pymta.smtp._client_state`; the values
and events are in :mod:`pymta.smtp.client_events` (and importable from here);
NEED_DATA and CLOSED are the sentinels of :mod:`pymta.smtp.events`.
"""

from __future__ import annotations

import base64
import re
from collections import deque
from dataclasses import dataclass, field

from pymta.smtp._client_state import ACTIONS, ON_OUTCOME, REPLY_HANDLERS, TIMEOUTS, Expect, State
from pymta.smtp.params import xtext_encode
from pymta.smtp.client_events import (ClientTimeouts, ServerReply, RecipientSpec,
                                       MailTransaction, RecipientResult, Ready, TLSGranted,
                                       TLSRefused, Authenticated, AuthRejected, BodyWanted,
                                       TransactionDone, SessionFailed, Closed)
from pymta.smtp.events import CLOSED, NEED_DATA

__all__ = ["ClientConnection", "ClientError", "DotStuffer",
           "ClientTimeouts", "ServerReply", "RecipientSpec", "MailTransaction", "RecipientResult",
           "Ready", "TLSGranted", "TLSRefused", "Authenticated", "AuthRejected", "BodyWanted",
           "TransactionDone", "SessionFailed", "Closed"]

#: longest reply line accepted (RFC 5321 4.5.3.1.5 says 512; servers exceed it)
MAX_REPLY_LINE = 4096
#: most lines in one multi-line reply
MAX_REPLY_LINES = 200
#: messages up to this size are sent in the same pipelined group as MAIL and
#: RCPT when the server offers PIPELINING and CHUNKING (RFC 3030 4.2)
INLINE_BODY_LIMIT = 64 * 1024

_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: "250 text", "250-text", "250": the code (2xx-5xx) and what follows it
_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -]|\Z)")


class ClientError(RuntimeError):
    """The caller used the machine wrongly (an action in the wrong state): a bug, not input."""


# -- content framing -------------------------------------------------------------

class DotStuffer:
    """DATA content transparency (RFC 5321 4.5.2), the same whatever the chunking.

    A "." that starts a line is doubled.  A line starts after any LF (so that
    a bare LF, which some servers take as a line end, cannot smuggle a
    terminator either) and at the start of the content.  The only state
    carried between chunks is the last two octets sent.
    """

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b"\r\n"   # the CRLF of the DATA command: content starts a line

    def feed(self, data: bytes) -> bytes:
        if not data:
            return b""
        if data[:1] == b"." and self._tail[-1:] == b"\n":
            data = b"." + data
        if b"\n." in data:
            data = data.replace(b"\n.", b"\n..")
        self._tail = (self._tail + data[-2:])[-2:]
        return data

    def finish(self) -> bytes:
        """The end of data: CRLF (when the content does not end with one), ".", CRLF."""
        return (b".\r\n" if self._tail == b"\r\n" else b"\r\n.\r\n")


# -- the machine -------------------------------------------------------------------

@dataclass
class _Transaction:
    spec: MailTransaction
    chunking: bool
    inline_body: bool
    #: commands of a non-pipelined transaction not sent yet: (line, expect, index)
    unsent: deque = field(default_factory=deque)
    mail: ServerReply | None = None
    rcpt: list = field(default_factory=list)
    #: the reply for the whole message (DATA refused, end of data, BDAT) and its command
    final: ServerReply | None = None
    final_command: str = ""
    answered: bool = False
    body_started: bool = False
    body_done: bool = False
    body_sent: int = 0
    stuffer: DotStuffer | None = None
    #: 354 arrived but no recipient was accepted: "." was sent, its reply is ignored
    discard_final: bool = False
    #: LMTP: recipient index -> its own reply to the end of the content
    finals: dict = field(default_factory=dict)

    def accepted(self, index: int) -> bool:
        reply = self.rcpt[index]
        return self.mail is not None and self.mail.ok and reply is not None and reply.ok

    def any_accepted(self) -> bool:
        return any(self.accepted(i) for i in range(len(self.rcpt)))


class ClientConnection:
    """One outbound SMTP session, from the greeting to QUIT."""

    def __init__(self, local_hostname: str, timeouts: ClientTimeouts | None = None,
                 inline_body_limit: int = INLINE_BODY_LIMIT, lmtp: bool = False) -> None:
        self.local_hostname = local_hostname
        #: speak LMTP (RFC 2033) rather than SMTP
        self.lmtp = lmtp
        self.timeouts = timeouts or ClientTimeouts()
        self.inline_body_limit = inline_body_limit
        self.state = State.GREETING
        self.greeting: ServerReply | None = None
        self.esmtp = False
        #: EHLO keywords (upper case) -> their parameters ("" when none)
        self.extensions: dict[str, str] = {}
        self.tls = False
        self.authenticated = False
        #: counts commands sent, replies handled and content accepted: a
        #: transport restarts its timer when this changes
        self.progress = 0
        self.close_reason: str | None = None
        self._in = bytearray()
        self._out: list[bytes] = []
        self._events: deque = deque()
        self._expect: deque[tuple[Expect, int]] = deque([(Expect.GREETING, 0)])
        self._reply_lines: list[str] = []
        self._reply_code = 0
        self._eof = False
        self._txn: _Transaction | None = None
        self._transactions = 0
        self._auth_steps: deque[bytes] = deque()

    # ------------------------------------------------------------------ I/O
    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; ``b""`` means the server closed its side."""
        if self.state is State.CLOSED:
            return
        if not data:
            self._eof = True
        elif self.state is not State.TLS_HANDSHAKE:
            self._in += data

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def situation(self) -> str:
        """What the session is doing, for messages: "while waiting for the reply to RCPT TO"."""
        if self.state is State.BODY:
            return "while sending the message content"
        if self.state is State.TLS_HANDSHAKE:
            return "during the TLS handshake"
        if self._expect:
            expect = self._expect[0][0]
            if expect is Expect.GREETING:
                return "while waiting for the initial server greeting"
            return f"while waiting for the reply to {expect.value}"
        return "while idle"

    @property
    def timeout(self) -> float | None:
        """Seconds the current wait may last (None: idle, the caller's business)."""
        if self.state is State.BODY:
            return self.timeouts.data_block
        if self.state is State.TLS_HANDSHAKE:
            return self.timeouts.starttls
        if self._expect:
            return getattr(self.timeouts, TIMEOUTS[self._expect[0][0]])
        return None

    # --------------------------------------------------------------- events
    def next_event(self):
        """The next event, or NEED_DATA (feed more bytes) or CLOSED."""
        while True:
            if self._events:
                return self._events.popleft()
            if self.state is State.CLOSED:
                return CLOSED
            if self._expect and self.state is not State.TLS_HANDSHAKE:
                try:
                    reply = self._read_reply()
                except _Garbage as e:
                    self._lost(f"protocol error: {e}", enhanced="4.5.0")
                    continue
                if reply is not None:
                    self._dispatch(reply)
                    continue
            elif self.state is State.READY and self._in:
                if self._unsolicited():
                    continue
            if self._eof:
                self._lost("connection closed by the server")
                continue
            return NEED_DATA

    def _dispatch(self, reply: ServerReply) -> None:
        expect, index = self._expect.popleft()
        self.progress += 1
        if reply.code // 100 == 3 and expect not in (Expect.DATA, Expect.AUTH):
            # only DATA (354) and AUTH (334) continue: the replies are out of step
            self._lost(f"protocol error: {reply.summary()!r} in reply to {expect.value}",
                       enhanced="4.5.0")
            return
        if reply.code == 421 and expect is not Expect.QUIT:
            # RFC 5321 3.8: the server is closing; whatever was outstanding is lost
            self._lost(f"server closing the connection: {reply.summary()}", reply=reply,
                       command=expect.value)
            return
        getattr(self, "_on_" + REPLY_HANDLERS[expect])(expect, index, reply)

    def _unsolicited(self) -> bool:
        """Input while nothing is awaited: the session is unusable once a whole reply is in."""
        try:
            reply = self._read_reply()
        except _Garbage as e:
            self._lost(f"protocol error while idle: {e}", enhanced="4.5.0")
            return True
        if reply is not None:
            self._lost(f"unexpected reply while idle: {reply.summary()}")
            return True
        return False

    # -------------------------------------------------------- reply parsing
    def _read_reply(self) -> ServerReply | None:
        """A complete reply from the input, or None (more bytes needed); raises _Garbage."""
        buf = self._in
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                if len(buf) > MAX_REPLY_LINE:
                    raise _Garbage(f"reply line longer than {MAX_REPLY_LINE} octets")
                return None
            raw = bytes(buf[:nl])
            del buf[:nl + 1]
            if raw.endswith(b"\r"):
                raw = raw[:-1]
            if len(raw) > MAX_REPLY_LINE:
                raise _Garbage(f"reply line longer than {MAX_REPLY_LINE} octets")
            match = _REPLY_LINE.match(raw)
            if match is None:
                raise _Garbage(f"invalid reply line {_show(raw)}")
            code = int(match.group(1))
            if self._reply_lines and code != self._reply_code:
                raise _Garbage(f"reply code changed within a multi-line reply: {_show(raw)}")
            self._reply_code = code
            text = raw[4:].decode("utf-8", "replace")
            if not text.isprintable():
                text = _CONTROL.sub(" ", text)
            self._reply_lines.append(text)
            if match.group(2) == b"-":
                if len(self._reply_lines) >= MAX_REPLY_LINES:
                    raise _Garbage(f"multi-line reply of more than {MAX_REPLY_LINES} lines")
                continue
            reply = ServerReply(code, tuple(self._reply_lines))
            self._reply_lines = []
            return reply

    # ------------------------------------------------------------ commands
    def _send(self, line: str, expect: Expect, index: int = 0) -> None:
        self._out.append(line.encode("utf-8") + b"\r\n")
        self._expect.append((expect, index))
        self.progress += 1

    def _go(self, outcome: str) -> None:
        """Move to the state the transition table gives for ``outcome`` here."""
        self.state = ON_OUTCOME[outcome][self.state]

    def _check_action(self, action: str) -> None:
        if self.state not in ACTIONS[action]:
            raise ClientError(f"{action}() is not allowed in state {self.state.value}")

    # -- greeting and hello
    def _on_greeting(self, expect: Expect, index: int, reply: ServerReply) -> None:
        self.greeting = reply
        if not reply.ok:
            self._fail_session("greeting", reply, f"refused to talk to me: {reply.summary()}")
            return
        self._hello(self._hello_verb)

    @property
    def _hello_verb(self) -> str:
        return "LHLO" if self.lmtp else "EHLO"

    def _hello(self, verb: str) -> None:
        self._go("hello")
        self._send(f"{verb} {self.local_hostname}", _HELLO_EXPECT[verb])

    def _on_ehlo(self, expect: Expect, index: int, reply: ServerReply) -> None:
        if reply.ok:
            self.esmtp = True
            self.extensions = _parse_extensions(reply.lines[1:])
            self._ready()
        elif reply.permanent:
            self._hello("HELO")
        else:
            self._fail_session("EHLO", reply, f"refused EHLO: {reply.summary()}")

    def _on_lhlo(self, expect: Expect, index: int, reply: ServerReply) -> None:
        if reply.ok:
            self.esmtp = True
            self.extensions = _parse_extensions(reply.lines[1:])
            self._ready()
        else:
            self._fail_session("LHLO", reply, f"refused LHLO: {reply.summary()}")

    def _on_helo(self, expect: Expect, index: int, reply: ServerReply) -> None:
        if reply.ok:
            self.esmtp = False
            self.extensions = {}
            self._ready()
        else:
            self._fail_session("HELO", reply, f"refused HELO: {reply.summary()}")

    def _ready(self) -> None:
        self._go("ready")
        self._events.append(Ready(self.esmtp, dict(self.extensions), self.tls))

    # -- STARTTLS (RFC 3207)
    def start_tls(self) -> None:
        self._check_action("start_tls")
        if "STARTTLS" not in self.extensions:
            raise ClientError("start_tls(): the server does not offer STARTTLS")
        if self.tls:
            raise ClientError("start_tls(): TLS is already active")
        self._go("starttls")
        self._send("STARTTLS", Expect.STARTTLS)

    def _on_starttls(self, expect: Expect, index: int, reply: ServerReply) -> None:
        if reply.ok:
            # Anything the server sent after its 220 came before the handshake:
            # never take it as a reply in the TLS session (response injection).
            self._in.clear()
            self._go("tls_granted")
            self._events.append(TLSGranted())
        else:
            self._go("tls_refused")
            self._events.append(TLSRefused(reply))

    def tls_started(self) -> None:
        """The transport now speaks TLS: forget the plaintext session and EHLO again."""
        self._check_action("tls_started")
        self._in.clear()
        self.tls = True
        self.esmtp = False
        self.extensions = {}
        self._hello(self._hello_verb)

    # -- AUTH (RFC 4954): PLAIN (RFC 4616) and LOGIN
    def authenticate(self, mechanism: str, username: str, password: str) -> None:
        self._check_action("authenticate")
        mechanism = mechanism.upper()
        if mechanism == "PLAIN":
            token = base64.b64encode(f"\0{username}\0{password}".encode("utf-8")).decode("ascii")
            self._auth_steps = deque()
            line = f"AUTH PLAIN {token}"
        elif mechanism == "LOGIN":
            self._auth_steps = deque(base64.b64encode(v.encode("utf-8")) for v in (username, password))
            line = "AUTH LOGIN"
        else:
            raise ClientError(f"authenticate(): unsupported mechanism {mechanism!r}")
        self._go("auth")
        self._send(line, Expect.AUTH)

    def _on_auth(self, expect: Expect, index: int, reply: ServerReply) -> None:
        if reply.code == 334:
            step = self._auth_steps.popleft() if self._auth_steps else b"*"   # "*" cancels
            self._out.append(step + b"\r\n")
            self._expect.append((Expect.AUTH, 0))
            self.progress += 1
            return
        self._auth_steps.clear()
        self._go("auth_done")
        if reply.ok:
            self.authenticated = True
            self._events.append(Authenticated(reply))
        else:
            self._events.append(AuthRejected(reply))

    # -- the mail transaction
    def start_transaction(self, spec: MailTransaction) -> None:
        """Send MAIL, RCPT (and DATA), pipelined when the server allows it.

        When the message cannot go to this server at all (too big for its
        SIZE, 8-bit or SMTPUTF8 content it cannot take) nothing is sent and
        TransactionDone reports a local permanent failure for everyone.
        """
        self._check_action("start_transaction")
        if not spec.recipients:
            raise ClientError("start_transaction(): no recipients")
        problem = self._unsendable(spec)
        if problem is not None:
            result = RecipientResult(problem, "MAIL FROM")
            self._events.append(TransactionDone(tuple(result for _ in spec.recipients), False))
            return
        ext = self.extensions
        pipelining = "PIPELINING" in ext
        chunking = "CHUNKING" in ext
        # LMTP: the number of replies to the end of the content is the number of
        # accepted recipients, so the content waits for the RCPT replies
        txn = _Transaction(spec, chunking, inline_body=pipelining and chunking and not self.lmtp
                           and spec.size <= self.inline_body_limit)
        txn.rcpt = [None] * len(spec.recipients)
        commands: list[tuple[str, Expect, int]] = []
        if self._transactions:
            commands.append(("RSET", Expect.RSET, 0))
        commands.append((self._mail_line(spec), Expect.MAIL, 0))
        for i, rcpt in enumerate(spec.recipients):
            commands.append((self._rcpt_line(rcpt), Expect.RCPT, i))
        if not chunking:
            commands.append(("DATA", Expect.DATA, 0))
        self._transactions += 1
        self._txn = txn
        self._go("transaction")
        if pipelining:
            for line, expect, index in commands:
                self._send(line, expect, index)
            if txn.inline_body:
                self._start_body(txn)
        else:
            txn.unsent.extend(commands)
            self._send(*txn.unsent.popleft())

    def _unsendable(self, spec: MailTransaction) -> ServerReply | None:
        ext = self.extensions
        limit = ext.get("SIZE", "")
        if limit.isdigit() and int(limit) > 0 and spec.size > int(limit):
            return ServerReply.make(552, "5.3.4", f"message size {spec.size} exceeds the size limit "
                                                  f"{int(limit)} of the server")
        if spec.smtputf8_required and "SMTPUTF8" not in ext:
            return ServerReply.make(550, "5.6.7", "the message needs SMTPUTF8 (non-ASCII addresses "
                                                  "or header fields), which the server does not offer")
        if spec.body == "8BITMIME" and "8BITMIME" not in ext and spec.eight_bit is not False:
            return ServerReply.make(554, "5.6.3", "the message has 8-bit content, which the server "
                                                  "does not accept (no 8BITMIME)")
        return None

    def _mail_line(self, spec: MailTransaction) -> str:
        ext = self.extensions
        params = []
        if "SIZE" in ext:
            params.append(f"SIZE={spec.size}")
        if spec.body == "8BITMIME" and "8BITMIME" in ext:
            params.append("BODY=8BITMIME")
        if (spec.smtputf8 or spec.smtputf8_required) and "SMTPUTF8" in ext:
            params.append("SMTPUTF8")
        if "DSN" in ext:
            if spec.ret in ("FULL", "HDRS"):
                params.append(f"RET={spec.ret}")
            if spec.envid and spec.envid.isascii():
                params.append(f"ENVID={_xtext(spec.envid)}")
        return "".join([f"MAIL FROM:<{spec.sender}>", *(" " + p for p in params)])

    def _rcpt_line(self, rcpt: RecipientSpec) -> str:
        params = []
        if "DSN" in self.extensions:
            if rcpt.notify:
                params.append("NOTIFY=" + ",".join(rcpt.notify))
            if rcpt.orcpt:
                addr_type, _, address = rcpt.orcpt.partition(";")
                if addr_type and address and rcpt.orcpt.isascii():
                    params.append(f"ORCPT={addr_type};{_xtext(address)}")
        return "".join([f"RCPT TO:<{rcpt.address}>", *(" " + p for p in params)])

    def _on_transaction_reply(self, expect: Expect, index: int, reply: ServerReply) -> None:
        txn = self._txn
        if expect is not Expect.RSET:
            txn.answered = True
        if expect is Expect.MAIL:
            txn.mail = reply
        elif expect is Expect.RCPT:
            txn.rcpt[index] = reply
        last_rcpt = expect is Expect.RCPT and index == len(txn.rcpt) - 1
        if txn.unsent:                                  # not pipelining: one command at a time
            if expect is Expect.MAIL and not reply.ok:
                txn.unsent.clear()
            elif last_rcpt and not txn.any_accepted():
                txn.unsent.clear()
            else:
                self._send(*txn.unsent.popleft())
                return
        if txn.chunking and not txn.inline_body and (last_rcpt or txn.mail is not None
                                                     and not txn.mail.ok):
            if txn.any_accepted():
                self._start_body(txn)
                return
        self._maybe_done()

    def _on_data(self, expect: Expect, index: int, reply: ServerReply) -> None:
        txn = self._txn
        txn.answered = True
        if reply.code == 354:
            if txn.any_accepted():
                txn.stuffer = DotStuffer()
                self._go("body")
                txn.body_started = True
                self._events.append(BodyWanted())
            else:
                # RFC 2920 3.1: DATA was accepted though no recipient was: end it at once
                txn.discard_final = True
                self._go("body_end")
                self._out.append(b".\r\n")
                if not self.lmtp:            # LMTP: a reply per accepted recipient, so none
                    self._expect.append((Expect.DOT, 0))
                self.progress += 1
                self._maybe_done()
            return
        if reply.ok:
            # DATA is answered 354 or refused: a 2xx is a reply to something else (a server
            # out of step), and taken as the end of the content it would "deliver" a message
            # never sent
            self._lost(f"protocol error: {reply.summary()!r} in reply to DATA", enhanced="4.5.0")
            return
        txn.final, txn.final_command = reply, "DATA"
        self._maybe_done()

    def _start_body(self, txn: _Transaction) -> None:
        txn.body_started = True
        self._go("body")
        self._out.append(f"BDAT {txn.spec.size} LAST\r\n".encode("ascii"))
        self._expect_final(txn, Expect.BDAT)
        self._events.append(BodyWanted())

    def _expect_final(self, txn: _Transaction, expect: Expect) -> None:
        """Await the reply to the end of the content: one, or in LMTP one per accepted recipient."""
        if self.lmtp:
            self._expect.extend((expect, i) for i in range(len(txn.rcpt)) if txn.accepted(i))
        else:
            self._expect.append((expect, 0))
        self.progress += 1

    def send_body(self, data: bytes) -> None:
        """Message content, as spooled: the machine dot-stuffs (DATA) or counts (BDAT)."""
        self._check_action("send_body")
        txn = self._txn
        if not data:
            return
        if txn.stuffer is not None:
            self._out.append(txn.stuffer.feed(data))
        else:
            if txn.body_sent + len(data) > txn.spec.size:
                raise ClientError(f"send_body(): more than the {txn.spec.size} octets announced")
            self._out.append(data)
        txn.body_sent += len(data)
        self.progress += 1

    def end_body(self) -> None:
        self._check_action("end_body")
        txn = self._txn
        txn.body_done = True
        if txn.stuffer is not None:
            self._out.append(txn.stuffer.finish())
            self._expect_final(txn, Expect.DOT)
        elif txn.body_sent != txn.spec.size:
            raise ClientError(f"end_body(): {txn.body_sent} octets sent, {txn.spec.size} announced")
        self._go("body_end")
        self._maybe_done()

    def _on_final(self, expect: Expect, index: int, reply: ServerReply) -> None:
        txn = self._txn
        txn.answered = True
        if self.lmtp:
            txn.finals[index] = reply
            txn.final_command = expect.value
        elif not txn.discard_final and txn.final is None:
            txn.final, txn.final_command = reply, expect.value
        self._maybe_done()

    def _maybe_done(self) -> None:
        """End the transaction when nothing more is awaited for it."""
        txn = self._txn
        if txn is None or self._expect or txn.unsent:
            return
        if txn.body_started and not txn.body_done:
            return
        self._finish_transaction(None, "")
        if self.state is State.READY and self._in and not self._unsolicited():
            # more replies than commands (an LMTP server answering the content more often than
            # recipients were accepted): the next transaction would take them as its own
            self._lost("unexpected data while idle", enhanced="4.5.0")

    def _finish_transaction(self, lost: ServerReply | None, lost_command: str) -> None:
        txn, self._txn = self._txn, None
        results = []
        for i, rcpt_reply in enumerate(txn.rcpt):
            if txn.mail is not None and not txn.mail.ok:
                results.append(RecipientResult(txn.mail, Expect.MAIL.value))
            elif rcpt_reply is not None and not rcpt_reply.ok:
                results.append(RecipientResult(rcpt_reply, Expect.RCPT.value))
            elif i in txn.finals:
                results.append(RecipientResult(txn.finals[i], txn.final_command))
            elif txn.final is not None and rcpt_reply is not None:
                results.append(RecipientResult(txn.final, txn.final_command))
            elif lost is not None:
                results.append(RecipientResult(lost, lost_command))
            else:   # not reached: a transaction ends with a reply for everyone or is lost
                results.append(RecipientResult(ServerReply.make(451, "4.3.0", "no reply"), ""))
        if self.state is not State.CLOSED:
            self._go("transaction_done")
        self._events.append(TransactionDone(tuple(results), txn.answered))

    # -- QUIT
    def quit(self) -> None:
        self._check_action("quit")
        if self.state is not State.READY:
            self._lost("closed by the client")
            return
        self._go("quit")
        self._send("QUIT", Expect.QUIT)

    def _on_quit(self, expect: Expect, index: int, reply: ServerReply) -> None:
        self._enter_closed("QUIT")

    # ------------------------------------------------------ ends of sessions
    def timed_out(self) -> None:
        """The caller's timer for :attr:`timeout` expired: give up on this session."""
        if self.state is not State.CLOSED:
            self._lost("timed out")

    def connection_lost(self, reason: str = "connection lost") -> None:
        """The transport is gone (or the caller abandons the session)."""
        if self.state is not State.CLOSED:
            self._lost(reason)

    def _fail_session(self, stage: str, reply: ServerReply | None, reason: str) -> None:
        self._events.append(SessionFailed(stage, reply, reason))
        if reply is not None and reply.code != 421:
            self._out.append(b"QUIT\r\n")
        self._enter_closed(reason)

    def _lost(self, reason: str, reply: ServerReply | None = None, command: str | None = None,
              enhanced: str = "4.4.2") -> None:
        """The session ends abnormally: resolve what is outstanding, then CLOSED."""
        if self.state is State.CLOSED:
            return
        if reply is None and "while" not in reason:
            reason = f"{reason} {self.situation}"
        if command is None and self._expect:
            command = self._expect[0][0].value
        if self._txn is not None:
            lost = reply or ServerReply.make(451, enhanced, reason)
            self._expect.clear()
            self._finish_transaction(lost, command or "")
        elif self.state in (State.GREETING, State.HELLO, State.STARTTLS, State.TLS_HANDSHAKE,
                            State.AUTH):
            stage = command or self.state.value
            self._events.append(SessionFailed(stage, reply, reason))
        self._enter_closed(reason)

    def _enter_closed(self, reason: str) -> None:
        if self.state is State.CLOSED:
            return
        self._go("closed")
        self.close_reason = reason
        self._in.clear()
        self._expect.clear()
        self._auth_steps.clear()
        self._events.append(Closed(reason))


_HELLO_EXPECT = {"EHLO": Expect.EHLO, "HELO": Expect.HELO, "LHLO": Expect.LHLO}


class _Garbage(Exception):
    """Input that is not an SMTP reply."""


def _show(raw: bytes) -> str:
    text = raw[:80].decode("utf-8", "replace")
    return repr(text + ("..." if len(raw) > 80 else ""))


_XTEXT_PLAIN = re.compile(r"[\x21-\x2a\x2c-\x3c\x3e-\x7e]*\Z")


def _xtext(value: str) -> str:
    """RFC 3461 xtext; most addresses need no escaping at all."""
    return value if _XTEXT_PLAIN.match(value) else xtext_encode(value)


def _parse_extensions(lines) -> dict[str, str]:
    extensions: dict[str, str] = {}
    for line in lines:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions.setdefault(keyword.upper(), params.strip())
    return extensions
