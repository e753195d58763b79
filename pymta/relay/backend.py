"""The ``relay`` (MX routing) and ``smarthost`` delivery backends.

Both deliver spooled messages over SMTP: recipients are grouped by
destination (the recipient domain for ``relay``, the one next hop for
``smarthost``) and by at most ``max_recipients``; each group is one mail
transaction on a pooled connection (:mod:`pymta.relay.pool`).  Each
recipient gets its own result: 2xx delivered, 4xx deferred, 5xx failed; a
reply to the whole transaction (MAIL, DATA, end of data) applies to all its
recipients; a session that cannot be set up (no host reachable, TLS
required but not available ...) defers everyone.

Options common to both (all optional)::

    helo_name = "mx.example.org"        # default: [server] hostname
    max_connections = 20                # sessions at once per destination
    max_recipients = 50                 # RCPTs per transaction
    idle_timeout = "5s"                 # an idle session is kept this long for reuse
    reuse_limit = 100                   # messages per session (0: no limit)
    reuse_time = "5m"                   # a session is reused this long after it opened (0: no limit)
    dead_destination_time = "1m"        # an unreachable destination is not tried again this long
    tls = "may"                         # none | may | encrypt | verify (see pymta.relay.tls)
    ca_file = "ca.pem"                  # CAs for tls = "verify" (default: the system's)
    connect_timeout = "30s"             # and greeting_, helo_, starttls_, auth_, mail_, rcpt_,
                                        # data_init_, data_block_, data_done_, rset_, quit_timeout

``relay`` only::

    port = 25
    max_mx_hosts = 5                    # MX hosts tried per delivery
    [backends.NAME.tls_policy]          # per destination domain: a TLS level
    "bank.example" = "verify"

``smarthost`` only::

    host = "smtp.example.net:587"       # required; "[host]:port", or a list tried in order
    username = "..."                    # AUTH PLAIN/LOGIN; with password or password_file
    password = "..."
    password_file = "secret"            # the first line is the password; chmod 600 (refused if world-readable)
    auth_without_tls = false            # send credentials over plaintext (never by default)
"""

from __future__ import annotations

import collections
import os
import stat
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from pymta.addresses import domain_key
from pymta.envelope import Recipient
from pymta.permissions import is_world_readable
from pymta.plugin_api import (DeliveryResult, IClosable, IDeliveryBackend, IRemoteDelivery, OptionError,
                              Options)
from pymta.relay.connector import HopFailure, SessionOpener
from pymta.relay.pool import DestinationPool, PoolLimits, ShuttingDown, StaleConnection
from pymta.relay.protocol import ClientSession, Credentials, SessionSettings
from pymta.relay.routing import FixedRouter, MXRouter, RoutingFailure
from pymta.relay.tls import TLS_LEVELS, TLSPolicy
from pymta.smtp import client as C

#: octets of the body scanned at a time for 8-bit content
_SCAN_CHUNK = 256 * 1024


def _read_timeouts(opts: Options) -> C.ClientTimeouts:
    defaults = C.ClientTimeouts()
    values = {}
    for name in C.ClientTimeouts.__dataclass_fields__:
        values[name] = opts.duration(f"{name}_timeout", getattr(defaults, name), above=0)
    return C.ClientTimeouts(**values)


def _tls_policy(level: str, ca_file: str | None, key: str) -> TLSPolicy:
    try:
        return TLSPolicy(level, ca_file)
    except ValueError as e:
        raise OptionError(key, str(e)) from None


