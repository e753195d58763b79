"""Addresses as pymta compares them: mail addresses, domain names, IP addresses.

One statement each of the forms that lookups and comparisons use, for the
core and for plugins alike:

- :func:`split_address`: ``local@domain`` into its local part and domain,
  both as given;
- :func:`domain_key`: the form a domain is compared in (lower case, no
  trailing dot, IDNA A-labels), the form :func:`normalize_domain` gives the
  domains of the config, so that a domain from the wire matches them;
- :func:`normalize_domain`: the strict form of a configured domain, with a
  readable error for something that is not one;
- :func:`ip_address`: a peer's address with its IPv6 zone dropped and an
  IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) taken as the IPv4 address
  it maps.
"""

from __future__ import annotations

import ipaddress

__all__ = ["split_address", "split_extension", "domain_key", "normalize_domain", "ip_address", "unmap_ipv4"]


def split_address(address: str) -> tuple[str, str]:
    """``local@domain`` -> (local, domain), both as given; the domain is "" without an "@"."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address, ""
    return local, domain


def domain_key(domain: str) -> str:
    """The form a domain is compared in: lower case, no trailing dot, IDNA A-labels.

    Unlike :func:`normalize_domain` it never fails: what is not a valid
    domain name is compared lower-cased, without its trailing dot.
    """
    text = domain.rstrip(".").lower()
    if text.isascii():
        return text
    try:
        return normalize_domain(text)
    except ValueError:
        return text


def normalize_domain(domain: str) -> str:
    """Return ``domain`` lower-case and IDNA-encoded (A-labels), without a trailing dot.

    Raises ``ValueError`` with a readable message for something that is not
    a valid domain name.
    """
    import idna  # a dependency of Twisted (via hyperlink)

    text = domain.strip().rstrip(".")
    if not text:
        raise ValueError(f"invalid domain {domain!r}: empty")
    if text.startswith("[") or text.replace(".", "").isdigit():
        raise ValueError(f"invalid domain {domain!r}: an address literal is not a domain name")
    try:
        encoded = idna.encode(text, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError) as e:
        raise ValueError(f"invalid domain {domain!r}: {e}") from None
    return encoded.lower()


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def unmap_ipv4(address: IPAddress) -> IPAddress:
    """An IPv4-mapped IPv6 address (``::ffff:192.0.2.1``) as the IPv4 address it maps; others as given."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def ip_address(text: str) -> IPAddress | None:
    """A peer's address (an IPv6 zone ``%eth0`` dropped, IPv4-mapped unmapped), or None if not one."""
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    return unmap_ipv4(address)


def split_extension(local: str, delimiters: str) -> tuple[str, str | None]:
    """Split ``user+ext`` into ("user", "ext"); (local, None) when it has no extension.

    ``delimiters`` holds one or more delimiter characters (like Postfix's
    ``recipient_delimiter``); the first one found ends the base name.  A
    delimiter in the first position does not count ("+foo" has no extension).
    """
    if delimiters:
        for index, char in enumerate(local):
            if index > 0 and char in delimiters:
                return local[:index], local[index + 1:]
    return local, None
