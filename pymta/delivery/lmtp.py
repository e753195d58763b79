"""The ``lmtp`` delivery backend: hand messages to a mail store (Dovecot, Cyrus) over LMTP.

LMTP (RFC 2033) is SMTP without a queue at the other end: after the end of
the content the server answers once per accepted recipient, and each answer
decides that recipient alone: 2xx delivered, 4xx deferred (retried by the
scheduler, e.g. Dovecot's over-quota ``452 4.2.2`` with
``quota_full_tempfail``), 5xx bounced (``552 5.2.2`` mailbox full).  The
session is the SMTP client's (:mod:`pymta.relay.protocol` around the
sans-I/O machine in LMTP mode): LHLO, PIPELINING, 8BITMIME, SMTPUTF8,
CHUNKING and ENHANCEDSTATUSCODES when the server offers them, and the
relay's connection pool (reuse with limits, an unreachable store deferring
everyone for ``dead_destination_time``).

Options (one of ``host`` and ``socket`` is required)::

    host = "127.0.0.1:24"               # TCP; "[host]:port", the port defaults to 24
    socket = "/run/dovecot/lmtp"        # or a UNIX socket (relative: to the config directory)
    helo_name = "mx.example.org"        # the LHLO name (default: [server] hostname)
    max_connections = 20                # sessions at once
    max_recipients = 50                 # RCPTs per transaction
    idle_timeout = "5s"                 # an idle session is kept this long for reuse
    reuse_limit = 100                   # messages per session (0: no limit)
    reuse_time = "5m"                   # a session is reused this long after it opened (0: no limit)
    dead_destination_time = "1m"        # an unreachable store is not tried again this long
    tls = "none"                        # none | may | encrypt | verify (TCP only; see pymta.relay.tls)
    connect_timeout = "30s"             # and the other *_timeout keys of the relay backends

The store is local: it does not make the backend a relay (a route may send
the local domains to it).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer_only

from pymta.plugin_api import IDeliveryBackend, OptionError, Options
from pymta.relay.backend import _SMTPBackend, parse_host
from pymta.relay.connector import HopFailure, failure_result
from pymta.relay.protocol import ClientSession, SessionError, SessionFactory, SessionSettings
from pymta.relay.routing import FixedRouter

#: the LMTP port (RFC 2033 does not fix one; Dovecot's and Postfix's examples use 24)
LMTP_PORT = 24


@implementer_only(IDeliveryBackend)
class LMTPBackend(_SMTPBackend):
    """Delivery of everything routed here to one LMTP server, over TCP or a UNIX socket."""

    kind = "lmtp"
    default_tls = "none"

    def _read_options(self, opts: Options, context: Any) -> None:
        host = opts.str("host", None)
        self.socket = opts.path("socket", context, None)
        if (host is None) == (self.socket is None):
            raise OptionError("host", "give either host (\"127.0.0.1:24\") or socket "
                                      "(\"/run/dovecot/lmtp\"), "
                                      + ("not both" if host is not None else "one is required"))
        self.router: FixedRouter | None = None
        if host is not None:
            try:
                self.router = FixedRouter((parse_host(host, LMTP_PORT),))
            except ValueError as e:
                raise OptionError("host", str(e)) from None
        self.target = self.socket if self.socket is not None else self.router.destination

    def destination(self, recipient: Any) -> str:
        return self.target

    def settings_for(self, destination: str) -> SessionSettings:
        return SessionSettings(self.helo_name, self.timeouts, self.tls, lmtp=True)

    def route(self, destination: str) -> defer.Deferred:
        return self.router.route(destination)

    def _open_session(self, destination: str) -> defer.Deferred:
        if self.socket is None:
            return super()._open_session(destination)
        return self._open_unix(self.socket, self.settings_for(destination))

    @defer.inlineCallbacks
    def _open_unix(self, path: str, settings: SessionSettings):
        endpoint = UNIXClientEndpoint(self.reactor, path, timeout=settings.timeouts.connect)
        factory = SessionFactory(lambda: ClientSession(settings, path, self.reactor))
        try:
            try:
                session = yield endpoint.connect(factory)
            except Exception:
                problem = Failure().getErrorMessage()
                raise SessionError(f"connect to {path}: {problem}", enhanced="4.4.1") from None
            session = yield session.ready
        except SessionError as e:
            raise HopFailure(failure_result([e])) from None
        return session
