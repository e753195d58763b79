"""The Twisted adapter: socket bytes ↔ ServerConnection, plugin calls, the spool.

Thin by design: every protocol rule lives in :mod:`pymta.smtp.server`.  This
class feeds bytes in, writes bytes out, runs the plugin chains (which may
return Deferreds: reading is paused until the answer so pipelined replies stay
in order) and gives each its answer.  The mail transaction it receives (its
recipients, its message streaming to the spool, the commit whose durability
the answer at end of data waits for) is a :class:`pymta.server.reception.Reception`.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import tcp
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from zope.interface import implementer
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin

from pymta.auth.credentials import SMTPCredentials, TemporaryAuthFailure
from pymta.dns.budget import SessionResolver
from pymta.server.auth import IAuthenticatedUser
from pymta.server.chain import PluginTimeout
from pymta.server.reception import QUEUE_WRITE_ERROR, Reception
from pymta.session import Session
from pymta.smtp import events as E
from pymta.tls_description import describe as describe_tls
from pymta.smtp.server import ServerConnection
from pymta.verdict import Kind, Verdict

if TYPE_CHECKING:
    from pymta.server.factory import SMTPServerFactory

log = Logger(namespace="pymta.smtpd")
_session_ids = itertools.count(1)

AUTH_FAILED = Verdict(Kind.REJECT, 535, "5.7.8", "Authentication credentials invalid")
AUTH_TEMPFAIL = Verdict(Kind.DEFER, 454, "4.7.0", "Temporary authentication failure")
ETRN_REFUSED = Verdict(Kind.DEFER, 459, "4.7.1", "Error: ETRN not allowed from this client")


def write_now(transport, data: bytes) -> None:
    """``transport.write(data)``, sending at once when nothing is queued before it.

    Twisted's ``write`` only queues: the bytes leave on the reactor's next
    pass, after two ``epoll_ctl`` calls to watch the socket for writing and
    to stop again.  A reply is small and the socket's buffer is almost
    always free, so for a plain TCP connection with nothing queued the
    bytes go straight to ``send``; whatever the socket does not take (or
    every byte, on an error, which the transport then finds and reports)
    goes through ``transport.write`` as usual, so the order of bytes is
    the same either way.  TLS connections and other transports always take
    the usual path.
    """
    if (isinstance(transport, tcp.Connection) and transport.TLS is False and transport.connected
            and not transport.disconnecting and not transport.dataBuffer
            and not getattr(transport, "_tempDataBuffer", True)):
        try:
            sent = transport.socket.send(data)
        except OSError:          # would block, or a broken connection: Twisted's path decides
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)


@implementer(IHandshakeListener)
class SMTPServerProtocol(Protocol, TimeoutMixin):
    factory: "SMTPServerFactory"
    #: how the session ended, for the metrics: "quit", "timeout", "rejected" (by the
    #: connect stage), "pregreet"; else decided at the end (see _count_end)
    _outcome = "disconnect"
    #: STARTTLS was answered: a handshake is due (for the TLS failure metric)
    _tls_started = False

    def __init__(self) -> None:
        self.conn: ServerConnection | None = None
        self.session: Session | None = None
        #: the mail transaction being received (from an accepted MAIL FROM), or None
        self.reception: Reception | None = None
        self._processing = False
        self._paused = False
        self._greeted = False
        self._greet_call = None
        self._starting = 0
        self._lost = False
        #: the client's address (set by the factory from buildProtocol's ``addr``)
        self.client_address = None

    # ------------------------------------------------------------ lifecycle
    def connectionMade(self) -> None:
        ctx = self.factory.context
        # the client as the factory was told (on a proxy_protocol listener the address
        # from the PROXY header, not the socket's peer)
        peer = self.client_address if self.client_address is not None else self.transport.getPeer()
        ip = getattr(peer, "host", "unknown")
        self.session = Session(client_ip=ip, client_port=getattr(peer, "port", 0),
                               listener=self.factory.listener.name, role=self.factory.listener.role,
                               trusted=ctx.config.is_trusted(ip),
                               session_id=f"{next(_session_ids):x}")
        self.session.dns = self._session_resolver()
        self.conn = ServerConnection(ctx.config.hostname, self.factory.protocol_limits,
                                     self.factory.session_features())
        self.setTimeout(ctx.config.limits.idle_timeout)
        # the connect stage waits for the client's name and the pregreet wait; the
        # connect plugins' DNS queries (DNSBL) start now, with the name's
        ctx.policy.prefetch_connect(self.session)
        self._starting = 1
        if ctx.client_names is not None:
            self._starting += 1
            ctx.client_names.lookup(ip, self.session.dns).addCallback(self._named)
        wait = ctx.config.limits.pregreet_wait
        if wait > 0:
            self._greet_call = ctx.reactor.callLater(wait, self._waited)
        else:
            self._started()

    def _session_resolver(self):
        """The session's DNS lookups: the shared resolver within ``[dns] session_budget``."""
        ctx = self.factory.context
        resolver, budget = ctx.config.resolver, ctx.config.dns.session_budget
        if resolver is None or budget <= 0:
            return resolver
        s = self.session
        return SessionResolver(resolver, budget, ctx.reactor, label=f"{s.client_ip}:{s.client_port}")

    def _named(self, name: str) -> None:
        self.session.client_name = name
        self._started()

    def _waited(self) -> None:
        self._greet_call = None
        self._started()

    def _started(self) -> None:
        self._starting -= 1
        if self._starting or self._lost or self.conn.closed:   # closed: timeout, server stopping
            return
        log.info("connect from {client}", client=self.client)
        self._connect_stage()

    @property
    def client(self) -> str:
        s = self.session
        return f"{s.client_name}[{s.client_ip}]:{s.client_port}" if s else "unknown"

    def _connect_stage(self) -> None:
        self._decide(self.factory.context.policy.connect(self.session), self._connect_verdict)

    def _connect_verdict(self, verdict: Verdict) -> None:
        if self._lost:                  # the client left while the plugins thought
            return
        if verdict.kind in (Kind.ACCEPT, Kind.DUNNO):
            self.conn.send_greeting()
            if self.conn.closed:
                self._outcome = "pregreet"
                log.info("pregreet from {client}: talked before the greeting", client=self.client)
        else:
            self._outcome = "rejected"
            self._log_reject("CONNECT", verdict)
            self.conn.refuse(verdict)
        self._greeted = True
        self._process()

    def connectionLost(self, reason=None) -> None:
        self._lost = True
        self.setTimeout(None)
        if self._greet_call is not None and self._greet_call.active():
            self._greet_call.cancel()
        if self.conn is not None:
            self.conn.connection_lost()
            self._drain_events()
        if self.reception is not None:
            self.reception.abort()
        if self.session is not None and isinstance(self.session.dns, SessionResolver):
            self.session.dns.close()       # its budget timer goes with the session
        log.info("disconnect from {client}", client=self.client)
        events = self.factory.context.events
        if events is not None:
            self._count_end(events)
        self.factory.connection_closed(self)

    def _count_end(self, events) -> None:
        """The metrics of a session that ended: how, its protocol errors, and a TLS
        handshake that never completed."""
        listener = self.factory.listener.name
        if ((self._tls_started or self.factory.features.tls_active)
                and self.session is not None and self.session.tls is None):
            events.tls_handshake(listener, False)
        if self.conn is not None and self.conn.protocol_errors:
            events.protocol_errors(listener, self.conn.protocol_errors)
        outcome = self._outcome
        if outcome == "disconnect":
            if self.factory.counter.draining:
                outcome = "shutdown"
            elif self.conn is not None and self.conn.errors >= self.factory.protocol_limits.max_errors:
                outcome = "errors"
        events.session_ended(listener, outcome)

    def handshakeCompleted(self) -> None:
        self.session.tls = describe_tls(self.transport.getHandle())
        log.info("TLS established with {client}: {version} with cipher {cipher}", client=self.client,
                 version=self.session.tls["version"], cipher=self.session.tls["cipher"])
        events = self.factory.context.events
        if events is not None:
            events.tls_handshake(self.factory.listener.name, True)

    def timeoutConnection(self) -> None:
        log.info("timeout after {state} from {client}", state=self.conn.state.value, client=self.client)
        self._outcome = "timeout"
        self.conn.timeout()
        self._process()

    @property
    def _committing(self) -> bool:
        """The spool commit of this session's message is in flight."""
        return self.reception is not None and self.reception.committing

    def drain(self) -> None:
        """Server is stopping: 421 to an idle client now, to the others after their transaction."""
        if self.conn is not None and not self.conn.closed:
            self.conn.drain()
            self._process()

    def shutdown(self) -> None:
        """Server is stopping and the drain time is over: 421 and close, whatever was
        half received is discarded.  A message whose spool commit is in flight gets
        its answer first (the commit is bound by the disk, not by the client)."""
        if self.conn is not None and not self.conn.closed and not self._committing:
            log.info("stopping: closing the session of {client} in state {state}",
                     client=self.client, state=self.conn.state.value)
            self.conn.shutdown()
            self._process()

    # -------------------------------------------------------------- input
    def dataReceived(self, data: bytes) -> None:
        self.resetTimeout()
        self.conn.receive_data(data)
        if self._greeted:
            self._process()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            self._drain_events()
        finally:
            self._processing = False
        out = self.conn.data_to_send()
        if out:
            write_now(self.transport, out)
        if self.conn.closed:
            self.setTimeout(None)
            self.transport.loseConnection()
        elif self.conn.awaiting_answer:
            if not self._paused:
                self._paused = True
                self.transport.pauseProducing()
        else:
            if self._paused:
                self._paused = False
                self.transport.resumeProducing()
            limits = self.factory.context.config.limits
            self.setTimeout(limits.data_timeout if self.conn.in_data else limits.idle_timeout)

    def _drain_events(self) -> None:
        conn = self.conn
        while True:
            ev = conn.next_event()
            if ev is E.NEED_DATA or ev is E.PAUSED or ev is E.CLOSED:
                return
            handler = _HANDLERS[type(ev)]
            handler(self, ev)

    def _decide(self, result, then) -> None:
        """Apply ``then`` to a verdict now, or when its Deferred fires."""
        if not isinstance(result, Deferred):
            then(result)
            return

        def fired(value):
            then(value)       # answers only if the session still waits for it
            self._process()

        result.addCallback(fired).addErrback(
            lambda f: log.failure("while answering {client}", f, client=self.client))

    def _answer(self, verdict: Verdict) -> None:
        if self.conn.awaiting_answer:
            self.conn.answer(verdict)

    # ------------------------------------------------------------- events
    def _on_hello(self, ev: E.Hello) -> None:
        self.reception = None

        def then(verdict: Verdict) -> None:
            if verdict.kind in (Kind.ACCEPT, Kind.DUNNO):
                self.session.helo = ev.hostname
                self.session.esmtp = ev.verb == "EHLO"
            else:
                self._log_reject("HELO", verdict, helo=ev.hostname,
                                 proto="ESMTP" if ev.verb == "EHLO" else "SMTP")
            self._answer(verdict)

        self._decide(self.factory.context.policy.helo(self.session, ev.hostname), then)

    def _on_mail(self, ev: E.MailFrom) -> None:
        reception = Reception(ev.sender, ev.params)

        def then(verdict: Verdict) -> None:
            if verdict.kind in (Kind.ACCEPT, Kind.DUNNO):
                self.reception = reception
            else:
                self._log_reject("MAIL", verdict, sender=ev.sender)
            self._answer(verdict)

        self._decide(self.factory.context.policy.mail(self.session, reception.transaction), then)

    def _on_rcpt(self, ev: E.RcptTo) -> None:
        reception = self.reception
        txn = reception.transaction

        def then(verdict: Verdict) -> None:
            if verdict.kind in (Kind.ACCEPT, Kind.DUNNO):
                reception.add_recipients(ev.recipient, verdict.rewrite)
            else:
                self._log_reject("RCPT", verdict, sender=txn.sender, rcpt=ev.recipient)
            self._answer(verdict)

        self._decide(self.factory.context.policy.rcpt(self.session, txn, ev.recipient, ev.params), then)

    def _on_message_start(self, ev: E.MessageStart) -> None:
        self.reception.start_message(self.factory.context.spool)

    def _on_message_data(self, ev: E.MessageData) -> None:
        self.reception.write(ev.data)

    def _on_message_aborted(self, ev: E.MessageAborted) -> None:
        self.reception.abort()

    def _on_message_rejected(self, ev: E.MessageRejected) -> None:
        # Postfix logs "to=" only when the message had one recipient
        rcpt = ev.recipients[0] if len(ev.recipients) == 1 else None
        extra = {"nrcpt": len(ev.recipients)} if len(ev.recipients) > 1 else {}
        self._log_refusal(ev.command, ev.code, ev.enhanced, ev.text, sender=ev.sender, rcpt=rcpt,
                          **extra)
        events = self.factory.context.events
        if events is not None:
            events.command_rejected(ev.command.lower(), ev.code)

    def _on_message_end(self, ev: E.MessageEnd) -> None:
        view = self.reception.view()
        if view is None:
            self._message_verdict(QUEUE_WRITE_ERROR)
            return
        self._decide(self.factory.context.policy.message(self.session, self.reception.transaction, view),
                     self._filtered)

    def _filtered(self, verdict: Verdict) -> None:
        answer = self.reception.store(verdict, self.session, self.factory, self.client)
        if answer is not None:
            self._decide(answer, self._message_verdict)

    def _message_verdict(self, verdict: Verdict) -> None:
        if not self.conn.closed:
            self._answer(verdict)

    def _on_quit(self, ev: E.Quit) -> None:
        self._outcome = "quit"

    def _on_starttls(self, ev: E.StartTLS) -> None:
        # the 220 goes out in plaintext, everything after it through TLS
        self.transport.write(self.conn.data_to_send())
        self.transport.startTLS(self.factory.context.tls)
        self._tls_started = True
        self.conn.tls_started()
        self.session.helo = None
        self.session.esmtp = False
        self.session.auth_user = None
        self.reception = None

    def _on_authenticate(self, ev: E.Authenticate) -> None:
        ctx = self.factory.context
        ip = self.session.client_ip
        if ev.authzid and ev.authzid != ev.username:
            # no proxy authorization: PLAIN's authzid must be empty or the user
            self._decide(self._auth_failed(ev, "authorization identity differs"), self._answer)
            return
        local = self.transport.getHost()
        credentials = SMTPCredentials(
            ev.username.encode("utf-8"), ev.password.encode("utf-8"), mechanism=ev.mechanism,
            client_ip=ip, client_port=self.session.client_port,
            local_ip=getattr(local, "host", ""), local_port=getattr(local, "port", 0),
            tls=self.conn.tls_active)

        def ok(result):
            _iface, avatar, _logout = result
            user = avatar.decode("utf-8") if isinstance(avatar, bytes) else str(avatar)
            ctx.auth_failures.succeeded(ip)
            self.session.auth_user = user
            if ctx.events is not None:
                ctx.events.auth_attempt(ev.mechanism, "success")
            log.info("{client}: sasl_method={mechanism}, sasl_username={user}", client=self.client,
                     mechanism=ev.mechanism, user=user)
            return Verdict.accept()

        def failed(failure):
            if failure.check(UnauthorizedLogin):
                return self._auth_failed(ev, "invalid credentials")
            if failure.check(TemporaryAuthFailure):  # the checker's service is down: one line
                log.warn("{client}: SASL {mechanism} check for user {user}: {problem}",
                         client=self.client, mechanism=ev.mechanism, user=ev.username,
                         problem=failure.getErrorMessage())
            elif not failure.check(PluginTimeout):   # a timeout is logged by the chain, naming the checker
                log.failure("{client}: SASL {mechanism} check for user {user} failed", failure,
                            client=self.client, mechanism=ev.mechanism, user=ev.username)
            if ctx.events is not None:
                ctx.events.auth_attempt(ev.mechanism, "error")
                ctx.events.command_rejected("auth", AUTH_TEMPFAIL.code)
            return AUTH_TEMPFAIL

        d = ctx.portal.login(credentials, None, IAuthenticatedUser)
        self._decide(d.addCallbacks(ok, failed), self._answer)

    def _on_etrn(self, ev: E.Etrn) -> None:
        if not self.session.trusted:
            log.info("reject: ETRN {node} from {client}: not a trusted client", node=ev.node,
                     client=self.client)
            if self.factory.context.events is not None:
                self.factory.context.events.command_rejected("etrn", ETRN_REFUSED.code)
            self._answer(ETRN_REFUSED)
            return
        count = self.factory.context.scheduler.flush(ev.node)
        log.info("ETRN {node} from {client}: {count} messages scheduled now", node=ev.node,
                 client=self.client, count=count)
        self._answer(Verdict.accept(f"Queuing started for {ev.node}: {count} message(s)"))

    def _auth_failed(self, ev: E.Authenticate, why: str) -> Deferred:
        ctx = self.factory.context
        if ctx.events is not None:
            ctx.events.auth_attempt(ev.mechanism, "failure")
            ctx.events.command_rejected("auth", AUTH_FAILED.code)
        delay = ctx.auth_failures.failed(self.session.client_ip, ctx.reactor.seconds())
        log.info("{client}: SASL {mechanism} authentication failed for user {user}: {why} "
                 "(answering in {delay:.1f}s)", client=self.client, mechanism=ev.mechanism,
                 user=ev.username, why=why, delay=delay)
        return deferLater(ctx.reactor, delay, lambda: AUTH_FAILED)

    # ------------------------------------------------------------- helpers
    def _log_reject(self, stage: str, verdict: Verdict, **fields) -> None:
        self._log_refusal(stage, verdict.code, verdict.enhanced, verdict.text or "", **fields)
        events = self.factory.context.events
        if events is not None:
            # a verdict without a code gets the machine's default reply: 5xx for a
            # rejection, 4xx otherwise
            code = verdict.code or (550 if verdict.kind is Kind.REJECT else 450)
            events.command_rejected(stage.lower(), code)

    def _log_refusal(self, stage: str, code, enhanced, text: str, *, sender: str | None = None,
                     rcpt: str | None = None, helo: str | None = None, proto: str | None = None,
                     **more) -> None:
        """One Postfix-style line: ``NOQUEUE: reject: STAGE from CLIENT: CODE X.Y.Z TEXT; from=<..>
        to=<..> proto=ESMTP helo=<..>`` (from/to/helo when known)."""
        s = self.session
        fields = []
        if sender is not None:
            fields.append(f"from=<{sender}>")
        if rcpt is not None:
            fields.append(f"to=<{rcpt}>")
        fields += [f"{k}={v}" for k, v in more.items()]
        fields.append(f"proto={proto or ('ESMTP' if s.esmtp else 'SMTP')}")
        helo = helo if helo is not None else s.helo
        if helo:
            fields.append(f"helo=<{helo}>")
        text = " / ".join(text.splitlines())   # one log line per event
        log.info("NOQUEUE: reject: {stage} from {client}: {code} {enhanced} {text}; {detail}",
                 stage=stage, client=self.client, code=code, enhanced=enhanced,
                 text=text, detail=" ".join(fields))


_HANDLERS = {
    E.Hello: SMTPServerProtocol._on_hello,
    E.MailFrom: SMTPServerProtocol._on_mail,
    E.RcptTo: SMTPServerProtocol._on_rcpt,
    E.MessageStart: SMTPServerProtocol._on_message_start,
    E.MessageData: SMTPServerProtocol._on_message_data,
    E.MessageAborted: SMTPServerProtocol._on_message_aborted,
    E.MessageRejected: SMTPServerProtocol._on_message_rejected,
    E.MessageEnd: SMTPServerProtocol._on_message_end,
    E.Quit: SMTPServerProtocol._on_quit,
    E.StartTLS: SMTPServerProtocol._on_starttls,
    E.Authenticate: SMTPServerProtocol._on_authenticate,
    E.Etrn: SMTPServerProtocol._on_etrn,
}
