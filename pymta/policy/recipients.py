"""The built-in recipient validators (the ``rcpt`` stage).

All three provide :class:`pymta.interfaces.IRecipientPolicy` and answer
synchronously.  The core has already refused relaying (a non-local domain
from an untrusted client) before this stage runs, and it accepts
``postmaster`` itself; these validators only decide about addresses.

- ``localdomain`` (:class:`LocalDomainRecipients`): any safe mailbox name in
  a local domain.
- ``static`` (:class:`StaticRecipients`): a fixed list of addresses from the
  config.
- ``aliasmap`` (:class:`AliasMap`): an alias / virtual map file that
  rewrites recipients and rejects unknown ones in the domains it maps.

Addresses are compared case-insensitively, with the domain IDNA-encoded.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from pymta.addresses import domain_key, normalize_domain, split_address
from pymta.config.errors import ConfigError, OptionError
from pymta.config.options import Options
from pymta.config.watched_file import WatchedFile
from pymta.delivery.mailbox import safe_folder_name, safe_mailbox_name
from pymta.interfaces import IRecipientPolicy
from pymta.verdict import DUNNO, Verdict

__all__ = ["LocalDomainRecipients", "StaticRecipients", "AliasMap", "AliasTable",
           "parse_aliases", "load_alias_file", "strip_extension"]


# -- address helpers --------------------------------------------------------

def strip_extension(local: str, delimiters: str) -> str | None:
    """The local part without its ``+extension``, or None when it has none.

    ``delimiters`` holds one or more delimiter characters (like Postfix's
    ``recipient_delimiter``); the first one found ends the base name.  A
    delimiter in the first position does not count ("+foo" has no extension).
    """
    if not delimiters:
        return None
    for index, char in enumerate(local):
        if index > 0 and char in delimiters:
            return local[:index]
    return None


def _read_delimiter(opts: Options) -> str:
    delimiters = opts.str("recipient_delimiter", default="+", allow_empty=True)
    bad = [c for c in delimiters if c == "@" or c.isspace() or not c.isprintable()]
    if bad:
        raise OptionError("recipient_delimiter", f"{bad[0]!r} cannot be a delimiter")
    return delimiters


def _unknown_user(recipient: str) -> Verdict:
    return Verdict.reject(f"<{recipient}>: Recipient address rejected: User unknown", 550, "5.1.1")


# -- localdomain ------------------------------------------------------------

@implementer(IRecipientPolicy)
class LocalDomainRecipients:
    """Accept every recipient in a local domain whose mailbox name is safe.

    Options: ``recipient_delimiter`` (default ``"+"``; ``""`` turns extensions
    off).  For ``alice+lists@example.org`` the mailbox name checked is
    ``alice`` and the extension ``lists`` must be a safe Maildir++ folder
    name, so that every accepted recipient can be delivered.  Unsafe names
    get ``550 5.1.1``; other domains: no opinion.
    """

    def __init__(self, options: Mapping[str, Any], context: Any):
        opts = Options(options)
        self.delimiters = _read_delimiter(opts)
        opts.finish()
        self.domains = frozenset(context.domains)

    def check_recipient(self, session: Any, transaction: Any, recipient: str) -> Verdict:
        local, domain = split_address(recipient)
        domain = domain_key(domain)
        if domain not in self.domains:
            return DUNNO
        base = strip_extension(local, self.delimiters)
        try:
            if base is None:
                safe_mailbox_name(local)
            else:
                safe_mailbox_name(base)
                extension = local[len(base) + 1:]
                if extension:
                    safe_folder_name(extension)
        except ValueError:
            return Verdict.reject(
                f"<{recipient}>: Recipient address rejected: invalid mailbox name", 550, "5.1.1")
        return Verdict.accept()


# -- static -----------------------------------------------------------------

@implementer(IRecipientPolicy)
class StaticRecipients:
    """Accept the listed addresses; reject other addresses in local domains.

    Options: ``addresses`` (required): full addresses, or ``"@domain"`` for
    every address in a domain; ``recipient_delimiter`` (default ``"+"``):
    ``alice+x@example.org`` matches a listed ``alice@example.org``.
    """

    def __init__(self, options: Mapping[str, Any], context: Any):
        opts = Options(options)
        listed = opts.list_str("addresses")
        self.delimiters = _read_delimiter(opts)
        opts.finish()
        self.addresses: set[str] = set()
        self.whole_domains: set[str] = set()
        for index, entry in enumerate(listed):
            local, at, domain = entry.strip().rpartition("@")
            if not at or not domain:
                raise OptionError(f"addresses[{index}]",
                                  f"expected 'user@domain' or '@domain', got {entry!r}")
            try:
                domain = normalize_domain(domain)
            except ValueError as e:
                raise OptionError(f"addresses[{index}]", str(e)) from None
            if local:
                self.addresses.add(f"{local.lower()}@{domain}")
            else:
                self.whole_domains.add(domain)
        self.domains = frozenset(context.domains)

    def check_recipient(self, session: Any, transaction: Any, recipient: str) -> Verdict:
        local, domain = split_address(recipient)
        domain = domain_key(domain)
        if not domain:
            return DUNNO
        local = local.lower()
        base = strip_extension(local, self.delimiters)
        if (domain in self.whole_domains or f"{local}@{domain}" in self.addresses
                or (base is not None and f"{base}@{domain}" in self.addresses)):
            return Verdict.accept()
        if domain in self.domains:
            return _unknown_user(recipient)
        return DUNNO


# -- aliasmap ---------------------------------------------------------------

_COMMENT = re.compile(r"(?:^|(?<=\s))#.*")


@dataclass(frozen=True)
class AliasTable:
    """A parsed alias file: key ("user@domain" or "@domain", lower case) -> targets."""

    entries: Mapping[str, tuple[str, ...]]
    #: every domain that has at least one entry (the map's "virtual domains")
    domains: frozenset[str]


def parse_aliases(text: str, source: str) -> AliasTable:
    """Parse alias-file text; ConfigError(source, "line N", problem) on a syntax error.

    Syntax, one entry per logical line::

        # comment
        alice@example.org:  alice.smith@example.org, bob
        info@example.org:   alice,
                            carol          # a line starting with whitespace continues
        @example.net:       catchall@example.org

    A target without ``@`` is that local part in the key's domain.  ``#`` at
    the start of a line or after whitespace starts a comment.
    """
    # Group physical lines into logical entries: [(first line, [(line, text), ...])]
    logical: list[list[tuple[int, str]]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        raw = _COMMENT.sub("", raw)
        stripped = raw.strip()
        if not stripped:
            continue
        if raw[0] in " \t":
            if not logical:
                raise ConfigError(source, f"line {number}",
                                  "continuation line (starts with whitespace) before any entry")
            logical[-1].append((number, stripped))
        else:
            logical.append([(number, stripped)])

    entries: dict[str, tuple[str, ...]] = {}
    first_seen: dict[str, int] = {}
    for segments in logical:
        number, head = segments[0]
        key_text, colon, rest = head.partition(":")
        if not colon:
            raise ConfigError(source, f"line {number}",
                              f"expected 'address: target, ...', got {head!r}")
        key, key_domain = _parse_alias_key(key_text.strip(), source, number)
        if key in entries:
            raise ConfigError(source, f"line {number}",
                              f"duplicate entry for {key!r} (first on line {first_seen[key]})")
        targets: list[str] = []
        for line_number, segment in [(number, rest)] + segments[1:]:
            for piece in segment.split(","):
                piece = piece.strip()
                if piece:
                    targets.append(_parse_alias_target(piece, key_domain, source, line_number))
        if not targets:
            raise ConfigError(source, f"line {number}", f"no targets for {key!r}")
        entries[key] = tuple(targets)
        first_seen[key] = number
    domains = frozenset(key.rpartition("@")[2] for key in entries)
    return AliasTable(entries, domains)


def _parse_alias_key(text: str, source: str, number: int) -> tuple[str, str]:
    local, at, domain = text.rpartition("@")
    if not at or not domain or any(c.isspace() for c in text):
        raise ConfigError(source, f"line {number}",
                          f"expected 'user@domain' or '@domain' before ':', got {text!r}")
    try:
        domain = normalize_domain(domain)
    except ValueError as e:
        raise ConfigError(source, f"line {number}", str(e)) from None
    return f"{local.lower()}@{domain}", domain


def _parse_alias_target(text: str, key_domain: str, source: str, number: int) -> str:
    if text[0] in "|/\"" or text.startswith(":include:"):
        raise ConfigError(source, f"line {number}",
                          f"target {text!r}: only addresses are supported (no pipes, files or :include:)")
    if any(c.isspace() for c in text):
        raise ConfigError(source, f"line {number}",
                          f"target {text!r} contains whitespace (separate targets with commas)")
    local, at, domain = text.rpartition("@")
    if not at:
        return f"{text}@{key_domain}"
    if not local or not domain:
        raise ConfigError(source, f"line {number}", f"target {text!r} is not 'user@domain'")
    try:
        domain = normalize_domain(domain)
    except ValueError as e:
        raise ConfigError(source, f"line {number}", f"target {text!r}: {e}") from None
    return f"{local}@{domain}"


def load_alias_file(path: str) -> AliasTable:
    """Read and parse ``path``; OSError if unreadable, ConfigError on bad content."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(path, f"line {line}", "not valid UTF-8") from None
    return parse_aliases(text.removeprefix("\ufeff"), path)


