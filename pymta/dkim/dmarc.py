"""DMARC (RFC 7489): policy records, organizational domains, identifier alignment, the result.

Pure logic and one asynchronous step (:func:`discover_policy`, the record
lookups through pymta's resolver).  The ``dmarc`` plugin
(:mod:`pymta.policy.dmarc`) gives it the author domain, the SPF result of
the MAIL FROM (or HELO) identity and the DKIM results, and acts on the
:class:`DMARCResult`.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable

from twisted.internet import defer
from twisted.internet.defer import Deferred

__all__ = ["DMARCRecord", "DMARCResult", "RecordError", "parse_record", "OrganizationalDomain",
           "discover_policy", "evaluate", "aligned", "PolicyLookup"]

POLICIES = ("none", "quarantine", "reject")
_TAG = re.compile(r"^\s*([A-Za-z][A-Za-z0-9_]*)\s*=\s*(.*?)\s*$")
#: RFC 7489 6.4: a record starts with v=DMARC1 (the version is case-sensitive); others are discarded
_VERSION = re.compile(r"\s*v\s*=\s*DMARC1\s*(;|$)")


class RecordError(Exception):
    """A DMARC record that cannot be used (RFC 7489 6.6.3: as if there were none)."""


@dataclass(frozen=True)
class DMARCRecord:
    """The tags of a ``v=DMARC1`` record that receivers act on (RFC 7489 6.3)."""

    p: str
    sp: str | None = None
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"
    rua: tuple[str, ...] = ()
    text: str = ""


def parse_record(text: str) -> DMARCRecord:
    """The record in ``text``; :class:`RecordError` when it is not a usable DMARC record."""
    parts = [p for p in text.split(";")]
    tags: dict[str, str] = {}
    for index, part in enumerate(parts):
        if not part.strip():
            continue
        match = _TAG.match(part)
        if match is None:
            raise RecordError(f"not a tag=value pair: {part.strip()!r}")
        name, value = match.group(1).lower(), match.group(2)
        if index == 0 and (name != "v" or value != "DMARC1"):
            raise RecordError("does not start with v=DMARC1")
        tags.setdefault(name, value)
    rua = tuple(uri.strip() for uri in tags.get("rua", "").split(",") if uri.strip())
    p = tags.get("p", "").lower()
    sp = tags["sp"].lower() if "sp" in tags else None
    if p not in POLICIES or (sp is not None and sp not in POLICIES):
        if rua:              # 6.6.3: rua= but no valid p= (or an invalid sp=) means p=none
            p, sp = "none", None
        elif p not in POLICIES:
            raise RecordError("no valid p= tag" if "p" not in tags else f"p={tags['p']} is not a policy")
        else:
            raise RecordError(f"sp={tags['sp']} is not a policy")
    try:
        pct = min(max(int(tags.get("pct", "100")), 0), 100)
    except ValueError:
        pct = 100
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return DMARCRecord(p, sp, pct, adkim if adkim in ("r", "s") else "r",
                       aspf if aspf in ("r", "s") else "r", rua, text)


class OrganizationalDomain:
    """RFC 7489 3.2: the registrable domain, from the Public Suffix List (``publicsuffixlist``;
    the list it bundles, or the file ``path``, e.g. Debian's
    /usr/share/publicsuffix/public_suffix_list.dat)."""

    def __init__(self, path: str | None = None) -> None:
        from publicsuffixlist import PublicSuffixList
        if path is None:
            self._psl = PublicSuffixList()
        else:
            with open(path, "rb") as source:
                self._psl = PublicSuffixList(source)

    def __call__(self, domain: str) -> str:
        domain = domain.lower().rstrip(".")
        return self._psl.privatesuffix(domain) or domain


def aligned(identifier: str, author: str, mode: str, org: Callable[[str], str]) -> bool:
    """Identifier alignment (RFC 7489 3.1): equal (strict) or the same organizational domain."""
    identifier, author = identifier.lower().rstrip("."), author.lower().rstrip(".")
    if mode == "s":
        return identifier == author
    return org(identifier) == org(author)


@dataclass(frozen=True)
class PolicyLookup:
    """What policy discovery found: the record, where, or why none (temperror, none)."""

    record: DMARCRecord | None
    domain: str | None = None           # where the record was found
    problem: str | None = None
    temporary: bool = False


def _choose(answers) -> tuple[DMARCRecord | None, str | None]:
    texts = [t for t in answers if _VERSION.match(t)]
    if not texts:
        return None, None
    if len(texts) > 1:
        return None, "more than one DMARC record"
    try:
        return parse_record(texts[0]), None
    except RecordError as e:
        return None, f"invalid record: {e}"


def discover_policy(resolver, author: str, org: Callable[[str], str]) -> Deferred:
    """RFC 7489 6.6.3: ``_dmarc.<author domain>``, else (no DMARC record there)
    ``_dmarc.<organizational domain>``; fires with a :class:`PolicyLookup`, never fails."""
    def lookup(domain: str) -> Deferred:
        d = defer.maybeDeferred(resolver.txt, f"_dmarc.{domain}")

        def found(answers):
            record, problem = _choose(answers)
            if record is not None:
                return PolicyLookup(record, domain)
            organizational = org(domain)
            # only when there is no record at all: several or an invalid one end the discovery
            if problem is None and domain != organizational and domain == author:
                return lookup(organizational)
            return PolicyLookup(None, None, problem)

        def failed(failure):
            error = failure.value
            return PolicyLookup(None, None, f"{getattr(error, 'reason', None) or error}",
                                temporary=getattr(error, "temporary", True))
        return d.addCallbacks(found, failed)
    return lookup(author)


@dataclass
class DMARCResult:
    """The DMARC outcome for one message (RFC 7489 and RFC 8601 ``dmarc=``)."""

    result: str                         # pass, fail, none, temperror, permerror
    author: str                         # header.from
    policy: str = "none"                # the p= (or sp=) that applies
    disposition: str = "none"           # what the policy asks for after pct=
    record: DMARCRecord | None = None
    policy_domain: str | None = None
    spf_aligned: bool = False
    dkim_aligned: bool = False
    reason: str | None = None
    details: dict = field(default_factory=dict)

    def comment(self) -> str:
        if self.record is None:
            return self.reason or ""
        text = f"p={self.record.p}"
        if self.record.sp:
            text += f" sp={self.record.sp}"
        return f"{text} dis={self.disposition}" + (f"; {self.reason}" if self.reason else "")


_WEAKER = {"reject": "quarantine", "quarantine": "none", "none": "none"}


def evaluate(author: str, lookup: PolicyLookup, spf: tuple[str, str] | None,
             dkim_passes: Iterable[str], org: Callable[[str], str],
             sample: Callable[[], float] = random.random) -> DMARCResult:
    """The DMARC result for a message from ``author``.

    ``spf``: (result, domain) of the SPF check of the MAIL FROM identity (the
    HELO identity for the null sender), or None; ``dkim_passes``: the d= of
    every DKIM signature that passed.  ``sample`` gives a number in [0, 1) for
    ``pct=`` (RFC 7489 6.6.4: a message outside the percentage gets the next
    weaker policy).
    """
    record = lookup.record
    if record is None:
        if lookup.temporary:
            return DMARCResult("temperror", author, reason=lookup.problem)
        if lookup.problem:
            return DMARCResult("permerror", author, reason=lookup.problem)
        return DMARCResult("none", author, reason="no DMARC record")
    dkim_ok = any(aligned(d, author, record.adkim, org) for d in dkim_passes)
    spf_ok = spf is not None and spf[0] == "pass" and bool(spf[1]) \
        and aligned(spf[1], author, record.aspf, org)
    subdomain = lookup.domain != author
    policy = (record.sp or record.p) if subdomain else record.p
    result = DMARCResult("pass" if dkim_ok or spf_ok else "fail", author, policy,
                         record=record, policy_domain=lookup.domain,
                         spf_aligned=spf_ok, dkim_aligned=dkim_ok)
    if result.result == "fail":
        disposition = policy
        if record.pct < 100 and sample() * 100 >= record.pct:
            disposition = _WEAKER[policy]
        result.disposition = disposition
    return result
