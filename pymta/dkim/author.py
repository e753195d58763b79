"""The author domain: the domain of the RFC5322.From address (RFC 7489 3.1, 6.6.1).

DKIM signing chooses its key by it and DMARC checks alignment against it.
A message with no From field, several, or a From with several addresses or
none that parses has no author domain: :func:`author_domain` says why.
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


def author_domain(headers: list[tuple[str, str]]) -> Author:
    """The author domain of a message with these (name, value) header fields (unfolded)."""
    values = [value for name, value in headers if name.lower() == "from"]
    if not values:
        return Author(None, "no From header field")
    if len(values) > 1:
        return Author(None, f"{len(values)} From header fields")
    addresses = [address for _name, address in email.utils.getaddresses([values[0]]) if address]
    if len(addresses) != 1:
        return Author(None, "no address in From" if not addresses else "several addresses in From")
    _local, at, domain = addresses[0].rpartition("@")
    if not at or not domain:
        return Author(None, f"From address without a domain: {addresses[0]!r}")
    try:
        return Author(domain_key(domain.strip().rstrip(".")))
    except (UnicodeError, ValueError):
        return Author(None, f"From domain is not a domain name: {domain!r}")
