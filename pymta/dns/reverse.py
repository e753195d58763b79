"""The client's name: a reverse lookup confirmed by a forward one, as Postfix's smtpd does.

A client is called by a name only when the name's address records lead
back to the client's address (forward-confirmed reverse DNS): the PTR names
of the address are looked up (at most :data:`MAX_NAMES` of them), and the
first whose A (or AAAA) records hold the address is the client's name.
Anything else (no PTR, no name that leads back, a DNS error, a timeout, a
name that is not a well-formed host name) gives ``"unknown"``, which is what
logs and ``Received:`` fields then say, as Postfix does.

The hosts file (``[dns] hosts_file``, ``/etc/hosts`` by default) is read
first, as the system resolver would: an address listed there is called by
its first name there, with no DNS query; the file is re-read when it
changes.  127.0.0.1 and ::1, when not listed there, are ``localhost`` (RFC
6303: their reverse names are never asked of DNS).

A lookup never fails: its Deferred always fires with a name or "unknown",
after two steps at most (the PTR query, then the forward queries of its
names all at once), each bounded by ``[dns] timeout`` x ``attempts`` for
each nameserver tried, and both together by the session's DNS time budget
(``[dns] session_budget``, :mod:`pymta.dns.budget`) when the session's
resolver is given.
"""

from __future__ import annotations

import ipaddress
import re

from twisted.internet import defer
from twisted.logger import Logger

from pymta.addresses import ip_address
from pymta.config.watched_file import WatchedFile
from pymta.dns.resolver import DNSError

log = Logger()

UNKNOWN = "unknown"
#: PTR names tried for one address (Postfix checks them all; a long list is an abuse)
MAX_NAMES = 5

_LOCALHOST = (ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1"))
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9])?"
_HOST_NAME = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}")


def well_formed_host_name(name: str) -> bool:
    """Letters, digits, hyphens (and underscores) in dot-separated labels of up to 63: safe to log.

    A name whose last label is all digits looks like an address
    ("192.0.2.7"), and is refused as Postfix refuses it.
    """
    return (len(name) <= 253 and _HOST_NAME.fullmatch(name) is not None
            and not name.rpartition(".")[2].isdigit())


def parse_hosts(path: str) -> dict[str, str]:
    """address -> first name, from a hosts(5) file (the first line for an address wins)."""
    names: dict[str, str] = {}
    with open(path, encoding="utf-8", errors="replace") as fp:
        for line in fp:
            fields = line.split("#", 1)[0].split()
            if len(fields) < 2:
                continue
            address = ip_address(fields[0])
            name = fields[1].rstrip(".").lower()
            if address is None or not well_formed_host_name(name):
                continue
            names.setdefault(str(address), name)
    return names


class ClientNames:
    """Finds the name of each client; one per server, shared by every session."""

    def __init__(self, resolver, hosts_file: str | None = "/etc/hosts") -> None:
        """``resolver``: a :class:`pymta.dns.resolver.DNSResolver`; ``hosts_file``: None or "" for none."""
        self.resolver = resolver
        self._hosts: WatchedFile[dict[str, str]] | None = None
        if hosts_file:
            try:
                self._hosts = WatchedFile(hosts_file, parse_hosts, what="hosts file")
            except OSError as e:
                # like the system resolver without /etc/hosts: DNS only
                log.warn("hosts file {path} cannot be read ({error}); client names from DNS only",
                         path=hosts_file, error=e.strerror)

    def lookup(self, ip: str, resolver=None) -> defer.Deferred:
        """Fires with the client's confirmed name, or "unknown"; never errbacks.

        ``resolver``: the session's (``session.dns``, which bounds the wait by
        the session's DNS time budget); the shared one when None."""
        resolver = resolver if resolver is not None else self.resolver
        address = ip_address(ip)
        if address is None:
            return defer.succeed(UNKNOWN)
        if self._hosts is not None:
            name = self._hosts.current().get(str(address))
            if name is not None:
                return defer.succeed(name)
        if address in _LOCALHOST:
            # served locally, never asked of DNS (RFC 6303 4.2, 4.3; RFC 6761 6.3)
            return defer.succeed("localhost")
        d = resolver.ptr(address.reverse_pointer)
        d.addCallback(self._confirm, address, resolver)
        d.addErrback(self._failed, address)
        return d

    @defer.inlineCallbacks
    def _confirm(self, names: list[str], address, resolver):
        """The first of ``names`` whose address records hold ``address`` (asked all at once)."""
        forward = resolver.a if address.version == 4 else resolver.aaaa
        candidates = []
        for name in names[:MAX_NAMES]:
            if well_formed_host_name(name):
                candidates.append(name)
            else:
                log.warn("{ip}: ignoring malformed host name {name!r} in its PTR records",
                         ip=str(address), name=name[:100])
        answers = yield defer.DeferredList([forward(name) for name in candidates], consumeErrors=True)
        for name, (ok, result) in zip(candidates, answers):
            if not ok:
                log.info("{ip}: cannot confirm its host name {name}: {error}",
                         ip=str(address), name=name, error=result.getErrorMessage())
            elif any(ip_address(a) == address for a in result):
                return name
            else:
                log.warn("hostname {name} does not resolve to address {ip}", name=name, ip=str(address))
        return UNKNOWN

    @staticmethod
    def _failed(failure, address) -> str:
        if failure.check(DNSError):
            log.info("{ip}: reverse lookup failed: {error}", ip=str(address), error=failure.value)
        else:
            log.failure("{ip}: reverse lookup failed", failure, ip=str(address))
        return UNKNOWN
