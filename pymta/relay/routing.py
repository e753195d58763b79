"""Where mail for a domain goes: MX lookup (RFC 5321 5.1, RFC 7505), or a fixed smarthost.

``MXRouter.route(domain)`` fires with a :class:`NextHop` (the hosts to try,
in order) or fails with :class:`RoutingFailure` carrying the
:class:`~pymta.delivery.result.DeliveryResult` every recipient of that
domain gets:

* MX records: by preference, random order among equal preference; if our
  own host name is among them, it and every less preferred host are dropped
  (5.1: we would deliver to ourselves) and an empty list "loops back to
  myself" (5.4.6).
* a null MX (a single MX record with the root as target): a permanent
  failure 5.1.10 at once.
* no MX: the domain itself, when it has an A or AAAA record (the implicit
  MX); with neither, the domain does not exist for mail: 5.1.2.
* SERVFAIL, timeouts: temporary (4.4.3), retried later.
* an address literal ``[192.0.2.1]`` / ``[IPv6:2001:db8::1]``: that address.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from twisted.internet import defer

from pymta.addresses import domain_key
from pymta.delivery.result import DeliveryResult
from pymta.dns.resolver import DNSError


@dataclass(frozen=True)
class NextHop:
    """The hosts that take mail for one destination, in the order to try them."""
    #: what the pool groups connections by: a domain, or "host:port" of a smarthost
    destination: str
    #: (host name or IP address, port)
    hosts: tuple[tuple[str, int], ...]


class RoutingFailure(Exception):
    """No host to try: ``result`` is what every recipient of the destination gets."""

    def __init__(self, result: DeliveryResult) -> None:
        super().__init__(result.summary())
        self.result = result


def address_literal(domain: str) -> str | None:
    """The IP address of an address literal domain ("[192.0.2.1]"), else None."""
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner[:5].lower() == "ipv6:":
        inner = inner[5:]
    try:
        return str(ipaddress.ip_address(inner))
    except ValueError:
        return None


def order_mx(records: list[Any], rng: random.Random | Any = random) -> list[Any]:
    """MX records by preference, shuffled among equal preference (RFC 5321 5.1)."""
    ordered: list[Any] = []
    for _, group in groupby(sorted(records, key=lambda r: r.preference), key=lambda r: r.preference):
        same = list(group)
        rng.shuffle(same)
        ordered.extend(same)
    return ordered


class MXRouter:
    """Routes a recipient domain through DNS."""

    def __init__(self, resolver: Any, local_names: tuple[str, ...] = (), port: int = 25,
                 max_hosts: int = 5, rng: random.Random | Any = random) -> None:
        self.resolver = resolver
        self.local_names = {name.lower().rstrip(".") for name in local_names}
        self.port = port
        self.max_hosts = max_hosts
        self.rng = rng

    @defer.inlineCallbacks
    def route(self, domain: str):
        literal = address_literal(domain)
        if literal is not None:
            return NextHop(domain, ((literal, self.port),))
        name = domain_key(domain)
        try:
            records = yield self.resolver.mx(name)
        except DNSError as e:
            raise RoutingFailure(DeliveryResult.deferred(
                f"Host or domain name lookup failed: {e}", 451, "4.4.3")) from None
        if any(not r.host for r in records):
            raise RoutingFailure(DeliveryResult.failed(
                f"Domain {name} does not accept mail (null MX, RFC 7505)", 556, "5.1.10"))
        if not records:
            yield self._check_implicit_mx(name)
            return NextHop(name, ((name, self.port),))
        ordered = order_mx(records, self.rng)
        own = [r.preference for r in ordered if r.host in self.local_names]
        if own:
            ordered = [r for r in ordered if r.preference < min(own)]
            if not ordered:
                raise RoutingFailure(DeliveryResult.failed(
                    f"mail for {name} loops back to myself (this host is its best MX)",
                    554, "5.4.6"))
        hosts = []
        for record in ordered:
            if (record.host, self.port) not in hosts:
                hosts.append((record.host, self.port))
        return NextHop(name, tuple(hosts[: self.max_hosts]))

    @defer.inlineCallbacks
    def _check_implicit_mx(self, name: str):
        problems = []
        found = False
        for kind in ("aaaa", "a"):
            try:
                addresses = yield getattr(self.resolver, kind)(name)
            except DNSError as e:
                problems.append(str(e))
                continue
            found = found or bool(addresses)
        if found:
            return
        if problems:
            raise RoutingFailure(DeliveryResult.deferred(
                f"Host or domain name lookup failed: {'; '.join(problems)}", 451, "4.4.3"))
        raise RoutingFailure(DeliveryResult.failed(
            f"Host or domain name not found: {name} has no MX, A or AAAA record", 550, "5.1.2"))


class FixedRouter:
    """A smarthost: the same hosts for every domain."""

    def __init__(self, hosts: tuple[tuple[str, int], ...]) -> None:
        self.hosts = hosts
        self.destination = ",".join(f"{h}:{p}" for h, p in hosts)

    def route(self, domain: str) -> defer.Deferred:
        return defer.succeed(NextHop(self.destination, self.hosts))