class _AliasFile(WatchedFile[AliasTable]):
    """The alias file of one :class:`AliasMap`, reported on that map's logger in its words."""

    def __init__(self, path: str, *, log: Logger, clock: Callable[[], float]):
        self._map_log = log
        super().__init__(path, load_alias_file, what="alias map", errors=(ConfigError,),
                         clock=clock)

    def report_unreadable(self, error: OSError) -> None:
        self._map_log.error("alias map {path} cannot be read ({problem}); keeping the previous map",
                            path=self.path, problem=error.strerror or str(error))

    def report_not_reloaded(self, error: BaseException) -> None:
        self._map_log.error("alias map not reloaded, keeping the previous map: {problem}",
                            problem=str(error))

    def report_reloaded(self, value: AliasTable) -> None:
        self._map_log.info("alias map {path} reloaded: {count} entries", path=self.path,
                           count=len(value.entries))


@implementer(IRecipientPolicy)
class AliasMap:
    """Alias / virtual map: rewrite recipients from a file (see :func:`parse_aliases`).

    Options: ``file`` (required, relative to the config directory);
    ``recipient_delimiter`` (default ``"+"``); ``unmatched`` (default
    ``"reject"``).

    Lookup, with the address lower-cased: the exact address, then the
    address without its ``+extension``, then the ``@domain`` catch-all.  A
    match is ACCEPT with ``rewrite`` = the targets.  A domain with any entry
    in the file is a *mapped* domain: an address there that matches nothing
    gets ``550 5.1.1 User unknown`` (``unmatched = "reject"``, the virtual
    domain behaviour) or no opinion, so that the next validator decides
    (``unmatched = "dunno"``, the /etc/aliases behaviour for a domain that
    also has mailboxes).  Other domains: no opinion.

    Aliases expand one level only: targets are not looked up again, so
    ``a -> b`` and ``b -> c`` delivers mail for ``a`` to ``b``.

    The file is re-read when it changes (see
    :class:`pymta.config.watched_file.WatchedFile`: mtime, ctime, size or
    inode, checked at most once a second, on lookup).  A broken file at
    reload is logged and the previous map stays in use; at start-up it is a
    ConfigError naming the file and line.
    """

    log = Logger()

    def __init__(self, options: Mapping[str, Any], context: Any, *,
                 clock: Callable[[], float] = time.monotonic):
        opts = Options(options)
        self.path = opts.path("file", context)
        self.delimiters = _read_delimiter(opts)
        self.unmatched = opts.str("unmatched", default="reject", choices=("reject", "dunno"))
        opts.finish()
        try:
            self._file = _AliasFile(self.path, log=self.log, clock=clock)
        except OSError as e:
            raise OptionError("file", f"cannot read {self.path}: {e.strerror or e}") from None

    @property
    def table(self) -> AliasTable:
        """The map in force (as last loaded)."""
        return self._file.value

    def check_recipient(self, session: Any, transaction: Any, recipient: str) -> Verdict:
        table = self._file.current()
        local, domain = split_address(recipient)
        domain = domain_key(domain)
        if domain not in table.domains:
            return DUNNO
        local = local.lower()
        targets = table.entries.get(f"{local}@{domain}")
        if targets is None:
            base = strip_extension(local, self.delimiters)
            if base is not None:
                targets = table.entries.get(f"{base}@{domain}")
        if targets is None:
            targets = table.entries.get(f"@{domain}")
        if targets is not None:
            return Verdict.accept(rewrite=targets)
        if self.unmatched == "reject":
            return _unknown_user(recipient)
        return DUNNO

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed (at most once a second); True if reloaded."""
        return self._file.reload_if_changed()
