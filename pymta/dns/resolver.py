"""The shared DNS resolver: explicit MX/A/AAAA/TXT/PTR lookups on twisted.names.

One :class:`DNSResolver` per server, built from the ``[dns]`` config table
(nameservers and timeouts), handed to every component that needs DNS, so
that tests can point all of them at a loopback DNS server and sites at
their own resolver.

Results are plain Python values; failures are :class:`DNSError` with a
``temporary`` flag: NXDOMAIN and "no such record" are *not* errors (they
give an empty list), SERVFAIL, refused and timeouts are temporary errors.
A name that cannot be put into a query (an empty label, a label over 63
octets) is a permanent error.

The ``*_with_ttl`` variants fire with an :class:`Answer`: the same values
plus how long they may be cached (the smallest TTL of the answer records;
for "no such name/record" the negative-caching TTL of the zone's SOA,
RFC 2308 5, or :data:`NEGATIVE_TTL` when the server sent none).

Answers are cached (:mod:`pymta.dns.cache`): records and "no such
name/record" for their TTL, temporary failures for ``failure_ttl``
seconds, at most ``cache_entries`` entries.  Identical questions in flight
are asked once (``twisted.names.client.Resolver`` shares them).  A
session's lookups go through :class:`pymta.dns.budget.SessionResolver`,
which bounds the time the session waits for all of them.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.names import client, dns, error

from pymta.dns.cache import AnswerCache
from pymta.handoff import handed_off


@dataclass(frozen=True)
class MX:
    preference: int
    host: str


#: seconds a negative answer is cached when the server sent no SOA record
NEGATIVE_TTL = 300


@dataclass(frozen=True)
class Answer:
    """The values of one lookup and for how many seconds they may be cached."""

    values: list
    ttl: int


class DNSError(Exception):
    def __init__(self, name: str, rtype: str, reason: str, temporary: bool = True) -> None:
        super().__init__(f"{rtype} lookup of {name} failed: {reason}")
        self.name, self.rtype, self.reason, self.temporary = name, rtype, reason, temporary


def parse_nameserver(text: str) -> tuple[str, int]:
    """ "192.0.2.1", "192.0.2.1:5353", "[2001:db8::1]:53", "::1" → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else 53
    if text.count(":") == 1:
        host, port = text.split(":")
        return host, int(port)
    return text, 53


