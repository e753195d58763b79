"""SPF records (RFC 7208 sections 4.5, 4.6, 5, 6, 12): selection and parsing.

:func:`parse_record` turns the text of a ``v=spf1`` record into a
:class:`Record` or raises :class:`SPFSyntaxError` (the caller's permerror).
The whole record is checked before anything is evaluated (4.6: syntax errors
anywhere are detected), including every macro string and domain-spec.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from pymta.spf.macro import MacroString, MacroSyntaxError, parse_macro_string

__all__ = ["Mechanism", "Record", "SPFSyntaxError", "is_spf_record", "parse_record",
           "parse_domain_spec", "parse_explanation", "QUALIFIER_RESULTS", "MECHANISMS"]

QUALIFIER_RESULTS = {"+": "pass", "-": "fail", "~": "softfail", "?": "neutral"}
MECHANISMS = ("all", "include", "a", "mx", "ptr", "ip4", "ip6", "exists")
#: mechanisms and modifiers that count against the 10-lookup limit (4.6.4)
LOOKUP_TERMS = frozenset({"include", "a", "mx", "ptr", "exists", "redirect"})

_VERSION = "v=spf1"
_MODIFIER = re.compile(r"([A-Za-z][A-Za-z0-9\-_.]*)=(.*)\Z", re.S)
_MECHANISM = re.compile(r"([+\-?~]?)([A-Za-z][A-Za-z0-9]*)(.*)\Z", re.S)
_TOPLABEL = re.compile(r"(?:[A-Za-z0-9]*[A-Za-z][A-Za-z0-9]*|[A-Za-z0-9]+-[A-Za-z0-9\-]*[A-Za-z0-9])\Z")
_DUAL_CIDR = re.compile(r"(.*?)(?:/([0-9]+))?(?://([0-9]+))?\Z", re.S)
_QNUM = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9][0-9]|[0-9])"
_IP4 = re.compile(rf"{_QNUM}(?:\.{_QNUM}){{3}}\Z")
_IP6_CHARS = re.compile(r"[0-9A-Fa-f:.]+\Z")


class SPFSyntaxError(ValueError):
    """A record that does not follow the RFC 7208 grammar: permerror."""


@dataclass(frozen=True)
class Mechanism:
    qualifier: str                      # "+", "-", "~" or "?"
    name: str                           # one of MECHANISMS, lower case
    text: str                           # the term as written
    domain: MacroString | None = None   # include, a, mx, ptr, exists
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None   # ip4, ip6
    ip4_prefix: int = 32                # a, mx
    ip6_prefix: int = 128               # a, mx

    @property
    def result(self) -> str:
        """The result when this mechanism matches."""
        return QUALIFIER_RESULTS[self.qualifier]


@dataclass(frozen=True)
class Record:
    text: str
    mechanisms: tuple[Mechanism, ...]
    redirect: MacroString | None = None
    explanation: MacroString | None = None

    @property
    def has_all(self) -> bool:
        return any(m.name == "all" for m in self.mechanisms)


def is_spf_record(text: str) -> bool:
    """Does this TXT text start an SPF version 1 record (4.5)?"""
    return text[:6].lower() == _VERSION and (len(text) == 6 or text[6] == " ")


def parse_domain_spec(text: str) -> MacroString:
    """A ``domain-spec``: a macro string ending in a macro or ``"." toplabel ["."]`` (7.1)."""
    if not text:
        raise SPFSyntaxError("empty domain-spec")
    try:
        spec = parse_macro_string(text)
    except MacroSyntaxError as e:
        raise SPFSyntaxError(str(e)) from None
    if not spec.ends_with_expand:
        tail = spec.tail[:-1] if spec.tail.endswith(".") else spec.tail
        before, dot, toplabel = tail.rpartition(".")
        if not dot or not _TOPLABEL.match(toplabel):
            raise SPFSyntaxError(f"invalid domain-spec {text!r}: it must end in a macro or "
                                 "'.' and a top-level label that is not all numeric")
    return spec


def parse_explanation(text: str) -> MacroString:
    """An explanation string (the TXT record named by ``exp=``, 6.2)."""
    try:
        return parse_macro_string(text, explanation=True)
    except MacroSyntaxError as e:
        raise SPFSyntaxError(str(e)) from None


def parse_record(text: str) -> Record:
    """Parse a whole record (its text must satisfy :func:`is_spf_record`)."""
    if not text.isascii():
        raise SPFSyntaxError("the record contains non-ASCII characters")
    if not is_spf_record(text):
        raise SPFSyntaxError(f"not an SPF version 1 record: {text!r}")
    mechanisms: list[Mechanism] = []
    modifiers: dict[str, MacroString] = {}
    for term in text[6:].split(" "):
        if not term:
            continue                     # terms are separated by one or more spaces
        modifier = _MODIFIER.match(term)
        if modifier is not None:
            name, value = modifier.group(1).lower(), modifier.group(2)
            if name in ("redirect", "exp"):
                if name in modifiers:
                    raise SPFSyntaxError(f"the {name!r} modifier appears more than once")
                modifiers[name] = parse_domain_spec(value)
            else:
                try:                     # unknown modifiers are ignored, but must be well formed
                    parse_macro_string(value, explanation=True)
                except MacroSyntaxError as e:
                    raise SPFSyntaxError(f"modifier {term!r}: {e}") from None
            continue
        mechanisms.append(_parse_mechanism(term))
    return Record(text, tuple(mechanisms), modifiers.get("redirect"), modifiers.get("exp"))


def _parse_mechanism(term: str) -> Mechanism:
    match = _MECHANISM.match(term)
    if match is None:
        raise SPFSyntaxError(f"invalid term {term!r}")
    qualifier, name, rest = match.group(1) or "+", match.group(2).lower(), match.group(3)
    if name not in MECHANISMS:
        raise SPFSyntaxError(f"unknown mechanism {match.group(2)!r} in {term!r}")
    try:
        if name == "all":
            if rest:
                raise SPFSyntaxError("'all' takes no argument")
            return Mechanism(qualifier, name, term)
        if name in ("include", "exists"):
            if not rest.startswith(":"):
                raise SPFSyntaxError(f"{name!r} needs ':' and a domain-spec")
            return Mechanism(qualifier, name, term, domain=parse_domain_spec(rest[1:]))
        if name == "ptr":
            if not rest:
                return Mechanism(qualifier, name, term)
            if not rest.startswith(":"):
                raise SPFSyntaxError("'ptr' takes only ':' and a domain-spec")
            return Mechanism(qualifier, name, term, domain=parse_domain_spec(rest[1:]))
        if name in ("a", "mx"):
            domain = None
            body = rest
            if rest.startswith(":"):
                body = rest[1:]
            spec, ip4, ip6 = _DUAL_CIDR.match(body).groups()
            if rest.startswith(":"):
                domain = parse_domain_spec(spec)
            elif spec:
                raise SPFSyntaxError(f"unexpected {spec!r} after {name!r}")
            return Mechanism(qualifier, name, term, domain=domain,
                             ip4_prefix=_prefix(ip4, 32), ip6_prefix=_prefix(ip6, 128))
        # ip4 / ip6
        if not rest.startswith(":"):
            raise SPFSyntaxError(f"{name!r} needs ':' and a network")
        address, slash, prefix = rest[1:].partition("/")
        if name == "ip4":
            if not _IP4.match(address):
                raise SPFSyntaxError(f"invalid IPv4 address {address!r}")
            length = _prefix(prefix, 32) if slash else 32
        else:
            if not _IP6_CHARS.match(address):
                raise SPFSyntaxError(f"invalid IPv6 address {address!r}")
            try:
                ipaddress.IPv6Address(address)
            except ValueError:
                raise SPFSyntaxError(f"invalid IPv6 address {address!r}") from None
            length = _prefix(prefix, 128) if slash else 128
        network = ipaddress.ip_network(f"{address}/{length}", strict=False)
        return Mechanism(qualifier, name, term, network=network)
    except SPFSyntaxError as e:
        raise SPFSyntaxError(f"{term!r}: {e}") from None


def _prefix(digits: str | None, maximum: int) -> int:
    """A CIDR length: decimal without leading zeros, at most ``maximum`` (5.6)."""
    if digits is None:
        return maximum
    if not digits.isdigit() or (len(digits) > 1 and digits[0] == "0"):
        raise SPFSyntaxError(f"invalid CIDR length /{digits}")
    value = int(digits)
    if value > maximum:
        raise SPFSyntaxError(f"CIDR length /{digits} is larger than {maximum}")
    return value
