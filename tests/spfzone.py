"""A fake DNS for the SPF tests, fed from the zone data of the RFC 7208 YAML suite.

Semantics follow the suite's reference driver (pyspf's testspf.py):

* ``SPF`` records are served as TXT unless the name lists TXT records itself
  (type SPF is not queried since RFC 7208); ``TXT: NONE`` lists none.
* ``TIMEOUT`` as an entry: a query for a type with no record listed before it
  times out (a temporary DNSError); a name that is not listed and starts
  with ``error.`` times out too.  Any other name not listed is NXDOMAIN.
* CNAMEs are followed (a loop is a temporary error).

Every method returns an already-fired Deferred, so check_host() runs
synchronously.  ``queries`` records each (type, name) asked.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.internet import defer

from pymta.dns.resolver import DNSError


@dataclass(frozen=True)
class FakeMX:
    preference: int
    host: str


TIMEOUT = "TIMEOUT"


def load_zone(zonedata: dict) -> dict[str, list]:
    """The suite's ``zonedata`` mapping as {lower-case name: [(type, value) | TIMEOUT]}."""
    zone: dict[str, list] = {}
    for name, entries in (zonedata or {}).items():
        records: list = []
        spf_as_txt: list = []
        has_txt = False
        for entry in entries or ():
            if entry == TIMEOUT:
                records.append(TIMEOUT)
                continue
            ((rtype, value),) = entry.items()
            if rtype in ("TXT", "SPF") and not isinstance(value, list):
                value = [value]
            if rtype == "TXT":
                has_txt = True
            elif rtype == "SPF":
                spf_as_txt.append(("TXT", value))
                continue
            if value == ["NONE"]:
                continue
            records.append((rtype, value))
        if not has_txt:
            records.extend(spf_as_txt)
        zone[str(name).lower().rstrip(".")] = records
    return zone


class ZoneResolver:
    """The SPFLookup interface over a :func:`load_zone` mapping."""

    def __init__(self, zone: dict[str, list]) -> None:
        self.zone = zone
        self.queries: list[tuple[str, str]] = []

    def _lookup(self, name: str, rtype: str) -> list:
        self.queries.append((rtype, name))
        seen: set[str] = set()
        current = name.lower().rstrip(".")
        while True:
            if current in seen:
                raise DNSError(name, rtype, "CNAME loop")
            seen.add(current)
            entries = self.zone.get(current)
            if entries is None:
                if current.startswith("error."):
                    raise DNSError(name, rtype, "timeout")
                return []
            values, target = [], None
            for entry in entries:
                if entry == TIMEOUT:
                    if not values:
                        raise DNSError(name, rtype, "timeout")
                    break
                kind, value = entry
                if kind == rtype:
                    values.append(value)
                elif kind == "CNAME" and target is None:
                    target = str(value).lower().rstrip(".")
            if values or target is None:
                return values
            current = target

    def _answer(self, name: str, rtype: str, convert) -> defer.Deferred:
        try:
            return defer.succeed([convert(v) for v in self._lookup(name, rtype)])
        except DNSError as e:
            return defer.fail(e)

    def txt(self, name: str) -> defer.Deferred:
        return self._answer(name, "TXT", lambda v: "".join(str(part) for part in v))

    def a(self, name: str) -> defer.Deferred:
        return self._answer(name, "A", str)

    def aaaa(self, name: str) -> defer.Deferred:
        return self._answer(name, "AAAA", str)

    def mx(self, name: str) -> defer.Deferred:
        return self._answer(name, "MX", lambda v: FakeMX(int(v[0]), str(v[1]).rstrip(".").lower()))

    def ptr(self, name: str) -> defer.Deferred:
        return self._answer(name, "PTR", lambda v: str(v).rstrip(".").lower())


def fired(d: defer.Deferred):
    """The result of an already-fired Deferred (fails the test if it has not fired)."""
    results, failures = [], []
    d.addCallbacks(results.append, failures.append)
    if failures:
        failures[0].raiseException()
    assert results, "the Deferred has not fired: something waited for real I/O"
    return results[0]