def parse_host(text: str, default_port: int = 25) -> tuple[str, int]:
    """ "host", "host:port", "[host]:port", "[2001:db8::1]:587" -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"no host name in {text!r}")
    if port:
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad port in {text!r}")
        return host, int(port)
    return host, default_port


def message_needs_smtputf8(message: Any, recipients: list[Recipient]) -> bool:
    """RFC 6531 3.4: non-ASCII in the envelope addresses or in the header fields."""
    envelope = message.envelope
    if not envelope.sender.isascii() or not all(r.address.isascii() for r in recipients):
        return True
    if not message.prepend_bytes().isascii():
        return True
    return not all(name.isascii() and value.isascii() for name, value in message.headers())


def message_has_8bit(message: Any) -> bool:
    if not message.prepend_bytes().isascii():
        return True
    with message.open_body() as fp:
        while chunk := fp.read(_SCAN_CHUNK):
            if not chunk.isascii():
                return True
    return False


def _orcpt(recipient: Recipient) -> str | None:
    if recipient.orcpt:
        return recipient.orcpt
    if "@" in recipient.original and recipient.original.isascii():
        return f"rfc822;{recipient.original}"
    return None


def delivery_result(result: C.RecipientResult, session: ClientSession) -> DeliveryResult:
    """What the scheduler records for one recipient's reply."""
    reply = result.reply
    enhanced = reply.enhanced or f"{reply.code // 100}.0.0"
    if reply.ok:
        return DeliveryResult("delivered", reply.code, enhanced, reply.text or "delivered",
                              session.peer, remote_mta=session.host,
                              notify_forwarded="DSN" in session.extensions)
    if reply.local:
        text = f"{reply.text} (conversation with {session.peer})" if reply.temporary else reply.text
        diagnostic = None
    else:
        text = f"host {session.peer} said: {reply.text} (in reply to {result.command} command)"
        diagnostic = f"smtp; {reply.code} {enhanced} {reply.text}".rstrip()
    return DeliveryResult("deferred" if reply.temporary else "failed", reply.code, enhanced, text,
                          session.peer, remote_mta=session.host, diagnostic=diagnostic)


