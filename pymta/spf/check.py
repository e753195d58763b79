"""check_host() (RFC 7208 sections 4-8), asynchronous over an abstract DNS lookup.

The evaluator is pure logic: every DNS question goes through a
:class:`SPFLookup` (in production :class:`pymta.dns.resolver.DNSResolver`,
in tests a fake fed from zone data).  Each lookup returns a Deferred; the
evaluation is a coroutine driven by those Deferreds: no threads, no blocking
calls.  With a lookup whose Deferreds have already fired (a fake), the whole
check completes synchronously.

Limits (4.6.4): at most 10 terms that cause DNS queries (include, a, mx, ptr,
exists, redirect) per check, at most 2 "void" lookups (no such name, or no
records) among those terms' own queries, at most 10 MX records for one
``mx`` (more is a permerror) and at most 10 PTR names for ``ptr`` and ``%{p}``
(the rest ignored).  Names that cannot be queried (an empty label, a label
over 63 octets) are treated as non-existent, without a query.

Results are the seven of section 2.6: none, neutral, pass, fail, softfail,
temperror, permerror.  The ``exp=`` explanation is looked up only for a fail
(6.2), outside the limits, and any problem with it just leaves it out.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from pymta.addresses import unmap_ipv4
from pymta.dns.resolver import DNSError
from pymta.spf.macro import MacroString
from pymta.spf.record import (Mechanism, Record, SPFSyntaxError, is_spf_record, parse_explanation,
                              parse_record)

__all__ = ["SPFLookup", "SPFResult", "SPFChecker", "check_host", "identity", "RESULTS",
           "LOOKUP_LIMIT", "VOID_LOOKUP_LIMIT", "PER_MECHANISM_LIMIT"]

RESULTS = ("none", "neutral", "pass", "fail", "softfail", "temperror", "permerror")
LOOKUP_LIMIT = 10
VOID_LOOKUP_LIMIT = 2
PER_MECHANISM_LIMIT = 10

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class SPFLookup(Protocol):
    """The DNS questions check_host() asks; each returns a Deferred.

    NXDOMAIN and "no records" fire with ``[]``; any other failure fails with
    :class:`pymta.dns.resolver.DNSError` (``temporary`` says whether it is).
    """

    def txt(self, name: str) -> Deferred: ...     # [text], strings of a record joined
    def a(self, name: str) -> Deferred: ...       # [IPv4 address text]
    def aaaa(self, name: str) -> Deferred: ...    # [IPv6 address text]
    def mx(self, name: str) -> Deferred: ...      # [obj with .preference, .host], "" = null MX
    def ptr(self, name: str) -> Deferred: ...     # [host name]


@dataclass(frozen=True)
class SPFResult:
    """The outcome of one check_host()."""

    result: str
    #: the domain whose policy decided (after redirects); "" when none was checked
    domain: str = ""
    #: the matching term as written ("-all", "ip4:192.0.2.0/24"), "default" when no
    #: mechanism matched, None for none/temperror/permerror
    mechanism: str | None = None
    #: the expanded exp= text, for a fail whose record gave one
    explanation: str | None = None
    #: why the result is none, temperror or permerror (for logs and headers)
    problem: str | None = None
    lookups: int = 0
    void_lookups: int = 0
    #: the record that decided (after redirects) publishes ``-all``
    record_minus_all: bool = False

    @property
    def minus_all(self) -> bool:
        """A fail under a policy that publishes ``-all`` (a domain that means its fails)."""
        return self.result == "fail" and self.record_minus_all


def identity(mail_from: str, helo: str) -> tuple[str, str]:
    """(sender, domain) checked for MAIL FROM ``mail_from`` and HELO ``helo``.

    The null sender is checked as ``postmaster@<helo>`` (2.4); a sender
    without a local part gets ``postmaster`` (4.3).
    """
    if not mail_from:
        return f"postmaster@{helo}", helo
    local, at, domain = mail_from.rpartition("@")
    if not at:
        return f"postmaster@{mail_from}", mail_from
    return f"{local or 'postmaster'}@{domain}", domain


def check_host(lookup: SPFLookup, ip: str, domain: str, sender: str, helo: str = "",
               receiver: str = "unknown", **options: Any) -> Deferred:
    """Fire with the :class:`SPFResult` of RFC 7208 check_host(); see :class:`SPFChecker`."""
    return SPFChecker(lookup, receiver=receiver, **options).check_host(ip, domain, sender, helo)


class SPFChecker:
    """Runs check_host() with one lookup object and one set of limits."""

    def __init__(self, lookup: SPFLookup, receiver: str = "unknown",
                 lookup_limit: int = LOOKUP_LIMIT, void_lookup_limit: int = VOID_LOOKUP_LIMIT,
                 clock=time.time) -> None:
        self.lookup = lookup
        self.receiver = receiver
        self.lookup_limit = lookup_limit
        self.void_lookup_limit = void_lookup_limit
        self.clock = clock

    def check_host(self, ip: str, domain: str, sender: str, helo: str = "",
                   lookup: SPFLookup | None = None) -> Deferred:
        """Fire with an :class:`SPFResult`: DNS problems are results (temperror), not failures.

        ``lookup``: asks this check's DNS questions instead of the checker's
        (a session's resolver, bounded by its DNS time budget)."""
        return Deferred.fromCoroutine(self._check(ip, domain, sender, helo,
                                                  lookup if lookup is not None else self.lookup))

    async def _check(self, ip_text: str, domain: str, sender: str, helo: str,
                     lookup: SPFLookup) -> SPFResult:
        try:
            ip = _client_address(ip_text)
        except ValueError:
            return SPFResult("none", problem=f"not an IP address: {ip_text!r}")
        domain = domain[:-1] if domain.endswith(".") else domain
        problem = _fqdn_problem(domain)
        if problem:
            return SPFResult("none", domain=domain, problem=problem)
        run = _Evaluation(self, lookup, ip, sender, helo,
                          upper_nibbles=any(c in "ABCDEF" for c in ip_text))
        try:
            outcome = await run.check_host(domain, top=True)
        except _PermError as e:
            return run.result("permerror", domain, problem=str(e))
        except _TempError as e:
            return run.result("temperror", domain, problem=str(e))
        if outcome.result == "none":
            return run.result("none", domain, problem=outcome.problem)
        explanation = None
        if outcome.result == "fail" and outcome.record is not None and outcome.record.explanation:
            explanation = await run.explanation(outcome.record.explanation, outcome.domain)
        minus_all = outcome.record is not None and any(
            m.name == "all" and m.qualifier == "-" for m in outcome.record.mechanisms)
        return run.result(outcome.result, outcome.domain, mechanism=outcome.mechanism,
                          explanation=explanation, record_minus_all=minus_all)


# -- the evaluation ------------------------------------------------------------

class _PermError(Exception):
    pass


class _TempError(Exception):
    pass


@dataclass
class _Outcome:
    result: str
    domain: str
    mechanism: str | None = None
    record: Record | None = None
    problem: str | None = None


@dataclass
class _Evaluation:
    """The state of one check_host(): counters and per-check caches."""

    checker: SPFChecker
    lookup: SPFLookup
    ip: IPAddress
    sender: str
    helo: str
    #: %{i} of an IPv6 client in upper case (the address was given so, as in the RFC 7208
    #: test suite) or lower case (as the example in RFC 7208 7.4 and Twisted's addresses)
    upper_nibbles: bool = False
    lookups: int = 0
    voids: int = 0
    _validated: list[str] | None = field(default=None, repr=False)

    def result(self, result: str, domain: str, **kw: Any) -> SPFResult:
        return SPFResult(result, domain, lookups=self.lookups, void_lookups=self.voids, **kw)

    # -- the recursion ------------------------------------------------------
    async def check_host(self, domain: str, top: bool = False) -> _Outcome:
        """Evaluate the policy of ``domain`` (4.3 - 4.7)."""
        problem = _fqdn_problem(domain)
        if problem:
            return _Outcome("none", domain, problem=problem)
        texts = await self._query("txt", domain, count_void=not top, what="SPF record")
        records = [t for t in texts if is_spf_record(t)]
        if not records:
            return _Outcome("none", domain, problem=f"no SPF record at {domain}")
        if len(records) > 1:
            raise _PermError(f"{domain} publishes {len(records)} SPF records")
        try:
            record = parse_record(records[0])
        except SPFSyntaxError as e:
            raise _PermError(f"invalid SPF record at {domain}: {e}") from None
        for mechanism in record.mechanisms:
            if await self._matches(mechanism, domain):
                return _Outcome(mechanism.result, domain, mechanism.text, record)
        if record.redirect is not None and not record.has_all:
            self._count_lookup("redirect")
            target = await self._target(record.redirect, domain)
            outcome = await self.check_host(target) if target else _Outcome("none", "")
            if outcome.result == "none":
                raise _PermError(f"redirect={record.redirect} of {domain}: "
                                 f"{outcome.problem or 'no SPF record'}")
            return outcome
        return _Outcome("neutral", domain, "default", record)

    async def _matches(self, m: Mechanism, domain: str) -> bool:
        name = m.name
        if name == "all":
            return True
        if name == "ip4" or name == "ip6":
            return self.ip.version == m.network.version and self.ip in m.network
        self._count_lookup(name)
        target = await self._target(m.domain, domain) if m.domain is not None else domain
        if target is None:
            if name == "include":
                raise _PermError(f"{m.text}: the domain-spec does not expand to a valid name")
            return False                 # not a queryable name: no match
        if name == "include":
            outcome = await self.check_host(target)
            if outcome.result == "none":
                raise _PermError(f"include:{target}: {outcome.problem or 'no SPF record'}")
            return outcome.result == "pass"
        if name == "a":
            return self._in_network(await self._addresses(target, count_void=True), m)
        if name == "mx":
            return await self._mx_matches(target, m)
        if name == "ptr":
            names = await self._validated_names()
            suffix = "." + target.lower()
            return any(n == target.lower() or n.endswith(suffix) for n in names)
        if name == "exists":
            return bool(await self._query("a", target, count_void=True, what="A"))
        raise AssertionError(name)

    async def _mx_matches(self, target: str, m: Mechanism) -> bool:
        records = await self._query("mx", target, count_void=True, what="MX")
        if len(records) > PER_MECHANISM_LIMIT:
            raise _PermError(f"mx:{target} has {len(records)} MX records; at most "
                             f"{PER_MECHANISM_LIMIT} may be looked up")
        for record in sorted(records, key=lambda r: r.preference):
            host = record.host.rstrip(".")
            if not host or _dns_name(host) is None:
                continue                 # null MX (RFC 7505) or not queryable
            if self._in_network(await self._addresses(host, count_void=False), m):
                return True
        return False

    def _in_network(self, addresses: list[IPAddress], m: Mechanism) -> bool:
        prefix = m.ip4_prefix if self.ip.version == 4 else m.ip6_prefix
        for address in addresses:
            if address.version == self.ip.version:
                network = ipaddress.ip_network(f"{address}/{prefix}", strict=False)
                if self.ip in network:
                    return True
        return False

    # -- limits ---------------------------------------------------------------
    def _count_lookup(self, term: str) -> None:
        self.lookups += 1
        if self.lookups > self.checker.lookup_limit:
            raise _PermError(f"more than {self.checker.lookup_limit} DNS-querying terms "
                             f"(reached at {term!r})")

    def _count_void(self, name: str) -> None:
        self.voids += 1
        if self.voids > self.checker.void_lookup_limit:
            raise _PermError(f"more than {self.checker.void_lookup_limit} void lookups "
                             f"(the last for {name})")

    # -- DNS ------------------------------------------------------------------
    async def _query(self, method: str, name: str, count_void: bool, what: str) -> list:
        try:
            values = await getattr(self.lookup, method)(name)
        except DNSError as e:
            if not e.temporary:
                values = []
            else:
                raise _TempError(f"DNS error looking up the {what} of {name}: {e.reason}") from None
        if not values and count_void:
            self._count_void(name)
        return list(values)

    async def _addresses(self, name: str, count_void: bool) -> list[IPAddress]:
        """The addresses of ``name`` of the client's family (A or AAAA)."""
        method = "a" if self.ip.version == 4 else "aaaa"
        values = await self._query(method, name, count_void, method.upper())
        return _parse_addresses(values)

    async def _validated_names(self) -> list[str]:
        """The client's validated host names (5.5), computed once per check."""
        if self._validated is not None:
            return self._validated
        validated: list[str] = []
        try:
            names = await self.lookup.ptr(_reverse_name(self.ip))
        except DNSError:
            names = []                   # 5.5: a PTR lookup error means no match
        for name in list(names)[:PER_MECHANISM_LIMIT]:
            host = str(name).rstrip(".").lower()
            if not host or _dns_name(host) is None:
                continue
            try:
                addresses = await self._query("a" if self.ip.version == 4 else "aaaa", host,
                                              count_void=False, what="address")
            except _TempError:
                continue                 # 5.5: a DNS error skips that name
            if self.ip in _parse_addresses(addresses):
                validated.append(host)
        self._validated = validated
        return validated

    async def _p_value(self, domain: str) -> str:
        """The ``%{p}`` macro: a validated name, preferring ``domain`` or a subdomain of it."""
        names = await self._validated_names()
        domain = domain.lower()
        for name in names:
            if name == domain:
                return name
        for name in names:
            if name.endswith("." + domain):
                return name
        return names[0] if names else "unknown"

    # -- macros ---------------------------------------------------------------
    async def _values(self, spec: MacroString, domain: str) -> dict[str, str]:
        local, _, sender_domain = self.sender.rpartition("@")
        values = {
            "s": self.sender, "l": local or "postmaster", "o": sender_domain, "d": domain,
            "i": _dotted(self.ip, self.upper_nibbles), "v": "in-addr" if self.ip.version == 4 else "ip6",
            "h": self.helo, "c": str(self.ip), "r": self.checker.receiver or "unknown",
            "t": str(int(self.checker.clock())),
        }
        if "p" in spec.letters:
            values["p"] = await self._p_value(domain)
        return values

    async def _target(self, spec: MacroString, domain: str) -> str | None:
        """The expanded domain-spec as a DNS name, or None if it cannot be queried."""
        return _dns_name(spec.expand(await self._values(spec, domain)))

    async def explanation(self, spec: MacroString, domain: str) -> str | None:
        """The exp= text (6.2); None on any problem (no record, several, bad syntax, DNS error)."""
        try:
            name = await self._target(spec, domain)
            if name is None:
                return None
            texts = await self.lookup.txt(name)
            if len(texts) != 1 or not texts[0].isascii():
                return None
            text = parse_explanation(texts[0])
            return text.expand(await self._values(text, domain))
        except (DNSError, SPFSyntaxError, _TempError, _PermError):
            return None


# -- helpers -------------------------------------------------------------------

def _client_address(text: str) -> IPAddress:
    # 5/9/2: an IPv4-mapped address is IPv4
    return unmap_ipv4(ipaddress.ip_address(text.strip().strip("[]")))


def _parse_addresses(values: list) -> list[IPAddress]:
    out = []
    for value in values:
        try:
            out.append(_client_address(str(value)))
        except ValueError:
            continue
    return out


def _dotted(ip: IPAddress, upper: bool = False) -> str:
    """``%{i}``: dotted quad, or 32 dot-separated nibbles for IPv6 (7.3)."""
    if ip.version == 4:
        return str(ip)
    nibbles = ip.exploded.replace(":", "")
    return ".".join(nibbles.upper() if upper else nibbles)


def _reverse_name(ip: IPAddress) -> str:
    if ip.version == 4:
        return ".".join(reversed(str(ip).split("."))) + ".in-addr.arpa"
    return ".".join(reversed(ip.exploded.replace(":", ""))) + ".ip6.arpa"


def _fqdn_problem(domain: str) -> str | None:
    """Why ``domain`` cannot be checked (4.3: result none), or None."""
    if not domain:
        return "no domain to check"
    if domain.startswith("["):
        return f"{domain} is an address literal, not a domain"
    try:
        ipaddress.ip_address(domain)
        return f"{domain} is an address, not a domain"
    except ValueError:
        pass
    labels = domain.split(".")
    if len(labels) < 2:
        return f"{domain!r} is not a fully qualified domain name"
    if any(not label or len(label) > 63 for label in labels):
        return f"{domain!r} has an empty label or a label over 63 characters"
    return None


def _dns_name(expanded: str) -> str | None:
    """An expanded domain-spec as a query name: trailing dot removed, cut to 253 octets
    from the left (7.3), None when a label is empty or too long."""
    name = expanded[:-1] if expanded.endswith(".") else expanded
    while len(name) > 253 and "." in name:
        name = name.split(".", 1)[1]
    if not name or len(name) > 253:
        return None
    if any(not label or len(label) > 63 for label in name.split(".")):
        return None
    return name
