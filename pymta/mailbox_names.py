"""Mailbox names: the one rule for turning an address into path components.

Local delivery (:mod:`pymta.delivery.mailbox`) names mailboxes, domain
directories and Maildir++ folders with these functions, and the recipient
validator (``localdomain``) refuses at RCPT time what they refuse, so a
recipient accepted can always be delivered.
"""

from __future__ import annotations

import unicodedata

from pymta.addresses import domain_key

__all__ = ["safe_mailbox_name", "safe_domain_name", "safe_folder_name",
           "MAX_LOCAL_OCTETS", "MAX_DOMAIN_OCTETS"]

#: longest local part RFC 5321 allows (section 4.5.3.1.1)
MAX_LOCAL_OCTETS = 64
#: longest domain name
MAX_DOMAIN_OCTETS = 255


def _check_path_component(value: str, what: str, max_octets: int) -> str:
    if not value:
        raise ValueError(f"empty {what}")
    if len(value.encode("utf-8", errors="surrogatepass")) > max_octets:
        raise ValueError(f"{what} {value!r} is longer than {max_octets} octets")
    if "/" in value or "\\" in value:
        raise ValueError(f"{what} {value!r} contains a path separator")
    if '"' in value:
        raise ValueError(f"{what} {value!r} is a quoted local part")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in value):
        raise ValueError(f"{what} {value!r} contains a control character")
    if value.startswith("."):
        raise ValueError(f"{what} {value!r} starts with a dot")
    if ".." in value:
        raise ValueError(f"{what} {value!r} contains '..'")
    return value


def safe_mailbox_name(local: str) -> str:
    """The mailbox (file or directory) name for the local part ``local``.

    Lower-cased.  Raises ValueError, with the reason, for anything that is
    not safe as one path component: empty, "/" or "\\", NUL or other control
    characters, a leading ".", "..", more than 64 octets.  UTF-8 letters
    (RFC 6531 local parts) are allowed.
    """
    return _check_path_component(local.lower(), "mailbox name", MAX_LOCAL_OCTETS)


def safe_domain_name(domain: str) -> str:
    """The directory name for ``domain``: its :func:`~pymta.addresses.domain_key`.

    Lower-cased, without a trailing dot, and an internationalized name in
    its IDNA A-labels, so that ``bücher.test`` and ``xn--bcher-kva.test``
    (the same domain, as an SMTPUTF8 client and an ASCII one write it)
    are one directory.
    """
    return _check_path_component(domain_key(domain), "domain", MAX_DOMAIN_OCTETS)


def safe_folder_name(extension: str) -> str:
    """A Maildir++ folder name from an address extension (case kept; "." nests)."""
    folder = _check_path_component(extension, "folder name", MAX_LOCAL_OCTETS)
    if folder.endswith("."):
        raise ValueError(f"folder name {folder!r} ends with a dot")
    return folder
