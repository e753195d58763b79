"""The ESMTP server state machine (RFC 5321 and extensions), sans-I/O.

Usage, as with h11::

    conn = ServerConnection(hostname="mx.example.org", limits=ProtocolLimits())
    conn.send_greeting()                 # or conn.refuse(verdict)
    conn.receive_data(bytes_from_socket) # b"" means the client closed
    while True:
        event = conn.next_event()
        if event in (NEED_DATA, PAUSED, CLOSED): break
        ...                              # decision events: conn.answer(verdict)
    socket.send(conn.data_to_send())

The machine never reads past a pending decision, so pipelined commands are
answered strictly in order (RFC 2920) however long a plugin takes.  Every
transition is listed in :mod:`pymta.smtp._state`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pymta.smtp import events as E
from pymta.smtp import replies as R
from pymta.smtp import sasl
from pymta.smtp._state import BACK, IDLE_STATES, ON_OUTCOME, TRANSITIONS, State
from pymta.smtp.address import PathError, is_ascii, parse_domain, parse_path, split_path_and_params
from pymta.smtp.params import mail_params, parse_params, rcpt_params
from pymta.smtp.body import DataReader, LineChecker
from pymta.verdict import Kind, Verdict

@dataclass(frozen=True)
class Features:
    """What this listener offers beyond the base protocol (issue: submission)."""
    #: a certificate is configured: STARTTLS may be offered
    starttls: bool = False
    #: the connection is already encrypted (implicit TLS, port 465)
    tls_active: bool = False
    #: SASL mechanisms offered with AUTH, e.g. ("PLAIN", "LOGIN"); () = no AUTH
    auth_mechanisms: tuple[str, ...] = ()
    #: AUTH allowed before TLS (otherwise 538 5.7.11)
    auth_plaintext: bool = False
    #: MAIL refused before TLS / before AUTH (530): the submission port
    require_tls: bool = False
    require_auth: bool = False
    #: ETRN (RFC 1985) advertised and accepted for decision
    etrn: bool = False


@dataclass(frozen=True)
class ProtocolLimits:
    """The limits the machine enforces itself (the listener builds them once
    from the ``[limits]`` table; the defaults are the same)."""
    #: octets of message content; advertised in SIZE, 552 beyond
    max_message_size: int = 50 * 1024 * 1024
    #: recipients per message; 452 beyond
    max_recipients: int = 1000
    #: errors per session before 421 and close
    max_errors: int = 20
    #: "normalize" | "reject": bare CR/LF in commands and content
    bare_newlines: str = "normalize"
    #: seconds the adapter listens before the banner; > 0: a client talking first is refused
    pregreet_wait: float = 0.0


MAX_COMMAND_LINE = 512           # octets with CRLF (RFC 5321 4.5.3.1.4)
# Extensions raise the limit for MAIL and RCPT: SIZE (RFC 1870) +26,
# AUTH= (RFC 4954) +500, DSN ENVID/RET (RFC 3461) +110, BODY/SMTPUTF8 +30;
# RCPT: DSN NOTIFY/ORCPT +500.
MAX_MAIL_LINE = MAX_COMMAND_LINE + 26 + 500 + 110 + 30
MAX_RCPT_LINE = MAX_COMMAND_LINE + 500
MAX_AUTH_LINE = 12288 + 2        # a SASL response line (RFC 4954 4)

_REFUSAL_DEFAULTS = {
    "hello": R.Reply(550, "5.7.1", "Rejected"),
    "mail": R.Reply(550, "5.7.1", "Sender address rejected"),
    "rcpt": R.Reply(550, "5.1.1", "Recipient address rejected"),
    "message": R.Reply(554, "5.7.1", "Message rejected"),
    "auth": R.AUTH_FAILED,
    "etrn": R.Reply(459, "4.7.1", "Error: ETRN not allowed from this client"),
}
_AUTH_DEFER = R.AUTH_TEMPFAIL
_DEFER_DEFAULT = R.Reply(451, "4.7.1", "Try again later")
_DISCONNECT_DEFAULT = R.Reply(421, "4.7.0", "Closing connection")


class ServerConnection:
    # one per connection: slots keep an idle session small (a dict of over 30
    # attributes loses CPython's key sharing and grows fivefold)
    __slots__ = ("hostname", "limits", "features", "tls_active", "auth_user", "_sasl", "state",
                 "errors", "protocol_errors", "pregreeted", "esmtp", "draining", "helo", "sender", "mail_params",
                 "recipients", "_in", "_out", "_events", "_pending", "_discarding_line",
                 "_eof", "_message_open", "_message_chunking", "_reader", "_checker", "_size",
                 "_removed", "_oversize", "_bdat_left", "_bdat_last", "_bdat_refusal",
                 "_bdat_return")

    def __init__(self, hostname: str, limits: ProtocolLimits | None = None,
                 features: Features | None = None) -> None:
        self.hostname = hostname
        self.limits = limits or ProtocolLimits()
        self.features = features or Features()
        self.tls_active = self.features.tls_active
        #: the authenticated user name once AUTH succeeded
        self.auth_user: str | None = None
        self._sasl: tuple[str, str | None] | None = None   # (mechanism, username so far)
        self.state = State.GREETING
        self.errors = 0
        #: of those, the refusals of the protocol itself (syntax, sequence, line length,
        #: TLS or AUTH required), not answers to a decision
        self.protocol_errors = 0
        self.pregreeted = False
        self.esmtp = False
        #: the server is stopping: the transaction in flight may finish, no new one starts
        self.draining = False
        self.helo: str | None = None
        # the current transaction
        self.sender: str | None = None
        self.mail_params: dict = {}
        #: accepted recipients: (forward-path as given, params)
        self.recipients: list[tuple[str, dict]] = []
        self._in = bytearray()
        self._out: list[bytes] = []
        self._events: deque = deque()
        self._pending: tuple[str, object] | None = None
        self._discarding_line = False
        self._eof = False
        # message content
        self._message_open = False
        self._message_chunking = False
        self._reader: DataReader | None = None
        self._checker: LineChecker | None = None
        self._size = 0
        self._removed = 0          # octets of DATA content the reader dropped
        self._oversize = False
        self._bdat_left = 0
        self._bdat_last = False
        self._bdat_refusal: R.Reply | None = None
        self._bdat_return = State.HELO

    # ------------------------------------------------------------------ I/O
    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` means the client closed its side."""
        if self.state is State.CLOSED:
            return
        if not data:
            self._eof = True
            return
        if self.state is State.GREETING and self.limits.pregreet_wait > 0:
            # talking first is refused only where the admin set the trap;
            # otherwise (the banner waits for the client's name, or an
            # asynchronous connect-stage plugin) the bytes wait their turn
            self.pregreeted = True
        self._in += data

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    @property
    def in_data(self) -> bool:
        """Reading message content (the data timeout applies)."""
        return self.state in (State.DATA, State.BDAT_CHUNK)

    @property
    def awaiting_answer(self) -> bool:
        return self._pending is not None

    # ------------------------------------------------------- session events
    def send_greeting(self) -> None:
        """Send the banner (connect-stage plugins agreed); refuse a client that talked first."""
        if self.state is State.CLOSED:       # closed meanwhile (timeout, server stopping)
            return
        if self.state is not State.GREETING:
            raise RuntimeError("greeting already sent")
        if self.pregreeted:
            self._close_with(R.PREGREET)
            return
        self._out.append(R.Reply(220, None, f"{self.hostname} ESMTP pymta").render())
        self._go("greeted")

    def refuse(self, verdict: Verdict) -> None:
        """The connect stage said no: reply and close."""
        if self.state is State.CLOSED:
            return
        default = _DEFER_DEFAULT if verdict.kind is Kind.DEFER else R.Reply(554, "5.7.1", "Service unavailable")
        if verdict.kind is Kind.DEFER and verdict.code is None:
            default = R.Reply(421, "4.7.1", "Service temporarily unavailable")
        self._close_with(self._verdict_reply(verdict, default))

    def timeout(self) -> None:
        self._close_with(R.TIMEOUT.from_host(self.hostname))

    def shutdown(self) -> None:
        """The server stops now: 421 and close; a message half received is discarded."""
        if self.state is not State.CLOSED:
            self._close_with(self._shutting_down)

    def drain(self) -> None:
        """The server is stopping: let the transaction in flight finish, then close.

        A session with no transaction (or before its banner) gets 421 4.3.2
        at once; one in a transaction (MAIL given, RCPT, DATA/BDAT, or its
        end of data waiting for an answer) goes on until the transaction
        ends, accepted or refused, and is then closed the same way.  Commands
        that would start a new transaction get the 421.  :meth:`shutdown`
        ends a session that takes too long.
        """
        if self.state is State.CLOSED:
            return
        self.draining = True
        if self.state in (State.GREETING, State.TLS_PENDING):
            self._close_with(self._shutting_down)

    @property
    def _shutting_down(self) -> R.Reply:
        return R.SHUTDOWN.from_host(self.hostname)

    def connection_lost(self) -> None:
        if self.state is not State.CLOSED:
            self._enter_closed("connection lost")

    # -------------------------------------------------------------- events
    def next_event(self):
        """The next event, or NEED_DATA / PAUSED / CLOSED."""
        while True:
            if self._events:
                return self._events.popleft()
            if self.state is State.CLOSED:
                return E.CLOSED
            if self._pending is not None:
                return E.PAUSED
            if self.state is State.GREETING:
                return E.NEED_DATA
            if not self._in:
                if self._eof:
                    self._enter_closed("connection lost")
                    continue
                if self.draining and self.state in IDLE_STATES:
                    self._close_with(self._shutting_down)
                    continue
                return E.NEED_DATA
            before = len(self._in)
            if self.state is State.DATA:
                self._read_data()
            elif self.state is State.BDAT_CHUNK:
                self._read_bdat()
            else:
                self._read_command()
            if len(self._in) == before and not self._events and self._pending is None \
                    and self.state is not State.CLOSED:
                if self._eof:
                    self._enter_closed("connection lost")
                    continue
                if self.draining and self.state in IDLE_STATES:
                    self._close_with(self._shutting_down)
                    continue
                return E.NEED_DATA

    def _go(self, outcome: str) -> None:
        """Move to the state the transition table gives for ``outcome`` here."""
        state = ON_OUTCOME[outcome][self.state]
        self.state = self._bdat_return if state is BACK else state

    def _emit(self, event) -> None:
        self._events.append(event)

    def _hold(self, kind: str, event) -> None:
        self._pending = (kind, event)
        self._emit(event)

    def _reply(self, reply: R.Reply) -> None:
        self._out.append(reply.render())
        if reply.is_error:
            self.errors += 1

    def _error(self, reply: R.Reply) -> None:
        self.protocol_errors += 1
        self._reply(reply)
        self._check_errors()

    def _check_errors(self) -> None:
        if self.errors >= self.limits.max_errors and self.state is not State.CLOSED:
            self._close_with(R.TOO_MANY_ERRORS.from_host(self.hostname))

    def _close_with(self, reply: R.Reply) -> None:
        self._out.append(reply.render())
        self._enter_closed(reply.text)

    def _enter_closed(self, reason: str) -> None:
        self._abort_message(reason)
        self._go("closed")
        self._in.clear()
        self._pending = None

    # --------------------------------------------------------- command mode
    def _read_command(self) -> None:
        buf = self._in
        limit = MAX_AUTH_LINE if self.state is State.AUTH else MAX_MAIL_LINE
        nl = buf.find(b"\n")
        if nl < 0:
            if len(buf) > limit:
                # an over-long line: drop it as it comes, answer once at its end
                self._discarding_line = True
                keep = b"\r" if buf.endswith(b"\r") else b""
                buf.clear()
                buf += keep
            return
        line = bytes(buf[:nl + 1])
        del buf[:nl + 1]
        if self._discarding_line or nl > limit:
            # the same answer whether the over-long line came whole or in pieces
            self._discarding_line = False
            self._sasl_abort()
            self._error(R.LINE_TOO_LONG)
        else:
            # a command line ends in CRLF; under bare_newlines = "normalize" a
            # bare LF ends it too (as Postfix 3.9); a bare CR never does
            end = 2 if line.endswith(b"\r\n") else 1 if self.limits.bare_newlines == "normalize" else 0
            if not end or b"\r" in line[:-end]:
                self._sasl_abort()
                self._error(R.BARE_NEWLINE_CMD)
            elif self.state is State.AUTH:
                self._sasl_response(line[:-end])
            else:
                self._dispatch(line[:-end], len(line))

    def _sasl_abort(self) -> None:
        self._sasl = None
        if self.state is State.AUTH:
            self._go("sasl_end")

    def _dispatch(self, raw: bytes, length: int) -> None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self._error(R.BAD_BYTES)
        if not text.isprintable() and any(c < " " or c == "\x7f" for c in text if c != "\t"):
            return self._error(R.BAD_BYTES)
        verb, _, arg = text.partition(" ")
        verb = verb.upper()
        if self.draining and self.state in IDLE_STATES and verb != "QUIT":
            return self._close_with(self._shutting_down)
        limit = MAX_MAIL_LINE if verb == "MAIL" else MAX_RCPT_LINE if verb == "RCPT" else MAX_COMMAND_LINE
        if length > limit:
            return self._error(R.LINE_TOO_LONG)
        row = TRANSITIONS.get(verb)
        if row is None:
            return self._error(R.UNRECOGNIZED)
        action = row.get(self.state)
        if isinstance(action, R.Reply):
            return self._error(action)
        if isinstance(action, tuple):
            name, reply = action
            return getattr(self, "_cmd_" + name)(arg, reply)
        return getattr(self, "_cmd_" + action)(arg)

    def _cmd_ehlo(self, arg: str) -> None:
        self._hello("EHLO", arg)

    def _cmd_helo(self, arg: str) -> None:
        self._hello("HELO", arg)

    def _hello(self, verb: str, arg: str) -> None:
        name = arg.strip(" ")
        if not name or " " in name:
            return self._error(R.Reply(501, "5.5.4", f"Syntax: {verb} hostname"))
        self._reset_transaction("new HELO/EHLO")
        # greeted, no transaction; a refused HELO/EHLO leaves the session so
        # (RFC 5321 4.1.4: the server stays in the state it was in)
        self._go("no_transaction")
        self._hold("hello", E.Hello(verb, name))

    def _cmd_mail(self, arg: str) -> None:
        if self.features.require_tls and not self.tls_active:
            return self._error(R.MUST_STARTTLS)
        if self.features.require_auth and self.auth_user is None:
            return self._error(R.AUTH_REQUIRED)
        if arg[:5].upper() != "FROM:":
            return self._error(R.Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>"))
        try:
            path, rest = split_path_and_params(arg[5:])
            params = parse_params(rest)
            if params and not self.esmtp:
                return self._error(R.NO_PARAMS_AFTER_HELO)
            params = mail_params(params, self.limits.max_message_size)
            sender = parse_path(path, allow_null=True)
        except PathError as e:
            # X.1.3 is a bad destination address; for the sender it is X.1.7 (RFC 3463)
            enhanced = "5.1.7" if e.enhanced == "5.1.3" else e.enhanced
            return self._error(R.Reply(e.code, enhanced, e.text))
        if not is_ascii(sender) and "SMTPUTF8" not in params:
            return self._error(R.NEEDS_SMTPUTF8)
        self._hold("mail", E.MailFrom(sender, params))

    def _cmd_rcpt(self, arg: str) -> None:
        if arg[:3].upper() != "TO:":
            return self._error(R.Reply(501, "5.5.4", "Syntax: RCPT TO:<address>"))
        if len(self.recipients) >= self.limits.max_recipients:
            # RFC 5321 4.5.3.1.10: a client's error only past 100 recipients;
            # not counted towards the error limit.
            self._out.append(R.TOO_MANY_RCPTS.render())
            return None
        try:
            path, rest = split_path_and_params(arg[3:])
            params = parse_params(rest)
            if params and not self.esmtp:
                return self._error(R.NO_PARAMS_AFTER_HELO)
            params = rcpt_params(params)
            recipient = parse_path(path, allow_null=False, allow_postmaster=True)
        except PathError as e:
            return self._error(R.Reply(e.code, e.enhanced, e.text))
        if not is_ascii(recipient) and "SMTPUTF8" not in self.mail_params:
            return self._error(R.NEEDS_SMTPUTF8)
        self._hold("rcpt", E.RcptTo(recipient, params))

    def _cmd_data(self, arg: str) -> None:
        if arg.strip(" "):
            return self._error(R.Reply(501, "5.5.4", "Syntax: DATA"))
        self._out.append(R.START_DATA.render())
        self._go("data")
        self._reader = DataReader(self.limits.bare_newlines)
        self._start_message(chunking=False)

    def _start_message(self, chunking: bool) -> None:
        # a normalizing DataReader passes on CRLF line ends only
        self._checker = LineChecker(self.limits.bare_newlines,
                                    crlf_only=not chunking and self._reader.normalize)
        self._removed = 0
        self._size = 0
        self._oversize = False
        self._message_open = True
        self._message_chunking = chunking
        self._emit(E.MessageStart(chunking))

    @staticmethod
    def _parse_bdat(arg: str) -> tuple[int, bool] | None:
        parts = arg.split(" ")
        if not 1 <= len(parts) <= 2 or not (parts[0].isascii() and parts[0].isdigit()) \
                or len(parts[0]) > 15:
            return None
        if len(parts) == 2 and parts[1].upper() != "LAST":
            return None
        return int(parts[0]), len(parts) == 2

    def _cmd_bdat(self, arg: str, refusal: R.Reply | None = None) -> None:
        parsed = self._parse_bdat(arg)
        if parsed is None:
            # the chunk size is unknown: its octets will be read as commands
            # (and fail as such); the transaction is over either way
            self._reset_transaction("BDAT syntax error")
            self._go("no_transaction")
            return self._error(R.Reply(501, "5.5.4", "Syntax: BDAT chunk-size [LAST]"))
        self._bdat_left, self._bdat_last = parsed
        self._bdat_refusal = refusal
        self._bdat_return = self.state
        self._go("bdat")
        if refusal is None and not self._message_open:
            self._start_message(chunking=True)
        if self._bdat_left == 0:
            self._bdat_chunk_done()

    def _cmd_bdat_refuse(self, arg: str, reply: R.Reply) -> None:
        self._cmd_bdat(arg, refusal=reply)

    # ------------------------------------------------------------ STARTTLS
    def _cmd_starttls(self, arg: str) -> None:
        if arg.strip(" "):
            return self._error(R.Reply(501, "5.5.4", "Syntax: STARTTLS"))
        if self.tls_active:
            return self._error(R.TLS_ACTIVE)
        if not self.features.starttls:
            return self._error(R.NOT_IMPLEMENTED)
        self._out.append(R.TLS_READY.render())
        # RFC 3207 4.2: whatever the client pipelined after STARTTLS was sent
        # in plaintext and is never executed; all session knowledge is reset.
        self._in.clear()
        self._reset_transaction("STARTTLS")
        self.helo = None
        self.esmtp = False
        self.auth_user = None
        self._go("starttls")
        self._emit(E.StartTLS())

    def tls_started(self) -> None:
        """The TLS layer is in place: expect a fresh EHLO."""
        if self.state is not State.TLS_PENDING:
            raise RuntimeError("tls_started() without STARTTLS")
        self._in.clear()
        self.tls_active = True
        self._go("tls_started")

    # ---------------------------------------------------------------- AUTH
    @property
    def auth_offered(self) -> bool:
        return bool(self.features.auth_mechanisms) and (self.tls_active or self.features.auth_plaintext)

    def _cmd_auth(self, arg: str) -> None:
        if self.auth_user is not None:
            return self._error(R.AUTH_ALREADY)
        if not self.features.auth_mechanisms:
            return self._error(R.NOT_IMPLEMENTED)
        if not self.auth_offered:
            return self._error(R.AUTH_NEEDS_TLS)
        parts = arg.split(" ")
        if not parts[0] or len(parts) > 2:
            return self._error(R.Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]"))
        mechanism = parts[0].upper()
        if mechanism not in self.features.auth_mechanisms:
            return self._error(R.AUTH_UNKNOWN_MECH)
        initial = parts[1] if len(parts) == 2 else None
        self._sasl = (mechanism, None)
        if initial is None:
            self._go("sasl_challenge")
            self._out.append(R.Reply(334, None, sasl.first_challenge(mechanism)).render())
            return None
        self._sasl_step(b"" if initial == "=" else initial.encode("ascii", "replace"))

    def _sasl_response(self, line: bytes) -> None:
        if line == b"*":
            self._sasl_abort()
            return self._error(R.AUTH_CANCELLED)
        self._sasl_step(line)

    def _sasl_step(self, encoded: bytes) -> None:
        mechanism, username = self._sasl
        try:
            text = sasl.decode_response(encoded)
            if mechanism == "PLAIN":
                authzid, username, password = sasl.parse_plain(text)
                return self._authenticate(mechanism, username, password, authzid)
            if username is None:          # LOGIN, user name step
                self._sasl = (mechanism, sasl.login_username(text))
                self._go("sasl_challenge")
                self._out.append(R.Reply(334, None, sasl.LOGIN_PASSWORD).render())
                return None
        except sasl.SASLError as e:
            self._sasl_abort()
            return self._error(e.reply)
        return self._authenticate(mechanism, username, text, "")

    def _authenticate(self, mechanism: str, username: str, password: str, authzid: str) -> None:
        self._sasl = None
        self._go("sasl_end")
        self._hold("auth", E.Authenticate(mechanism, username, password, authzid))

    # ---------------------------------------------------------------- ETRN
    def _cmd_etrn(self, arg: str) -> None:
        if not self.features.etrn:
            return self._error(R.NOT_IMPLEMENTED)
        node = arg.strip(" ")
        if node.startswith("#"):
            return self._error(R.Reply(458, "4.5.0", "Error: named queues are not supported"))
        try:
            parse_domain(node[1:] if node.startswith("@") else node)
        except PathError:
            return self._error(R.Reply(501, "5.5.4", "Syntax: ETRN domain"))
        self._hold("etrn", E.Etrn(node.lower()))

    def _accepted_etrn(self, event: E.Etrn, verdict: Verdict) -> None:
        self._reply(R.Reply(250, "2.0.0", verdict.text or "Queuing started"))

    def _cmd_rset(self, arg: str) -> None:
        if arg.strip(" "):
            return self._error(R.Reply(501, "5.5.4", "Syntax: RSET"))
        self._reset_transaction("RSET")
        self._go("no_transaction")
        self._reply(R.OK)

    def _cmd_noop(self, arg: str) -> None:
        self._reply(R.OK)

    def _cmd_vrfy(self, arg: str) -> None:
        if not arg.strip(" "):
            return self._error(R.Reply(501, "5.5.4", "Syntax: VRFY address"))
        self._reply(R.VRFY)

    def _cmd_help(self, arg: str) -> None:
        self._reply(R.Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT"))

    def _cmd_quit(self, arg: str) -> None:
        self._out.append(R.BYE.render())
        self._enter_closed("QUIT")
        self._emit(E.Quit())

    # ------------------------------------------------------------- content
    def _content(self, content: bytes) -> None:
        data = self._checker.feed(content)
        self._store(data)

    def _store(self, data: bytes) -> None:
        self._size += len(data)
        # octets that normalizing removed count too: dropping content must not
        # let a client send more than the limit
        removed = self._checker.removed + self._removed
        if self._size + removed > self.limits.max_message_size:
            self._oversize = True
        if data and not (self._oversize or self._content_problem()):
            self._emit(E.MessageData(data))

    def _content_problem(self) -> R.Reply | None:
        if self._oversize:
            return R.SIZE_EXCEEDED
        if self._checker.bare and self.limits.bare_newlines == "reject":
            return R.BARE_NEWLINE_DATA
        if self._checker.nul and self.limits.bare_newlines == "reject":
            return R.NUL_IN_DATA
        if self._checker.too_long:
            return R.DATA_LINE_TOO_LONG
        return None

    def _read_data(self) -> None:
        content, used, done = self._reader.feed(bytes(self._in))
        del self._in[:used]
        self._removed = self._reader.removed
        if content:
            self._content(content)
        if done:
            self._reader = None
            self._finish_message()

    def _finish_message(self) -> None:
        self._store(self._checker.finish())
        problem = self._content_problem()
        if problem is not None:
            self._reply(problem)
            self._message_rejected(problem)
            self._go("message_refused")
            self._reset_transaction(problem.text)
            self._check_errors()
            return
        self._go("message_end")   # RCPT until answered
        self._hold("message", E.MessageEnd(self._size))

    def _read_bdat(self) -> None:
        take = min(self._bdat_left, len(self._in))
        if take:
            chunk = bytes(self._in[:take])
            del self._in[:take]
            self._bdat_left -= take
            if self._bdat_refusal is None:
                self._content(chunk)
        if not self._bdat_left:
            self._bdat_chunk_done()

    def _bdat_chunk_done(self) -> None:
        if self._bdat_refusal is not None:
            reply, self._bdat_refusal = self._bdat_refusal, None
            self._go("chunk_refused")
            return self._error(reply)
        problem = self._content_problem()
        if problem is not None:
            # RFC 3030 2: the transaction is over; later BDATs get 503
            self._reply(problem)
            self._message_rejected(problem)
            self._go("message_refused")
            self._reset_transaction(problem.text)
            return self._check_errors()
        if not self._bdat_last:
            self._go("chunk_accepted")
            self._reply(R.Reply(250, "2.0.0", f"Ok: {self._size} octets received"))
            return None
        self._finish_message()

    # -------------------------------------------------------------- answers
    def answer(self, verdict: Verdict) -> None:
        """Answer the pending decision; DUNNO counts as accept."""
        if self._pending is None:
            raise RuntimeError("answer() without a pending decision")
        kind, event = self._pending
        self._pending = None
        if verdict.kind is Kind.DISCONNECT:
            reply = self._verdict_reply(verdict, _DISCONNECT_DEFAULT)
            if kind == "message":
                self._message_rejected(reply)
            self._close_with(reply)
            return
        if verdict.kind in (Kind.ACCEPT, Kind.DUNNO):
            self._go(kind + "_accepted")
            getattr(self, "_accepted_" + kind)(event, verdict)
            return
        if verdict.kind is Kind.DEFER:
            default = _AUTH_DEFER if kind == "auth" else _DEFER_DEFAULT
        else:
            default = _REFUSAL_DEFAULTS[kind]
        reply = self._verdict_reply(verdict, default)
        self._reply(reply)
        self._go(kind + "_refused")
        if kind == "message":
            self._message_rejected(reply)
            self._reset_transaction("rejected")
        self._check_errors()

    @staticmethod
    def _verdict_reply(verdict: Verdict, default: R.Reply) -> R.Reply:
        code = verdict.code or default.code
        enhanced = verdict.enhanced
        if enhanced is None:
            same_class = str(code)[0] == str(default.code)[0]
            enhanced = default.enhanced if same_class else f"{str(code)[0]}.0.0"
        return R.Reply(code, enhanced, verdict.text or default.text)

    def _accepted_hello(self, event: E.Hello, verdict: Verdict) -> None:
        self.helo = event.hostname
        self.esmtp = event.verb == "EHLO"
        if not self.esmtp:
            self._out.append(R.Reply(250, None, self.hostname).render())
            return
        lines = [self.hostname, "PIPELINING", f"SIZE {self.limits.max_message_size}",
                 "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING", "DSN"]
        if self.features.starttls and not self.tls_active:
            lines.append("STARTTLS")
        if self.auth_offered:
            lines.append("AUTH " + " ".join(self.features.auth_mechanisms))
        if self.features.etrn:
            lines.append("ETRN")
        self._out.append(R.multiline(250, lines))

    def _accepted_auth(self, event: E.Authenticate, verdict: Verdict) -> None:
        self.auth_user = event.username
        self._reply(R.AUTH_OK)

    def _accepted_mail(self, event: E.MailFrom, verdict: Verdict) -> None:
        self.sender = event.sender
        self.mail_params = event.params
        self.recipients = []
        self._reply(R.Reply(250, "2.1.0", verdict.text or "Ok"))

    def _accepted_rcpt(self, event: E.RcptTo, verdict: Verdict) -> None:
        self.recipients.append((event.recipient, event.params))
        self._reply(R.Reply(250, "2.1.5", verdict.text or "Ok"))

    def _accepted_message(self, event: E.MessageEnd, verdict: Verdict) -> None:
        self._message_open = False
        self._reset_transaction("queued")
        self._reply(R.Reply(250, "2.0.0", verdict.text or "Ok"))

    # ------------------------------------------------------------- helpers
    def _message_rejected(self, reply: R.Reply) -> None:
        """Tell the caller (for its log) that this message was refused at its end."""
        self._emit(E.MessageRejected("BDAT" if self._message_chunking else "DATA", reply.code,
                                     reply.enhanced, reply.text, self.sender,
                                     tuple(given for given, _params in self.recipients)))

    def _reset_transaction(self, reason: str) -> None:
        self._abort_message(reason)
        self.sender = None
        self.mail_params = {}
        self.recipients = []

    def _abort_message(self, reason: str) -> None:
        if self._message_open:
            self._message_open = False
            self._reader = None
            self._emit(E.MessageAborted(reason))
