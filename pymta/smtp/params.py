"""ESMTP parameter grammar: MAIL FROM and RCPT TO parameters (RFC 5321
4.1.2 esmtp-param), their extensions, and RFC 3461 xtext.

Pure functions beside the machine (as h11 keeps ``_readers.py``); they raise
:class:`pymta.smtp.address.PathError` with the reply a server should give.
"""

from __future__ import annotations

import re

from pymta.smtp.address import _UTF8, PathError

_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*\Z")
_VALUE = re.compile(rf"[\x21-\x3c\x3e-\x7e{_UTF8}]+\Z")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")
_NOTIFY = {"SUCCESS", "FAILURE", "DELAY"}


def parse_params(text: str) -> dict[str, str | None]:
    """ESMTP parameters → {KEYWORD: value or None}; a repeated keyword is a syntax error."""
    params: dict[str, str | None] = {}
    for item in text.split(" "):
        if not item:
            continue
        key, eq, value = item.partition("=")
        if not _KEYWORD.match(key) or (eq and not _VALUE.match(value)):
            raise PathError(501, "5.5.4", f"Bad parameter syntax: {item[:40]}")
        key = key.upper()
        if key in params:
            raise PathError(501, "5.5.4", f"Parameter {key} given twice")
        params[key] = value if eq else None
    return params


def xtext_decode(value: str) -> str:
    """RFC 3461 4: xtext (``+XX`` hex escapes) → text."""
    if not _XTEXT.match(value):
        raise PathError(501, "5.5.4", "Bad xtext encoding")
    out, i = [], 0
    while i < len(value):
        if value[i] == "+":
            out.append(chr(int(value[i + 1:i + 3], 16)))
            i += 3
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def xtext_encode(value: str) -> str:
    return "".join(c if 0x21 <= ord(c) <= 0x7E and c not in "+=" else f"+{ord(c):02X}"
                   for c in value)


def _printable(text: str) -> bool:
    """xtext values (ENVID, ORCPT, AUTH) decode to printable US-ASCII (RFC 3461 4):
    no control characters that could end up in a DSN or a header."""
    return all(" " <= c <= "~" for c in text)


def mail_params(params: dict, max_message_size: int) -> dict:
    """MAIL FROM parameters (parsed by :func:`parse_params`) checked and decoded:
    SIZE (RFC 1870) as int, BODY (RFC 6152), SMTPUTF8 (RFC 6531), RET and
    ENVID (RFC 3461), AUTH= (RFC 4954 5); anything else is 555."""
    out: dict = {}
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not (value.isascii() and value.isdigit()) or len(value) > 20:
                raise PathError(501, "5.5.4", "Bad SIZE parameter")
            if int(value) > max_message_size:
                raise PathError(552, "5.3.4", "Message size exceeds fixed maximum message size")
            out[key] = int(value)
        elif key == "BODY":
            body = (value or "").upper()
            if body not in ("7BIT", "8BITMIME"):
                raise PathError(555, "5.5.4", f"Unsupported BODY type: {value}")
            out[key] = body
        elif key == "SMTPUTF8":
            if value is not None:
                raise PathError(501, "5.5.4", "SMTPUTF8 takes no value")
            out[key] = None
        elif key == "RET":
            ret = (value or "").upper()
            if ret not in ("FULL", "HDRS"):
                raise PathError(501, "5.5.4", "Bad RET parameter: FULL or HDRS")
            out[key] = ret
        elif key == "ENVID":
            envid = xtext_decode(value or "")
            if not envid or len(envid) > 100 or not _printable(envid):
                raise PathError(501, "5.5.4", "Bad ENVID parameter")
            out[key] = envid
        elif key == "AUTH":
            if not value:
                raise PathError(501, "5.5.4", "Bad AUTH parameter")
            auth = "<>" if value == "<>" else xtext_decode(value)
            if not _printable(auth):
                raise PathError(501, "5.5.4", "Bad AUTH parameter")
            out[key] = auth
        else:
            raise PathError(555, "5.5.4", f"Unsupported option: {key}")
    return out


def rcpt_params(params: dict) -> dict:
    """RCPT TO parameters checked and decoded: NOTIFY as a tuple, ORCPT as
    "type;address" with its xtext decoded (RFC 3461 4); anything else is 555."""
    out: dict = {}
    for key, value in params.items():
        if key == "NOTIFY":
            items = tuple(v.upper() for v in (value or "").split(","))
            if items != ("NEVER",) and not (set(items) <= _NOTIFY and len(set(items)) == len(items)):
                raise PathError(501, "5.5.4", "Bad NOTIFY parameter")
            out[key] = items
        elif key == "ORCPT":
            addr_type, semi, addr = (value or "").partition(";")
            if not semi or not addr_type or not addr:
                raise PathError(501, "5.5.4", "Bad ORCPT parameter: addr-type;xtext")
            original = xtext_decode(addr)
            if not _printable(original):
                raise PathError(501, "5.5.4", "Bad ORCPT parameter: addr-type;xtext")
            out[key] = f"{addr_type.lower()};{original}"
        else:
            raise PathError(555, "5.5.4", f"Unsupported option: {key}")
    return out
