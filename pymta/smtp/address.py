"""RFC 5321 path grammar (section 4.1.2); ESMTP parameters are in :mod:`pymta.smtp.params`.

Pure functions; raise :class:`PathError` with the reply that a server should
give when the input is wrong.
"""

from __future__ import annotations

import ipaddress
import re

# RFC 5321 4.1.2 / RFC 5322 atext
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_UTF8 = "\u0080-\U0010ffff"   # RFC 6531 UTF8-non-ascii, only with SMTPUTF8
_DOT_STRING = re.compile(rf"[{_ATEXT}{_UTF8}]+(?:\.[{_ATEXT}{_UTF8}]+)*\Z")
# qtextSMTP = %d32-33 / %d35-91 / %d93-126 ; quoted-pairSMTP = "\" %d32-126
_QUOTED = re.compile(rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_UTF8}]|\\[\x20-\x7e])*"\Z')
_LABEL = rf"[A-Za-z0-9{_UTF8}](?:[A-Za-z0-9\-{_UTF8}]*[A-Za-z0-9{_UTF8}])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\.?\Z")


class PathError(ValueError):
    """A syntax or policy problem with a path; carries the reply to give."""

    def __init__(self, code: int, enhanced: str, text: str):
        super().__init__(text)
        self.code, self.enhanced, self.text = code, enhanced, text


def _syntax(text: str) -> PathError:
    return PathError(501, "5.1.3" if "address" in text else "5.5.4", text)


def parse_domain(domain: str) -> str:
    """Validate a domain or address literal; return it normalised (lower case, no trailing dot)."""
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise _syntax("Bad address literal")
        inner = domain[1:-1]
        try:
            if inner[:5].lower() == "ipv6:":
                return "[IPv6:" + str(ipaddress.IPv6Address(inner[5:])) + "]"
            return "[" + str(ipaddress.IPv4Address(inner)) + "]"
        except ValueError:
            raise _syntax("Bad address literal") from None
    if not _DOMAIN.match(domain) or len(domain) > 255:
        raise _syntax("Bad domain syntax in address")
    return domain.rstrip(".").lower()


def parse_mailbox(text: str) -> str:
    """``Local-part "@" ( Domain / address-literal )`` → normalised mailbox."""
    at = text.rfind("@")
    if at <= 0:
        raise _syntax("Bad address syntax: missing @domain")
    local, domain = text[:at], text[at + 1:]
    if _QUOTED.match(local):
        # RFC 5321 4.1.2: a quoted local part that needs no quoting is the
        # same mailbox as the plain dot-string: use the plain form.
        unquoted = re.sub(r"\\(.)", r"\1", local[1:-1])
        if _DOT_STRING.match(unquoted):
            local = unquoted
    elif not _DOT_STRING.match(local):
        raise _syntax("Bad address syntax in local part")
    if len(local.encode("utf-8")) > 64:
        raise PathError(553, "5.1.3", "Local part longer than 64 octets")
    return f"{local}@{parse_domain(domain)}"


def parse_path(text: str, *, allow_null: bool, allow_postmaster: bool = False) -> str:
    """Parse ``<...>`` (Reverse-path or Forward-path) and return the mailbox.

    Returns "" for the null path ``<>`` (only when ``allow_null``) and
    "postmaster" for ``<Postmaster>`` (only when ``allow_postmaster``).
    A source route (``<@a,@b:user@c>``) is accepted and ignored (RFC 5321 4.1.2, C).
    """
    if len(text) < 2 or text[0] != "<" or text[-1] != ">":
        raise _syntax("Syntax: the address must be enclosed in <>")
    inner = text[1:-1]
    if inner == "":
        if allow_null:
            return ""
        raise _syntax("Empty address not allowed here")
    if allow_postmaster and inner.lower() == "postmaster":
        return "postmaster"
    if inner.startswith("@"):
        colon = inner.find(":")
        if colon < 0:
            raise _syntax("Bad source route in address")
        for hop in inner[:colon].split(","):
            if not hop.startswith("@"):
                raise _syntax("Bad source route in address")
            parse_domain(hop[1:])
        inner = inner[colon + 1:]
    if len(inner.encode("utf-8")) > 254:
        raise PathError(553, "5.1.3", "Address longer than 254 octets")
    return parse_mailbox(inner)


def split_path_and_params(arg: str) -> tuple[str, str]:
    """Split ``<path> params`` at the closing bracket (a quoted local part may hold '>' or spaces)."""
    arg = arg.lstrip(" ")
    if not arg.startswith("<"):
        raise _syntax("Syntax: the address must be enclosed in <>")
    i, in_quote = 1, False
    while i < len(arg):
        c = arg[i]
        if in_quote:
            if c == "\\":
                i += 1
            elif c == '"':
                in_quote = False
        elif c == '"':
            in_quote = True
        elif c == ">":
            rest = arg[i + 1:]
            if rest and not rest.startswith(" "):
                raise _syntax("Syntax: a space must follow the address")
            return arg[: i + 1], rest.strip(" ")
        i += 1
    raise _syntax("Syntax: the address must be enclosed in <>")


def is_ascii(text: str) -> bool:
    return text.isascii()
