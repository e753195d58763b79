"""Host name resolution for outbound connections through the shared DNS resolver.

``HostnameEndpoint`` resolves the name it connects to with the reactor's
``nameResolver``, which is the system's ``getaddrinfo``.  Mail routing must
use the configured ``[dns]`` servers instead (and the tests their own
loopback DNS server), so :func:`resolving_reactor` wraps the reactor in a
proxy whose ``nameResolver`` asks :class:`pymta.dns.resolver.DNSResolver`
for AAAA and A records.  IPv6 and IPv4 addresses are interleaved, IPv6
first (RFC 8305), and ``HostnameEndpoint`` races them as usual.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHostnameResolver, IReactorPluggableNameResolver
from zope.interface import implementer


class _Resolution:
    def __init__(self, name: str) -> None:
        self.name = name

    def cancel(self) -> None:
        pass


def interleave(v6: list[str], v4: list[str]) -> list[str]:
    """IPv6 and IPv4 addresses alternating, IPv6 first (RFC 8305 4)."""
    out: list[str] = []
    for i in range(max(len(v6), len(v4))):
        out.extend(a[i] for a in (v6, v4) if i < len(a))
    return out


@implementer(IHostnameResolver)
class DNSHostnameResolver:
    """An IHostnameResolver on top of the shared DNSResolver.

    ``problems[name]`` keeps why the last resolution of ``name`` found
    nothing ("no address records", "A lookup of ... failed: timeout"), so
    that a failed connection can say why.
    """

    def __init__(self, resolver: Any) -> None:
        self.resolver = resolver
        self.problems: dict[str, str] = {}

    def resolveHostName(self, receiver, hostName: str, portNumber: int = 0,
                        addressTypes=None, transportSemantics: str = "TCP"):
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        want_v4 = addressTypes is None or IPv4Address in addressTypes
        want_v6 = addressTypes is None or IPv6Address in addressTypes
        literal = hostName.strip("[]")
        if literal.lower().startswith("ipv6:"):
            literal = literal[5:]
        try:
            address = ipaddress.ip_address(literal)
        except ValueError:
            address = None
        if address is not None:
            if address.version == 6 and want_v6:
                receiver.addressResolved(IPv6Address("TCP", str(address), portNumber))
            elif address.version == 4 and want_v4:
                receiver.addressResolved(IPv4Address("TCP", str(address), portNumber))
            receiver.resolutionComplete()
            return resolution

        lookups = [self._lookup("aaaa", hostName, want_v6), self._lookup("a", hostName, want_v4)]

        def found(results) -> None:
            (v6, v6_problem), (v4, v4_problem) = results
            if not v6 and not v4:
                self.problems[hostName] = v6_problem or v4_problem or "no A or AAAA record"
            else:
                self.problems.pop(hostName, None)
            for ip in interleave(v6, v4):
                kind = IPv6Address if ":" in ip else IPv4Address
                receiver.addressResolved(kind("TCP", ip, portNumber))
            receiver.resolutionComplete()

        defer.gatherResults(lookups).addCallback(found)
        return resolution

    def _lookup(self, kind: str, name: str, wanted: bool) -> defer.Deferred:
        if not wanted:
            return defer.succeed(([], None))
        d = defer.maybeDeferred(getattr(self.resolver, kind), name)
        d.addCallbacks(lambda addresses: (list(addresses), None),
                       lambda failure: ([], failure.getErrorMessage()))
        return d


@implementer(IReactorPluggableNameResolver)
class _ResolvingReactor:
    """The reactor, with ``nameResolver`` replaced (everything else delegated)."""

    def __init__(self, reactor: Any, name_resolver: DNSHostnameResolver) -> None:
        self._reactor = reactor
        self.nameResolver = name_resolver

    def installNameResolver(self, resolver):   # IReactorPluggableNameResolver
        previous, self.nameResolver = self.nameResolver, resolver
        return previous

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


def resolving_reactor(reactor: Any, name_resolver: DNSHostnameResolver) -> Any:
    """A reactor for ``HostnameEndpoint`` that resolves through ``name_resolver``."""
    return _ResolvingReactor(reactor, name_resolver)
