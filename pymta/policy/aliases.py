"""Alias files as in aliases(5): parsing, and expansion over several levels.

An alias file maps an address to targets::

    # comment
    info@example.org:   alice, bob@example.net        # addresses ("alice": same domain)
    list@example.org:   :include:/etc/pymta/lists/list   # one target a line (or commas)
    owner-list@example.org: alice
    archive@example.org: |"/usr/local/bin/archive --list main"   # system alias file only
    @example.com:       catchall@example.org          # every other address of a domain

Expansion (:meth:`AliasExpander.expand`) looks an address up (the exact
address, then without its ``+extension`` which is then kept on the targets,
then the ``@domain`` catch-all) and expands each target again, depth first
(targets are looked up without the catch-all, which would swallow them):

- a target equal to the alias itself is delivered as it is (``alice:
  alice, archive`` keeps a copy in alice's mailbox);
- a target already on the path being expanded is a loop, and more than
  ``max_depth`` levels is refused, with a reason naming the path
  (:class:`ExpansionError`, 550 5.4.6) rather than a hang;
- ``:include:/path`` reads the file at each expansion (absolute path, a
  regular file of at most 1 MiB; addresses and further includes only).  A
  file named by an include file of a user other than root, or reached
  through a symbolic link of such a user, is read only if that user may
  read it (as Postfix opens it with that user's rights): whoever writes a
  list file must not get files only the server may read (a password file)
  back line by line in bounces.  One
  expansion reads at most ``MAX_INCLUDES`` include files (451 beyond: a
  file of includes of includes would otherwise hold the server for hours);
- ``|command`` becomes a :class:`pymta.verdict.AliasTarget` for the pipe
  backend ``command_backend``.  Commands are accepted only in a map with
  ``allow_commands = true`` (the system alias file) and never in included
  files;
- ``owner-NAME``: the targets reached through alias ``NAME`` get
  ``owner-NAME@domain`` as their envelope sender (for their deliveries
  and bounces) when the table has that entry, as sendmail and Postfix do
  for list mail (the innermost list's owner wins).  ``NAME-request`` is an
  ordinary alias;
- ``/path/to/file`` (a map with ``allow_files = true`` only, never in
  included files) appends the message to that file in mbox form, by the
  same pipe backend, as its user (:mod:`pymta.delivery.append_file`).

A file's problems are :class:`ConfigError` naming file and line.
"""

from __future__ import annotations

import os
import pwd
import shlex
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pymta.addresses import normalize_domain, split_address, domain_key
from pymta.config.errors import ConfigError
from pymta.plugin_api import strip_extension
from pymta.policy.mapfile import map_entries, read_map_file
from pymta.envelope import FILE_COMMAND_PREFIX
from pymta.verdict import AliasTarget

__all__ = ["AliasTable", "Include", "Command", "File", "parse_aliases", "load_alias_file",
           "AliasExpander", "ExpansionError", "MAX_TARGETS", "MAX_INCLUDES", "INCLUDE_SIZE_LIMIT"]

#: targets one address may expand to at most (Postfix: virtual_alias_expansion_limit)
MAX_TARGETS = 1000
#: include files one expansion reads at most (each read counts, the same file again too)
MAX_INCLUDES = 100
#: bytes an :include: file may have at most
INCLUDE_SIZE_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class Include:
    """``:include:/path`` target."""
    path: str
    #: the owner (uid) of the include file that names it, None in the alias file itself
    named_by: int | None = None


@dataclass(frozen=True)
class Command:
    """``|command`` target (the text after the bar, quotes removed)."""
    command: str


@dataclass(frozen=True)
class File:
    """``/path/to/file`` target: the message is appended to it."""
    path: str


Target = str | Include | Command | File


@dataclass(frozen=True)
class AliasTable:
    """A parsed alias file: key ("user@domain" or "@domain", lower case) -> targets."""

    entries: Mapping[str, tuple[Target, ...]]
    #: every domain that has at least one entry
    domains: frozenset[str]


def _error(source: str, line: int, problem: str) -> ConfigError:
    return ConfigError(source, f"line {line}", problem)


