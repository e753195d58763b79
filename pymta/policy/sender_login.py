"""``sender_login``: authenticated users may send only as the addresses they own.

Like Postfix's ``reject_sender_login_mismatch`` with ``smtpd_sender_login_maps``.
An ``ISenderPolicy`` for the ``mail`` stage; the map file says who owns
which envelope sender::

    # sender address or @domain: the logins (SMTP AUTH user names) that own it
    alice@example.org:      alice
    info@example.org:       alice, bob          # commas and/or blanks separate logins
    sales@example.org:      carol
                            dave                # a line starting with blanks continues
    @example.net:           netadmin            # every address in the domain

Lookup, with the sender lower-cased and its domain IDNA-encoded: the exact
address, then the address without its ``+extension`` (``recipient_delimiter``),
then ``@domain``; the first key found gives the owners.  Logins are compared
case-insensitively (as Postfix does).  ``#`` at the start of a line or after
blanks starts a comment.

Decisions (a pass is DUNNO, so the other sender checks still run):

- the null sender ``<>`` is never checked, for anyone: Postfix skips it too,
  since bounces and delivery notifications carry no owner;
- authenticated session (``session.auth_user`` set): the login must be among
  the owners of the sender, else ``553 5.7.1 <sender>: Sender address
  rejected: not owned by user LOGIN``.  A sender that is not in the map at
  all is rejected the same way (``unlisted_senders = "reject"``, the
  default, Postfix's ``reject_sender_login_mismatch``) or let through
  (``"dunno"``, Postfix's ``reject_known_sender_login_mismatch``);
- unauthenticated session: with ``reject_unauthenticated_owned = true``, a
  sender that has owners in the map is rejected with ``553 5.7.1 <sender>:
  Sender address rejected: not logged in`` (Postfix's
  ``reject_unauthenticated_sender_login_mismatch``: nobody can use your
  address without logging in); otherwise DUNNO.

Options: ``map`` (required, relative to the config directory),
``unlisted_senders`` (``"reject"`` or ``"dunno"``), ``reject_unauthenticated_owned``
(default false), ``recipient_delimiter`` (default ``"+"``, ``""`` for none).

The map is re-read when it changes (checked at most once a second); a
broken map at reload is logged and the previous one stays in use; at
start-up it is an error naming the file and line.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from zope.interface import implementer

from pymta.plugin_api import (DUNNO, ISenderPolicy, OptionError, Options, Verdict, WatchedFile,
                              domain_key, read_recipient_delimiter, split_address, strip_extension)
from pymta.policy.mapfile import map_entries, read_map_file

__all__ = ["SenderLoginPolicy", "SenderLoginMap", "SenderLoginMapError", "parse_sender_logins",
           "load_sender_logins"]

_LOGIN_SEPARATORS = re.compile(r"[,\s]+")


class SenderLoginMapError(ValueError):
    """A map file that cannot be used; the text names the file and line."""

    def __init__(self, path: str, line: int, problem: str):
        self.path, self.line, self.problem = path, line, problem
        super().__init__(f"{path}, line {line}: {problem}")


@dataclass(frozen=True)
class SenderLoginMap:
    """A parsed map: key (``user@domain`` or ``@domain``, lower case) -> case-folded logins."""

    entries: Mapping[str, frozenset[str]]

    def owners(self, sender: str, delimiters: str = "+") -> frozenset[str] | None:
        """The logins that own ``sender``, or None when the map does not list it."""
        local, domain = split_address(sender)
        domain = domain_key(domain)
        if not domain:
            return None
        local = local.lower()
        owners = self.entries.get(f"{local}@{domain}")
        if owners is None:
            base = strip_extension(local, delimiters)
            if base is not None:
                owners = self.entries.get(f"{base}@{domain}")
        if owners is None:
            owners = self.entries.get(f"@{domain}")
        return owners


def parse_sender_logins(text: str, source: str) -> SenderLoginMap:
    """Parse map text (see the module docstring); SenderLoginMapError on a problem."""
    entries: dict[str, frozenset[str]] = {}
    for entry in map_entries(text, source, SenderLoginMapError, value_name="login",
                             indent_name="blanks"):
        logins: set[str] = set()
        for _, piece in entry.values:
            logins.update(login.casefold() for login in _LOGIN_SEPARATORS.split(piece) if login)
        if not logins:
            raise SenderLoginMapError(source, entry.line, f"no logins for {entry.key!r}")
        entries[entry.key] = frozenset(logins)
    return SenderLoginMap(entries)


def load_sender_logins(path: str) -> SenderLoginMap:
    """Read and parse ``path``: OSError if unreadable, SenderLoginMapError on bad content."""
    return read_map_file(path, parse_sender_logins, SenderLoginMapError)


@implementer(ISenderPolicy)
class SenderLoginPolicy:
    """``sender_login``: see the module docstring."""

    def __init__(self, options: Mapping[str, Any], context: Any, *,
                 clock: Callable[[], float] = time.monotonic):
        opts = Options(options)
        self.path = opts.path("map", context)
        self.unlisted_senders = opts.str("unlisted_senders", default="reject",
                                         choices=("reject", "dunno"))
        self.reject_unauthenticated_owned = opts.bool("reject_unauthenticated_owned", default=False)
        self.delimiters = read_recipient_delimiter(opts)
        opts.finish()
        try:
            self._file = WatchedFile(self.path, load_sender_logins, what="sender login map",
                                     errors=(SenderLoginMapError,), clock=clock)
        except OSError as e:
            raise OptionError("map", f"cannot read {self.path}: {e.strerror or e}") from None
        except SenderLoginMapError as e:
            raise OptionError("map", str(e)) from None

    @property
    def table(self) -> SenderLoginMap:
        """The map in force (as last loaded)."""
        return self._file.value

    def check_sender(self, session: Any, transaction: Any) -> Verdict:
        sender = transaction.sender
        if not sender:
            return DUNNO
        owners = self._file.current().owners(sender, self.delimiters)
        login = session.auth_user
        if login is not None:
            if owners is None and self.unlisted_senders == "dunno":
                return DUNNO
            if owners is not None and login.casefold() in owners:
                return DUNNO
            return Verdict.reject(f"<{sender}>: Sender address rejected: not owned by user {login}",
                                  553, "5.7.1")
        if owners is not None and self.reject_unauthenticated_owned:
            return Verdict.reject(f"<{sender}>: Sender address rejected: not logged in", 553, "5.7.1")
        return DUNNO
