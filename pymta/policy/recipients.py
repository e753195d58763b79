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
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from pymta.plugin_api import (DUNNO, ConfigError, IRecipientPolicy, Options, OptionError, Verdict,
                              WatchedFile, domain_key, normalize_domain, read_recipient_delimiter,
                              safe_folder_name, safe_mailbox_name, split_address, strip_extension)
from pymta.policy.aliases import (AliasExpander, AliasTable, ExpansionError, load_alias_file,
                                  parse_aliases)

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

class _AliasFile(WatchedFile[AliasTable]):
    """The alias file of one :class:`AliasMap`, reported on that map's logger in its words."""

    def __init__(self, path: str, *, log: Logger, clock: Callable[[], float],
                 allow_commands: bool = False, allow_files: bool = False):
        self._map_log = log
        super().__init__(path, lambda p: load_alias_file(p, allow_commands=allow_commands,
                                                         allow_files=allow_files),
                         what="alias map", errors=(ConfigError,), clock=clock)

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
    """Alias / virtual map: rewrite recipients from a file (see :mod:`pymta.policy.aliases`).

    Options: ``file`` (required, relative to the config directory);
    ``domains`` (default none): the domains the map is authoritative for;
    ``unmatched`` (default ``"reject"``); ``recipient_delimiter`` (default
    ``"+"``); ``max_depth`` (default 10); ``allow_commands`` and
    ``allow_files`` (default false) and ``command_backend`` (default
    ``"pipe"``).

    A match (exact address, then without its ``+extension``, which the
    targets keep, then the ``@domain`` catch-all) is ACCEPT with ``rewrite``
    = the targets, each expanded again through the map (loops and too deep
    expansions refused with 550 5.4.6, a broken ``:include:`` file 451).
    An address that matches nothing gets ``550 5.1.1 User unknown`` in the
    ``domains`` listed (with ``unmatched = "reject"``), else no opinion: an
    entry in the file no longer makes its whole domain "mapped" by surprise.

    ``|command`` targets (run by the pipe backend ``command_backend``) are
    accepted only with ``allow_commands = true``, and ``/path/to/file``
    targets (appended to, by the same backend) only with ``allow_files =
    true``: either says this is the system alias file of the administrator,
    which must then belong to root and be writable by no one else.  Never
    set them on a map users edit.

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
        domains = opts.list_str("domains", default=[])
        self.max_depth = opts.int("max_depth", default=10, minimum=1, maximum=100)
        self.allow_commands = opts.bool("allow_commands", default=False)
        self.allow_files = opts.bool("allow_files", default=False)
        self.command_backend = opts.str("command_backend", default="pipe")
        opts.finish()
        self.domains = frozenset(_normalized_domains(domains))
        try:
            self._file = _AliasFile(self.path, log=self.log, clock=clock,
                                    allow_commands=self.allow_commands,
                                    allow_files=self.allow_files)
        except OSError as e:
            raise OptionError("file", f"cannot read {self.path}: {e.strerror or e}") from None

    @property
    def table(self) -> AliasTable:
        """The map in force (as last loaded)."""
        return self._file.value

    def _expander(self) -> AliasExpander:
        return AliasExpander(self._file.current(), self.delimiters, self.max_depth,
                             self.command_backend)

    def check_recipient(self, session: Any, transaction: Any, recipient: str) -> Verdict:
        try:
            targets = self._expander().expand(recipient)
        except ExpansionError as e:
            if e.detail:
                self.log.error("<{recipient}>: {problem}", recipient=recipient, problem=e.detail)
            if e.code >= 500:
                return Verdict.reject(f"<{recipient}>: {e.text}", e.code, e.enhanced)
            return Verdict.defer(f"<{recipient}>: {e.text}", e.code, e.enhanced)
        if targets is not None:
            return Verdict.accept(rewrite=targets)
        domain = domain_key(split_address(recipient)[1])
        if domain in self.domains and self.unmatched == "reject":
            return _unknown_user(recipient)
        return DUNNO

    def expand_address(self, address: str) -> list | None:
        """What ``address`` expands to (for mail pymta makes itself: notifications), or None.

        None also when the expansion fails (logged): the caller then uses
        the address as it is.
        """
        try:
            return self._expander().expand(address)
        except ExpansionError as e:
            self.log.error("<{recipient}>: {problem}", recipient=address, problem=e.detail or e.text)
            return None

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed (at most once a second); True if reloaded."""
        return self._file.reload_if_changed()


def _normalized_domains(domains: list[str]) -> list[str]:
    out = []
    for index, domain in enumerate(domains):
        try:
            out.append(normalize_domain(domain.lstrip("@")))
        except ValueError as e:
            raise OptionError(f"domains[{index}]", str(e)) from None
    return out