def split_targets(segment: str) -> list[str]:
    """Comma-separated targets of a line; commas inside double quotes do not split."""
    pieces, current, quoted = [], [], False
    for char in segment:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            pieces.append("".join(current))
            current = []
        else:
            current.append(char)
    pieces.append("".join(current))
    return [piece.strip() for piece in pieces if piece.strip()]


def parse_target(text: str, key_domain: str, source: str, number: int, *,
                 allow_commands: bool, allow_files: bool = False) -> Target:
    """One target: an address, ``:include:/path``, ``|command`` or ``/path/to/file``."""
    if text.startswith('"') and text.endswith('"') and len(text) >= 2 and text[1:2] == "|":
        text = text[1:-1]                                   # "|command with blanks"
    if text.startswith("|"):
        command = text[1:].strip()
        if command.startswith('"') and command.endswith('"') and len(command) >= 2:
            command = command[1:-1]
        if not allow_commands:
            raise _error(source, number, f"target {text!r}: commands are allowed only in the "
                                         "system alias file (allow_commands = true)")
        try:
            argv = shlex.split(command)
        except ValueError as e:
            raise _error(source, number, f"target {text!r}: {e}") from None
        if not argv or not os.path.isabs(argv[0]):
            raise _error(source, number, f"target {text!r}: the command must start with an "
                                         "absolute path")
        return Command(command)
    if text.startswith(":include:"):
        path = text[len(":include:"):].strip()
        if not os.path.isabs(path) or ".." in path.split("/"):
            raise _error(source, number, f"target {text!r}: an include file needs an absolute "
                                         "path without '..'")
        return Include(os.path.normpath(path))
    if text.startswith('"/') and text.endswith('"') and len(text) > 2:
        text = text[1:-1]                                   # "/path with blanks"
    if text.startswith("/"):
        if not allow_files:
            raise _error(source, number, f"target {text!r}: files are allowed only in the "
                                         "system alias file (allow_files = true)")
        if ".." in text.split("/") or any(ord(c) < 32 or ord(c) == 127 for c in text) \
                or text.endswith("/"):
            raise _error(source, number, f"target {text!r}: a file needs an absolute path "
                                         "without '..' or control characters")
        return File(os.path.normpath(text))
    if text[0] == '"':
        raise _error(source, number, f"target {text!r}: unexpected quote")
    if any(c.isspace() for c in text):
        raise _error(source, number,
                     f"target {text!r} contains whitespace (separate targets with commas)")
    local, at, domain = text.rpartition("@")
    if not at:
        return f"{text}@{key_domain}"
    if not local or not domain:
        raise _error(source, number, f"target {text!r} is not 'user@domain'")
    try:
        domain = normalize_domain(domain)
    except ValueError as e:
        raise _error(source, number, f"target {text!r}: {e}") from None
    return f"{local}@{domain}"


def parse_aliases(text: str, source: str, *, allow_commands: bool = False,
                  allow_files: bool = False) -> AliasTable:
    """Parse alias-file text; ConfigError(source, "line N", problem) on a syntax error."""
    entries: dict[str, tuple[Target, ...]] = {}
    for entry in map_entries(text, source, _error, value_name="target"):
        targets: list[Target] = []
        for line_number, segment in entry.values:
            for piece in split_targets(segment):
                targets.append(parse_target(piece, entry.domain, source, line_number,
                                            allow_commands=allow_commands, allow_files=allow_files))
        if not targets:
            raise ConfigError(source, f"line {entry.line}", f"no targets for {entry.key!r}")
        entries[entry.key] = tuple(targets)
    domains = frozenset(key.rpartition("@")[2] for key in entries)
    return AliasTable(entries, domains)


def load_alias_file(path: str, *, allow_commands: bool = False,
                    allow_files: bool = False) -> AliasTable:
    """Read and parse ``path``; OSError if unreadable, ConfigError on bad content.

    With ``allow_commands`` or ``allow_files`` the file must be owned by
    root (or the server's user) and writable by no one else: whoever can
    write it can run commands or write files.
    """
    if allow_commands or allow_files:
        check_trusted_file(path)
    return read_map_file(path, lambda text, source: parse_aliases(
        text, source, allow_commands=allow_commands, allow_files=allow_files), _error)