@implementer(IRemoteDelivery, IClosable)
class _SMTPBackend:
    """What relay and smarthost share: options, the pool, one transaction per group."""

    kind = "smtp"
    #: the ``tls`` option when not given
    default_tls = "may"

    def __init__(self, options: dict[str, Any], context: Any) -> None:
        opts = Options(options)
        self.reactor = context.reactor
        if self.reactor is None:
            from twisted.internet import reactor
            self.reactor = reactor
        self.helo_name = opts.str("helo_name", context.hostname)
        self.max_recipients = opts.int("max_recipients", 50, minimum=1)
        limits = PoolLimits(
            max_connections=opts.int("max_connections", PoolLimits.max_connections, minimum=1),
            idle_timeout=opts.duration("idle_timeout", PoolLimits.idle_timeout, minimum=0),
            reuse_limit=opts.int("reuse_limit", PoolLimits.reuse_limit, minimum=0),
            reuse_time=opts.duration("reuse_time", PoolLimits.reuse_time, minimum=0),
            dead_time=opts.duration("dead_destination_time", PoolLimits.dead_time, minimum=0))
        self.timeouts = _read_timeouts(opts)
        level = opts.str("tls", self.default_tls, choices=TLS_LEVELS)
        self.ca_file = opts.path("ca_file", context, None)
        self.tls = _tls_policy(level, self.ca_file, "ca_file" if self.ca_file else "tls")
        self._read_options(opts, context)
        opts.finish()
        resolver = getattr(context, "resolver", None)
        if resolver is None:
            from pymta.dns.resolver import DNSResolver
            resolver = DNSResolver(reactor=self.reactor)
        self.resolver = resolver
        self.opener = SessionOpener(self.reactor, resolver)
        self.pool = DestinationPool(self.reactor, self._open_session, limits)
        self._setup(context)

    # -- hooks for the two kinds ------------------------------------------------------
    def _read_options(self, opts: Options, context: Any) -> None:
        raise NotImplementedError

    def _setup(self, context: Any) -> None:
        pass

    def destination(self, recipient: Recipient) -> str:
        raise NotImplementedError

    def settings_for(self, destination: str) -> SessionSettings:
        return SessionSettings(self.helo_name, self.timeouts, self.tls)

    def route(self, destination: str) -> defer.Deferred:
        raise NotImplementedError

    # -- IDeliveryBackend ---------------------------------------------------------------
    def deliver(self, message: Any, recipients: list[Recipient]) -> defer.Deferred:
        groups: dict[str, list[int]] = collections.OrderedDict()
        for index, recipient in enumerate(recipients):
            groups.setdefault(self.destination(recipient), []).append(index)
        if len(groups) == 1 and len(recipients) <= self.max_recipients:
            # the common case: one transaction, its results are the answer
            return self._deliver_group(next(iter(groups)), message, list(recipients))
        results: list[DeliveryResult | None] = [None] * len(recipients)
        waits = []
        for destination, indices in groups.items():
            for start in range(0, len(indices), self.max_recipients):
                chunk = indices[start:start + self.max_recipients]
                d = self._deliver_group(destination, message, [recipients[i] for i in chunk])
                d.addCallback(self._place, results, chunk)
                waits.append(d)
        done = defer.gatherResults(waits, consumeErrors=True)
        done.addCallback(lambda _: results)
        done.addErrback(lambda f: f.value.subFailure if hasattr(f.value, "subFailure") else f)
        return done

    @staticmethod
    def _place(group_results: list[DeliveryResult], results: list, indices: list[int]) -> None:
        for index, result in zip(indices, group_results):
            results[index] = result

    def _deliver_group(self, destination: str, message: Any,
                       recipients: list[Recipient]) -> defer.Deferred:
        state: dict[str, Any] = {}

        def job(session: ClientSession) -> defer.Deferred:
            if "size" not in state:
                state["size"] = len(message.prepend_bytes()) + message.envelope.size
            transaction = self._transaction(message, recipients, session, state, state["size"])
            d = session.send(transaction, message)

            def done(event: C.TransactionDone):
                results = [delivery_result(r, session) for r in event.results]
                if not event.answered and any(r.status != "failed" for r in results):
                    raise StaleConnection(results)
                return results
            return d.addCallback(done)

        def unreachable(failure):
            if failure.check(ShuttingDown):
                return [DeliveryResult.deferred("pymta is shutting down", 451, "4.3.2")] \
                    * len(recipients)
            failure.trap(HopFailure, RoutingFailure)
            return [failure.value.result] * len(recipients)

        return self.pool.submit(destination, job).addErrback(unreachable)

    def _transaction(self, message: Any, recipients: list[Recipient], session: ClientSession,
                     state: dict[str, Any], content_size: int) -> C.MailTransaction:
        envelope = message.envelope
        if "smtputf8" not in state:
            state["smtputf8"] = envelope.smtputf8 and message_needs_smtputf8(message, recipients)
        eight_bit = None
        if envelope.body == "8BITMIME" and "8BITMIME" not in session.extensions:
            if "8bit" not in state:
                state["8bit"] = message_has_8bit(message)
            eight_bit = state["8bit"]
        return C.MailTransaction(
            sender=envelope.sender_for(recipients[0]),     # one sender a call: the scheduler splits
            recipients=tuple(C.RecipientSpec(r.address, r.notify, _orcpt(r)) for r in recipients),
            size=content_size, body=envelope.body, eight_bit=eight_bit,
            smtputf8=envelope.smtputf8, smtputf8_required=state["smtputf8"],
            ret=envelope.ret, envid=envelope.envid)

    # -- sessions -----------------------------------------------------------------------
    def _open_session(self, destination: str) -> defer.Deferred:
        d = self.route(destination)
        d.addCallback(lambda hop: self.opener.open(hop, self.settings_for(destination)))
        return d

    def forget_failures(self) -> None:
        """ETRN / queue flush: try destinations found unreachable again at once."""
        self.pool.forget_failures()

    def close(self, grace: float = 10.0) -> None:
        """At shutdown (called by a reactor trigger too), and after a reload once no
        delivery uses this backend (IClosable): see DestinationPool.close."""
        self.pool.close(grace)


