"""PROXY protocol on a listener: the header first, then the listener's own protocol.

A listener with ``proxy_protocol = true`` gets a :class:`ProxyHeaderFactory`
in front of its factory (in front of TLS too, on an implicit-TLS listener:
the load balancer sends the header in clear before the handshake).  For each
connection it

- refuses a peer outside the listener's ``proxy_networks`` at once (the socket
  is closed, nothing is sent);
- reads the header (:mod:`pymta.smtp.proxy`) with a deadline; a bad header, a
  peer that closes first or the deadline closes the connection, nothing sent;
- then builds the listener's protocol with the client address from the
  header (the proxy's own address for v1 ``UNKNOWN`` and v2 ``LOCAL``), so
  that address is the one the factory counts, the session carries and every
  policy, log line and Received field uses; and hands it the connection and
  whatever followed the header in the same read (a pregreet, if any).

Each refusal is one log line.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from pymta.addresses import ip_address
from pymta.config.durations import format_duration
from pymta.smtp.proxy import NEED_DATA, ProxyHeaderError, parse_header

log = Logger(namespace="pymta.smtpd")


class ProxyHeaderFactory(Factory):
    """Wraps a listener's factory: accepts only proxies, reads their header first."""

    noisy = False

    def __init__(self, wrapped_factory, listener, reactor) -> None:
        self.wrapped_factory = wrapped_factory
        self.listener = listener
        self.reactor = reactor

    def doStart(self) -> None:
        self.wrapped_factory.doStart()
        super().doStart()

    def doStop(self) -> None:
        self.wrapped_factory.doStop()
        super().doStop()

    def from_proxy(self, host: str) -> bool:
        addr = ip_address(host)
        return addr is not None and any(addr in net for net in self.listener.proxy_networks)

    def buildProtocol(self, addr):
        host = getattr(addr, "host", "")
        if not self.from_proxy(host):
            log.warn("proxy protocol: refusing {peer} on listener {listener}: not in proxy_networks",
                     peer=_describe(addr), listener=self.listener.name)
            return None          # the port closes the socket; nothing is sent
        return ProxyHeaderProtocol(self, addr)


def _describe(addr) -> str:
    return f"[{getattr(addr, 'host', '?')}]:{getattr(addr, 'port', 0)}"


class ProxyHeaderProtocol(Protocol):
    """Reads one PROXY header, then gives the connection to the wrapped protocol."""

    def __init__(self, factory: ProxyHeaderFactory, peer) -> None:
        self.factory = factory
        self.peer = peer
        self._buffer = b""
        self._timer = None
        self._inner = None        # the listener's protocol once the header is read
        self._done = False

    def connectionMade(self) -> None:
        f = self.factory
        self._timer = f.reactor.callLater(f.listener.proxy_timeout, self._timed_out)

    def dataReceived(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.dataReceived(data)
            return
        if self._done:
            return
        self._buffer += data
        try:
            header = parse_header(self._buffer)
        except ProxyHeaderError as e:
            self._refuse("proxy protocol: bad header from {peer} on listener {listener}: {why}",
                         why=str(e))
            return
        if header is NEED_DATA:
            return
        self._stop_timer()
        self._done = True
        rest = self._buffer[header.length:]
        self._buffer = b""
        if header.source is None:          # v1 UNKNOWN, v2 LOCAL: the proxy's own connection
            client = self.peer
        else:
            host, port = header.source
            client = (IPv6Address if ":" in host else IPv4Address)("TCP", host, port)
        inner = self.factory.wrapped_factory.buildProtocol(client)
        if inner is None:
            self.transport.loseConnection()
            return
        transport = self.transport
        if getattr(transport, "protocol", None) is self:
            transport.protocol = inner     # from now on the socket talks to it directly
        else:
            self._inner = inner
        inner.makeConnection(transport)
        if rest and transport.connected and not transport.disconnecting:
            inner.dataReceived(rest)

    def connectionLost(self, reason=None) -> None:
        if self._inner is not None:
            self._inner.connectionLost(reason)
            return
        if not self._done:
            self._stop_timer()
            self._done = True
            log.info("proxy protocol: {peer} on listener {listener} closed before sending a header",
                     peer=_describe(self.peer), listener=self.factory.listener.name)

    def _timed_out(self) -> None:
        self._timer = None
        self._refuse("proxy protocol: no header from {peer} on listener {listener} within {timeout}",
                     timeout=format_duration(self.factory.listener.proxy_timeout))

    def _refuse(self, format: str, **fields) -> None:
        self._stop_timer()
        self._done = True
        log.warn(format, peer=_describe(self.peer), listener=self.factory.listener.name, **fields)
        self.transport.loseConnection()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
