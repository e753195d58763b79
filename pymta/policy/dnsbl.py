"""The ``dnsbl`` plugin (connect stage): refuse clients listed in DNS block lists.

For a client 192.0.2.7 and the zone ``zen.spamhaus.org`` the A record of
``7.2.0.192.zen.spamhaus.org`` is looked up (IPv6: 32 reversed nibbles,
RFC 5782 2.4).  An answer in the zone's listing codes means listed: the
client gets ``554 5.7.1 Service unavailable; client host [192.0.2.7] blocked
using zen.spamhaus.org`` followed by the list's TXT text when it publishes
one.  Answers are cached for their TTL (capped by ``max_cache_ttl``; "not
listed" for the zone's negative TTL).  A lookup that fails or times out never
refuses anybody: it is logged and the client is let through (as Postfix
skips a DNSBL that does not answer).

The queries start as soon as the connection is made (``prefetch_connect``),
while the client's name is looked up, and go through the session's resolver
(``session.dns``): when the session's DNS time budget runs out, a lookup
still waiting counts as failed.

Options::

    zones = ["zen.spamhaus.org", {zone = "bl.example.net", codes = ["127.0.0.2", "127.0.0.10/31"]}]
    max_cache_ttl = "1h"     # longest time an answer is reused
    cache_entries = 10000    # answers kept at most (oldest dropped first)

Without ``codes`` any answer in 127.0.0.0/8 counts as listed, except
127.255.255.0/24, which list operators use for errors (e.g. "query refused
through a public resolver").  Clients in trusted networks are not checked.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from pymta.addresses import unmap_ipv4
from pymta.plugin_api import (DNSError, DUNNO, IConnectPolicy, IConnectPrefetch, OptionError,
                              Options, Session, Verdict, describe_value, normalize_domain)

__all__ = ["DNSBL", "Zone", "reverse_query_name", "DEFAULT_LISTED", "ERROR_CODES"]

log = Logger(namespace="pymta.dnsbl")

DEFAULT_LISTED = ipaddress.ip_network("127.0.0.0/8")
ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")
MAX_TEXT = 300
#: session.notes key of the lookups started by prefetch_connect
NOTE = "dnsbl"


@dataclass(frozen=True)
class Zone:
    name: str
    #: answers that mean "listed"; None = 127.0.0.0/8 minus 127.255.255.0/24
    codes: tuple[ipaddress.IPv4Network, ...] | None = None

    def listed(self, answer: str) -> bool:
        try:
            address = ipaddress.IPv4Address(answer)
        except ValueError:
            return False
        if self.codes is None:
            return address in DEFAULT_LISTED and address not in ERROR_CODES
        return any(address in network for network in self.codes)


@dataclass(frozen=True)
class _Entry:
    expires: float
    codes: tuple[str, ...]       # the listing answers; () = not listed
    text: str | None


def reverse_query_name(ip: str, zone: str) -> str:
    """The name to look up for ``ip`` in ``zone`` (RFC 5782 2.1, 2.4)."""
    address = unmap_ipv4(ipaddress.ip_address(ip))
    if address.version == 4:
        labels = reversed(str(address).split("."))
    else:
        labels = reversed(address.exploded.replace(":", ""))
    return ".".join(labels) + "." + zone


@implementer(IConnectPolicy, IConnectPrefetch)
class DNSBL:
    def __init__(self, options: dict[str, Any], context: Any) -> None:
        opts = Options(options)
        raw_zones = opts.value("zones")
        self.max_cache_ttl = opts.duration("max_cache_ttl", default=3600.0, minimum=0)
        self.cache_entries = opts.int("cache_entries", default=10000, minimum=1)
        opts.finish()
        self.zones = _parse_zones(raw_zones)
        if context.resolver is None:
            raise ValueError("the dnsbl plugin needs the shared DNS resolver ([dns])")
        self.resolver = context.resolver
        self._clock = getattr(context.reactor, "seconds", None) or time.time
        self._cache: OrderedDict[tuple[str, str], _Entry] = OrderedDict()

    def _now(self) -> float:
        return self._clock()

    # -- IConnectPrefetch ---------------------------------------------------
    def prefetch_connect(self, session: Session) -> None:
        session.notes[NOTE] = self._check(session)

    # -- IConnectPolicy -----------------------------------------------------
    def check_connect(self, session: Session):
        started = session.notes.pop(NOTE, None)
        return started if started is not None else self._check(session)

    def _check(self, session: Session):
        if session.trusted:
            return DUNNO
        try:
            names = [reverse_query_name(session.client_ip, zone.name) for zone in self.zones]
        except ValueError:
            return DUNNO                 # not an IP client (e.g. a UNIX socket)
        resolver = session.dns if session.dns is not None else self.resolver
        lookups = [self._lookup(resolver, zone, name) for zone, name in zip(self.zones, names)]
        d = defer.gatherResults(lookups, consumeErrors=True)

        def decide(entries: list[_Entry | None]) -> Verdict:
            for zone, entry in zip(self.zones, entries):
                if entry is not None and entry.codes:
                    log.info("dnsbl: {ip} is listed in {zone} ({codes})", ip=session.client_ip,
                             zone=zone.name, codes=", ".join(entry.codes))
                    text = f"Service unavailable; client host [{session.client_ip}] blocked using {zone.name}"
                    if entry.text:
                        text += "; " + entry.text
                    return Verdict.reject(text, 554, "5.7.1")
            return DUNNO
        return d.addCallback(decide)

    # -- lookups and the cache -----------------------------------------------
    def cached(self, zone: str, ip: str) -> _Entry | None:
        entry = self._cache.get((zone, ip))
        if entry is None:
            return None
        if entry.expires <= self._now():
            del self._cache[(zone, ip)]
            return None
        return entry

    def _lookup(self, resolver, zone: Zone, name: str):
        ip_key = name[: -len(zone.name) - 1]
        entry = self.cached(zone.name, ip_key)
        if entry is not None:
            return defer.succeed(entry)
        d = resolver.a_with_ttl(name)

        def answered(answer):
            codes = tuple(v for v in answer.values if zone.listed(v))
            if not codes:
                return self._store(zone.name, ip_key, _Entry(0, (), None), answer.ttl)
            t = resolver.txt_with_ttl(name)

            def with_text(txt):
                text = _clean(" ".join(txt.values)) or None
                return self._store(zone.name, ip_key, _Entry(0, codes, text), min(answer.ttl, txt.ttl))

            def no_text(failure):
                failure.trap(DNSError)
                return self._store(zone.name, ip_key, _Entry(0, codes, None), answer.ttl)
            return t.addCallbacks(with_text, no_text)

        def failed(failure):
            failure.trap(DNSError)
            log.warn("dnsbl: lookup of {name} failed ({reason}); not refusing the client",
                     name=name, reason=failure.value.reason)
            return None
        return d.addCallback(answered).addErrback(failed)

    def _store(self, zone: str, ip_key: str, entry: _Entry, ttl: float) -> _Entry:
        ttl = min(max(ttl, 0), self.max_cache_ttl)
        if ttl > 0:
            entry = _Entry(self._now() + ttl, entry.codes, entry.text)
            key = (zone, ip_key)
            self._cache[key] = entry
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_entries:
                self._cache.popitem(last=False)
        return entry


def _clean(text: str) -> str:
    return "".join(ch if " " <= ch < "\x7f" else " " for ch in text).strip()[:MAX_TEXT]


def _parse_zones(value: Any) -> tuple[Zone, ...]:
    if not isinstance(value, list) or not value:
        raise OptionError("zones", f"expected a non-empty array of zone names or "
                                   f"{{zone = ..., codes = [...]}} tables, got {describe_value(value)}")
    zones = []
    for index, item in enumerate(value):
        key = f"zones[{index}]"
        codes = None
        if isinstance(item, Mapping):
            opts = Options(item)
            try:
                name = opts.str("zone")
                code_list = opts.list_str("codes", default=None, allow_empty_list=False)
                opts.finish()
            except OptionError as e:
                raise OptionError(f"{key}.{e.key}", e.problem) from None
            if code_list is not None:
                parsed = []
                for i, code in enumerate(code_list):
                    try:
                        network = ipaddress.ip_network(code.strip(), strict=True)
                    except ValueError as e:
                        raise OptionError(f"{key}.codes[{i}]", f"not an IPv4 address or network: {e}") from None
                    if network.version != 4:
                        raise OptionError(f"{key}.codes[{i}]", "DNSBL answers are IPv4 addresses")
                    parsed.append(network)
                codes = tuple(parsed)
        elif isinstance(item, str):
            name = item
        else:
            raise OptionError(key, f"expected a zone name or a table, got {describe_value(item)}")
        try:
            name = normalize_domain(name)
        except ValueError as e:
            raise OptionError(key, str(e)) from None
        zones.append(Zone(name, codes))
    return tuple(zones)