@implementer(IDeliveryBackend)
class RelayBackend(_SMTPBackend):
    """Delivery to the MX hosts of each recipient's domain."""

    kind = "relay"

    def _read_options(self, opts: Options, context: Any) -> None:
        self.port = opts.int("port", 25, minimum=1, maximum=65535)
        self.max_mx_hosts = opts.int("max_mx_hosts", 5, minimum=1)
        policies = opts.table("tls_policy", {})
        self.tls_policy: dict[str, TLSPolicy] = {}
        for domain, level in policies.items():
            key = f"tls_policy.{domain}"
            if not isinstance(level, str) or level not in TLS_LEVELS:
                raise OptionError(key, f"expected one of {', '.join(repr(t) for t in TLS_LEVELS)}, "
                                       f"got {level!r}")
            self.tls_policy[domain_key(domain)] = _tls_policy(level, self.ca_file, key)

    def _setup(self, context: Any) -> None:
        self.router = MXRouter(self.resolver, (context.hostname,), self.port, self.max_mx_hosts)

    def destination(self, recipient: Recipient) -> str:
        domain = recipient.address.rpartition("@")[2]
        return domain if domain.startswith("[") else domain_key(domain)

    def settings_for(self, destination: str) -> SessionSettings:
        return SessionSettings(self.helo_name, self.timeouts,
                               self.tls_policy.get(destination, self.tls))

    def route(self, destination: str) -> defer.Deferred:
        return self.router.route(destination)


@implementer(IDeliveryBackend)
class SmarthostBackend(_SMTPBackend):
    """Delivery of everything routed here to one fixed next hop."""

    kind = "smarthost"

    def _read_options(self, opts: Options, context: Any) -> None:
        value = opts.value("host")
        hosts = [value] if isinstance(value, str) else value
        if not isinstance(hosts, list) or not hosts or not all(isinstance(h, str) for h in hosts):
            raise OptionError("host", "expected \"host[:port]\" or an array of them, "
                                      f"got {value!r}")
        parsed = []
        for index, text in enumerate(hosts):
            try:
                parsed.append(parse_host(text))
            except ValueError as e:
                raise OptionError("host" if isinstance(value, str) else f"host[{index}]",
                                  str(e)) from None
        self.hosts = tuple(parsed)
        username = opts.str("username", None)
        password = opts.str("password", None, allow_empty=True)
        password_file = opts.path("password_file", context, None)
        allow_plaintext = opts.bool("auth_without_tls", False)
        if password is not None and password_file is not None:
            raise OptionError("password_file", "give either password or password_file, not both")
        if password_file is not None:
            try:
                with open(password_file, encoding="utf-8") as fp:
                    mode = os.fstat(fp.fileno()).st_mode
                    if is_world_readable(mode):
                        # as the AUTH password file (pymta.auth.passwdfile)
                        raise OptionError("password_file", f"{password_file} is world-readable "
                                          f"(mode {stat.S_IMODE(mode):04o}); the password is a secret: "
                                          "chmod 600 it")
                    password = fp.readline().rstrip("\r\n")
            except OSError as e:
                raise OptionError("password_file", f"cannot read {password_file}: {e.strerror}") from None
        if username is not None and password is None:
            raise OptionError("password", "username is set: password or password_file is required")
        if username is None and password is not None:
            raise OptionError("username", "a password is set: username is required")
        self.credentials = (Credentials(username, password, allow_plaintext)
                            if username is not None else None)

    def _setup(self, context: Any) -> None:
        self.router = FixedRouter(self.hosts)

    def destination(self, recipient: Recipient) -> str:
        return self.router.destination

    def settings_for(self, destination: str) -> SessionSettings:
        return SessionSettings(self.helo_name, self.timeouts, self.tls, self.credentials)

    def route(self, destination: str) -> defer.Deferred:
        return self.router.route(destination)