def check_trusted_file(path: str) -> None:
    """ConfigError unless ``path`` is owned by root or us and not writable by group or others."""
    st = os.stat(path)
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(path, "owner", f"owned by uid {st.st_uid}: the system alias file "
                                         "(allow_commands, allow_files) must belong to root")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError(path, "mode", f"writable by group or others ({stat.filemode(st.st_mode)}): "
                                        "the system alias file (allow_commands, allow_files) "
                                        "must not be (chmod go-w)")


def read_include(path: str, key_domain: str, named_by: int | None = None) -> list[Target]:
    """The targets of an include file (addresses and includes; no commands).

    ``named_by``: the owner of the include file naming this one, who must be
    able to read it; a symbolic link owned by another user than root counts
    as naming its target.
    """
    try:
        link = os.lstat(path)
        if named_by is None and stat.S_ISLNK(link.st_mode) and link.st_uid != 0:
            named_by = link.st_uid
        # opened first, then checked: a FIFO swapped in after a stat would block the server
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        with open(fd, "rb") as f:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(path, "include", "not a regular file")
            if named_by not in (None, 0) and not _readable_by(st, named_by):
                raise ConfigError(path, "include", f"not readable by uid {named_by}, who names "
                                                   "it (an include file or a link of that user)")
            if st.st_size > INCLUDE_SIZE_LIMIT:
                raise ConfigError(path, "include", f"larger than {INCLUDE_SIZE_LIMIT} bytes")
            data = f.read(INCLUDE_SIZE_LIMIT + 1)
    except OSError as e:
        raise ConfigError(path, "include", f"cannot read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError:
        raise ConfigError(path, "include", "not valid UTF-8") from None
    targets: list[Target] = []
    for number, line in enumerate(text.split("\n"), 1):
        line = line.split("#", 1)[0] if line.lstrip().startswith("#") else line
        for piece in split_targets(line):
            target = parse_target(piece, key_domain, path, number, allow_commands=False)
            if isinstance(target, Include):
                target = Include(target.path, st.st_uid if named_by in (None, 0) else named_by)
            targets.append(target)
    return targets


def _readable_by(st: os.stat_result, uid: int) -> bool:
    """Whether user ``uid`` may read a file of status ``st`` (by its mode bits)."""
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IRUSR)
    if st.st_mode & stat.S_IROTH:
        return True
    if not st.st_mode & stat.S_IRGRP:
        return False
    try:
        user = pwd.getpwuid(uid)
        return st.st_gid in os.getgrouplist(user.pw_name, user.pw_gid)
    except KeyError:
        return False


@dataclass(frozen=True)
class _Match:
    """The entry an address matched."""
    key: str
    targets: tuple[Target, ...]
    #: the address's extension, kept on the targets (matched without it)
    extension: str | None


class ExpansionError(Exception):
    """An address cannot be expanded: the reply (code, enhanced status, text) says why.

    ``detail`` is for the log only (it may name local files); None when the text says all.
    """

    def __init__(self, code: int, enhanced: str, text: str, detail: str | None = None):
        super().__init__(text)
        self.code, self.enhanced, self.text, self.detail = code, enhanced, text, detail


