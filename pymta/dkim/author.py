"""The author domain: the domain of the RFC5322.From address (RFC 7489 3.1, 6.6.1).

DKIM signing chooses its key by it and DMARC checks alignment against it.
A message with no From field, several, or a From with several addresses or
none that parses has no author domain: :func:`author_domain` says why, and
lists every domain of the From fields' addresses (``domains``) for DMARC,
which checks each of them (RFC 7489 6.6.1): otherwise adding a second
address would take a message out of the spoofed domain's policy.
"""

from __future__ import annotations

import email.utils
from dataclasses import dataclass

from pymta.addresses import domain_key

__all__ = ["Author", "author_domain"]


@dataclass(frozen=True)
class Author:
    """The From address's domain (lower case, IDNA) or, when there is none, why."""

    domain: str | None
    problem: str | None = None
    #: when there is no single author: every distinct domain of the From addresses
    domains: tuple[str, ...] = ()


def author_domain(headers: list[tuple[str, str]]) -> Author:
    """The author domain of a message with these (name, value) header fields (unfolded)."""
    values = [value for name, value in headers if name.lower() == "from"]
    if not values:
        return Author(None, "no From header field")
    addresses = [address for _name, address in email.utils.getaddresses(values) if address]
    if not addresses:
        return Author(None, "no address in From")
    domains: list[str] = []
    problem = None
    for address in addresses:
        _local, at, domain = address.rpartition("@")
        if not at or not domain:
            problem = problem or f"From address without a domain: {address!r}"
            continue
        try:
            domain = domain_key(domain.strip().rstrip("."))
        except (UnicodeError, ValueError):
            problem = problem or f"From domain is not a domain name: {domain!r}"
            continue
        if domain not in domains:
            domains.append(domain)
    if len(values) > 1:
        problem = f"{len(values)} From header fields"
    elif len(addresses) > 1:
        problem = "several addresses in From"
    if problem is not None:
        # a broken address beside good ones does not take those out of DMARC either
        return Author(None, problem, tuple(domains) if len(addresses) > 1 else ())
    return Author(domains[0])
