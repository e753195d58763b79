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

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from pymta.plugin_api import (DUNNO, ConfigError, IRecipientPolicy, Options, OptionError, Verdict,
                              WatchedFile, domain_key, normalize_domain, read_recipient_delimiter,
                              safe_folder_name, safe_mailbox_name, split_address, strip_extension)
from pymta.policy.mapfile import map_entries, read_map_file

__all__ = ["LocalDomainRecipients", "StaticRecipients", "AliasMap", "AliasTable",
           "parse_aliases", "load_alias_file"]


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
        self.delimiters = read_recipient_delimiter(opts)
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
        self.delimiters = read_recipient_delimiter(opts)
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
    entries: dict[str, tuple[str, ...]] = {}
    for entry in map_entries(text, source, _alias_error, value_name="target"):
        targets: list[str] = []
        for line_number, segment in entry.values:
            for piece in segment.split(","):
                piece = piece.strip()
                if piece:
                    targets.append(_parse_alias_target(piece, entry.domain, source, line_number))
        if not targets:
            raise ConfigError(source, f"line {entry.line}", f"no targets for {entry.key!r}")
        entries[entry.key] = tuple(targets)
    domains = frozenset(key.rpartition("@")[2] for key in entries)
    return AliasTable(entries, domains)


def _alias_error(source: str, line: int, problem: str) -> ConfigError:
    return ConfigError(source, f"line {line}", problem)


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
    return read_map_file(path, parse_aliases, _alias_error)


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
        self.delimiters = read_recipient_delimiter(opts)
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