@dataclass
class AliasExpander:
    """Expands addresses through an alias table (see the module docstring)."""

    table: AliasTable
    delimiters: str = "+"
    max_depth: int = 10
    #: the backend that runs |command targets
    command_backend: str = "pipe"
    include_reader: Callable[..., list[Target]] = read_include
    #: include files read by the expansion under way (see MAX_INCLUDES)
    _includes_read: int = field(default=0, init=False, repr=False, compare=False)

    def lookup(self, address: str, catch_all: bool = True) -> _Match | None:
        """The entry ``address`` matches, or None.

        ``catch_all``: fall back on the ``@domain`` entry (for the address
        asked about, not for targets: a catch-all would swallow every target
        in its own domain).
        """
        local, domain = split_address(address)
        domain = domain_key(domain)
        local = local.lower()
        entries = self.table.entries
        key = f"{local}@{domain}"
        if key in entries:
            return _Match(key, entries[key], None)
        base = strip_extension(local, self.delimiters)
        if base is not None and f"{base}@{domain}" in entries:
            return _Match(f"{base}@{domain}", entries[f"{base}@{domain}"], local[len(base) + 1:])
        if catch_all and f"@{domain}" in entries:
            return _Match(f"@{domain}", entries[f"@{domain}"], None)
        return None

    def owner_of(self, key: str) -> str | None:
        """``owner-NAME@domain`` when the table has that entry for alias ``NAME@domain``."""
        local, _, domain = key.rpartition("@")
        if not local or local.startswith("owner-"):
            return None
        owner = f"owner-{local}@{domain}"
        return owner if owner in self.table.entries else None

    def expand(self, address: str) -> list[str | AliasTarget] | None:
        """What ``address`` expands to, or None when the table has no entry for it.

        A target is an address (str), or an :class:`AliasTarget` for a
        ``|command`` or for an address reached through an alias whose
        ``owner-NAME`` entry exists (its ``sender``).  ExpansionError for a
        loop, too deep an expansion, too many targets or a broken include
        file.
        """
        if self.lookup(address) is None:
            return None
        out: list[str | AliasTarget] = []
        self._includes_read = 0
        self._walk(address, [address.lower()], None, out)
        return out

    def _walk(self, address: str, path: list[str], owner: str | None, out: list) -> None:
        found = self.lookup(address, catch_all=len(path) == 1)
        if found is None:
            self._emit(out, address, owner)
            return
        if len(path) > self.max_depth:
            raise ExpansionError(550, "5.4.6", f"alias expansion deeper than {self.max_depth} "
                                               f"levels: {' -> '.join(path)}")
        owner = self.owner_of(found.key) or owner
        domain = domain_key(split_address(address)[1])
        self._targets(address, found.targets, found.extension, domain, path, owner, out)

    def _targets(self, address: str, targets, extension: str | None, domain: str,
                 path: list[str], owner: str | None, out: list) -> None:
        for target in targets:
            if isinstance(target, (Command, File)):
                command = target.command if isinstance(target, Command) \
                    else FILE_COMMAND_PREFIX + target.path
                self._emit(out, AliasTarget(address, command, self.command_backend, owner), None)
            elif isinstance(target, Include):
                if target.path in path:
                    raise ExpansionError(550, "5.4.6", f"alias loop: {' -> '.join(path)} -> "
                                                       f":include:{target.path}")
                self._includes_read += 1
                if self._includes_read > MAX_INCLUDES:
                    raise ExpansionError(451, "4.3.0", f"alias expansion reads more than "
                                                       f"{MAX_INCLUDES} include files",
                                         detail=f"alias expansion reads more than {MAX_INCLUDES} "
                                                f"include files: {' -> '.join(path)} -> "
                                                f":include:{target.path}")
                try:
                    included = (self.include_reader(target.path, domain) if target.named_by is None
                                else self.include_reader(target.path, domain,
                                                         named_by=target.named_by))
                except ConfigError as e:
                    raise ExpansionError(451, "4.3.5", "alias configuration error; try again later",
                                         detail=str(e)) from None
                self._targets(address, included, extension, domain, path + [target.path], owner,
                              out)
            else:
                if extension and strip_extension(target.partition("@")[0], self.delimiters) is None:
                    local, _, target_domain = target.rpartition("@")
                    target = f"{local}{self.delimiters[0]}{extension}@{target_domain}"
                key = target.lower()
                if key == path[-1] or key == address.lower():
                    self._emit(out, target, owner)           # "alice: alice, archive"
                elif key in path:
                    raise ExpansionError(550, "5.4.6",
                                         f"alias loop: {' -> '.join(path + [key])}")
                else:
                    self._walk(target, path + [key], owner, out)

    @staticmethod
    def _emit(out: list, target: str | AliasTarget, owner: str | None) -> None:
        out.append(AliasTarget(target, sender=owner) if owner and isinstance(target, str) else target)
        if len(out) > MAX_TARGETS:
            raise ExpansionError(451, "4.3.0", f"alias expansion gives more than {MAX_TARGETS} "
                                               "targets")
