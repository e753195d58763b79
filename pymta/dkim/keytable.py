"""The key table of the signing plugins: ``{ domain = ..., selector = ..., key = ... }`` entries.

Each entry names a signing domain (d=), a selector (s=) and a private key
file (see :mod:`pymta.dkim.keys`); the file is read at start-up and must
not be readable by every user.  A problem is an OptionError naming the
entry and its key, e.g. ``keys[1].key: dkim/x.key is readable by every
user; chmod 600 it``.
"""

from __future__ import annotations

import os
from typing import Any

from pymta.dkim.keys import KeyError_, load_private_key
from pymta.dkim.signer import SigningKey
from pymta.permissions import is_world_readable
from pymta.plugin_api import OptionError, Options, domain_key

__all__ = ["read_key_table", "read_key_entry", "valid_selector"]


def valid_selector(selector: str) -> bool:
    """A selector is one or more DNS labels (RFC 6376 3.1)."""
    return selector.isascii() and all(
        label and all(c.isalnum() or c in "-_" for c in label) for label in selector.split("."))


def read_key_entry(item: Any, context: Any, where: str) -> SigningKey:
    """One entry (a table) of a key table; ``where`` names it in errors (``keys[0]``)."""
    if not isinstance(item, dict):
        raise OptionError(where, "expected a table { domain = ..., selector = ..., key = ... }")
    opts = Options(item)
    try:
        domain = domain_key(opts.str("domain"))
        selector = opts.str("selector")
        path = opts.path("key", context)
        opts.finish()
    except OptionError as e:
        raise OptionError(f"{where}.{e.key}", e.problem) from None
    if not valid_selector(selector):
        raise OptionError(f"{where}.selector", f"not a DNS label sequence: {selector!r}")
    try:
        private = load_private_key(path)
    except KeyError_ as e:
        raise OptionError(f"{where}.key", f"{path}: {e}") from None
    if is_world_readable(os.stat(path).st_mode):
        raise OptionError(f"{where}.key", f"{path} is readable by every user; chmod 600 it")
    return SigningKey(domain, selector, private, path)


def read_key_table(value: Any, context: Any, key: str = "keys") -> list[SigningKey]:
    """The ``keys`` option: a non-empty array of entries."""
    if not isinstance(value, list) or not value:
        raise OptionError(key, "expected a non-empty array of tables "
                               "({ domain = ..., selector = ..., key = ... })")
    return [read_key_entry(item, context, f"{key}[{i}]") for i, item in enumerate(value)]