class DNSResolver:
    """Asynchronous lookups with configurable nameservers and timeout."""

    def __init__(self, nameservers: list[str] | None = None, timeout: float = 5.0,
                 attempts: int = 2, reactor=None, cache_entries: int = 10000,
                 failure_ttl: float = 30.0) -> None:
        self.nameservers = [parse_nameserver(s) for s in nameservers] if nameservers else None
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self._reactor = reactor
        self._client: client.Resolver | None = None
        self.cache = AnswerCache(self._seconds, cache_entries, failure_ttl)

    def _seconds(self) -> float:
        if self._reactor is None:
            from twisted.internet import reactor
            self._reactor = reactor
        return self._reactor.seconds()

    @property
    def _resolver(self) -> client.Resolver:
        """The twisted.names client, made on first use (no timers or sockets at config time)."""
        if self._client is None:
            timeouts = tuple([self.timeout] * self.attempts)
            if self.nameservers:
                self._client = client.Resolver(servers=self.nameservers, timeout=timeouts,
                                               reactor=self._reactor)
            else:
                self._client = client.Resolver(resolv="/etc/resolv.conf", timeout=timeouts,
                                               reactor=self._reactor)
        return self._client

    def close(self) -> None:
        """No more lookups (a reload replaced this resolver): stop re-reading resolv.conf."""
        parse_call = getattr(self._client, "_parseCall", None)
        if parse_call is not None and parse_call.active():
            parse_call.cancel()

    # -------------------------------------------------------------- lookups
    def _query(self, method: str, name: str, rtype: str, convert, with_ttl: bool = False) -> Deferred:
        cached = self.cache.get(rtype, name)
        if isinstance(cached, DNSError):
            return defer.fail(DNSError(name, rtype, f"{cached.reason}, cached"))
        if cached is not None:
            values, ttl = cached
            return defer.succeed(Answer(values, ttl) if with_ttl else values)
        try:
            d = getattr(self._resolver, method)(name)
        except (UnicodeError, ValueError) as e:
            # the name cannot be encoded into a query (empty or over-long label)
            return defer.fail(DNSError(name, rtype, f"invalid domain name: {e}", temporary=False))
        rtype_code = getattr(dns, rtype)

        def ok(result):
            answers, authority, _additional = result
            values = convert(answers)
            ttls = [a.ttl for a in answers if a.type in (rtype_code, dns.CNAME)]
            answer = Answer(values, int(min(ttls)) if values and ttls else _negative_ttl(authority))
            self.cache.put(rtype, name, values, answer.ttl)
            return answer if with_ttl else values

        def failed(failure):
            if failure.check(error.DNSNameError):
                message = failure.value.args[0] if failure.value.args else None
                answer = Answer([], _negative_ttl(getattr(message, "authority", ())))
                self.cache.put(rtype, name, [], answer.ttl)
                return answer if with_ttl else []            # NXDOMAIN
            problem = _problem(failure, name, rtype)
            self.cache.put_failure(rtype, name, problem)
            raise problem

        d.addCallbacks(ok, failed)
        return handed_off(d)

    @staticmethod
    def _records(answers, rtype_code):
        return [a.payload for a in answers if a.type == rtype_code]

    def mx(self, name: str) -> Deferred:
        """Fires with [MX(preference, host)] sorted by preference; [] if none.

        A null MX (RFC 7505) comes back as [MX(0, "")]."""
        def convert(answers):
            out = [MX(p.preference, _host_text(p.name))
                   for p in self._records(answers, dns.MX)]
            return sorted(out, key=lambda m: m.preference)
        return self._query("lookupMailExchange", name, "MX", convert)

    def a(self, name: str) -> Deferred:
        """Fires with [IPv4 address strings]."""
        return self._query("lookupAddress", name, "A", self._a_values)

    def a_with_ttl(self, name: str) -> Deferred:
        """Fires with an :class:`Answer` of IPv4 address strings (DNSBL lookups)."""
        return self._query("lookupAddress", name, "A", self._a_values, with_ttl=True)

    @classmethod
    def _a_values(cls, answers) -> list[str]:
        return [p.dottedQuad() for p in cls._records(answers, dns.A)]

    def aaaa(self, name: str) -> Deferred:
        """Fires with [IPv6 address strings]."""
        import socket
        return self._query("lookupIPV6Address", name, "AAAA",
                           lambda ans: [socket.inet_ntop(socket.AF_INET6, p.address)
                                        for p in self._records(ans, dns.AAAA)])

    def txt(self, name: str) -> Deferred:
        """Fires with [text]: each TXT record's strings joined (RFC 7208 3.3), bytes decoded as latin-1."""
        return self._query("lookupText", name, "TXT", self._txt_values)

    def txt_with_ttl(self, name: str) -> Deferred:
        """Fires with an :class:`Answer` of TXT texts (joined as by :meth:`txt`)."""
        return self._query("lookupText", name, "TXT", self._txt_values, with_ttl=True)

    @classmethod
    def _txt_values(cls, answers) -> list[str]:
        return [b"".join(p.data).decode("latin-1") for p in cls._records(answers, dns.TXT)]

    def ptr(self, name: str) -> Deferred:
        """Fires with [host names] for a reverse name (e.g. 4.3.2.1.in-addr.arpa)."""
        return self._query("lookupPointer", name, "PTR",
                           lambda ans: [_host_text(p.name)
                                        for p in self._records(ans, dns.PTR)])


def _problem(failure, name: str, rtype: str) -> DNSError:
    """The temporary :class:`DNSError` for a failed query."""
    if failure.check(error.DNSServerError):
        return DNSError(name, rtype, "server failure (SERVFAIL)")
    if failure.check(error.DNSQueryRefusedError):
        return DNSError(name, rtype, "query refused")
    if failure.check(error.DNSFormatError, error.DNSNotImplementedError, error.DNSUnknownError):
        return DNSError(name, rtype, failure.getErrorMessage() or "bad answer")
    if failure.check(error.DNSQueryTimeoutError, defer.TimeoutError, TimeoutError):
        return DNSError(name, rtype, "timeout")
    return DNSError(name, rtype, failure.getErrorMessage() or repr(failure.value))


def _host_text(name) -> str:
    """A domain name from an answer as text; bytes that are not ASCII as ``\\xNN``
    (a name that is then not a host name, which its users refuse)."""
    return name.name.decode("ascii", "backslashreplace").rstrip(".").lower()


def _negative_ttl(authority) -> int:
    """RFC 2308 5: a negative answer is cached for min(SOA TTL, SOA MINIMUM)."""
    for record in authority or ():
        if getattr(record, "type", None) == dns.SOA:
            return int(min(record.ttl, record.payload.minimum))
    return NEGATIVE_TTL
