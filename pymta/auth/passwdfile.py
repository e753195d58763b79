"""The ``passwdfile`` credentials checker: SMTP AUTH users from an argon2id password file.

File format (UTF-8; ``pymta passwd FILE USER`` writes it)::

    # comment: a line whose first non-blank character is '#'
    alice:$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA
    bob@example.org:$argon2id$v=19$m=65536,t=3,p=4$...

- one ``user:hash`` entry per line, nothing around the colon; blank lines
  and comment lines are ignored; no trailing comments;
- the user name is what the client sends as its SASL authentication
  identity: UTF-8, not empty, without ``:``, whitespace or control
  characters (``@`` is fine);
- the hash is an argon2id PHC string (``$argon2id$v=19$m=...,t=...,p=...$salt$hash``)
  as made by argon2-cffi, libargon2's ``argon2 -id -e`` or Dovecot's
  ``doveadm pw -s ARGON2ID`` (without the ``{ARGON2ID}`` prefix);
- a user may appear once (with ``case_insensitive_users``: once in any
  spelling).

The file holds secrets: it must not be readable by "other" (``chmod 600``;
group-readable is allowed, for a group the server runs as).  A world-readable
file is refused at start-up and at reload.

Options: ``file`` (required, relative to the config directory),
``case_insensitive_users`` (default false: ``Alice`` and ``alice`` are
different users; true: they are the same, and the login is reported with the
spelling of the file), ``concurrency`` (default 2: how many verifications may
run at once in the reactor's thread pool; each one takes the hash's memory
cost, 64 MiB with argon2-cffi's defaults, and one CPU for about a quarter of
a second, and the pool is shared with the spool's fsyncs).

Behaviour: a verification runs in the reactor's thread pool, never on the
reactor thread.  An unknown user is verified against a dummy hash with the
parameters most entries use, so that it takes as long as a wrong password,
and both fail with the same :class:`twisted.cred.error.UnauthorizedLogin`.
The file is re-read when it changes (checked at most once a second, on
login); a broken or world-readable file at reload is logged and the previous
users stay in force.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from argon2 import Parameters, PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from zope.interface import implementer

from pymta.plugin_api import OptionError, Options, WatchedFile
from pymta.permissions import is_world_readable

__all__ = ["PasswordFileChecker", "PasswordFileError", "PasswordTable", "parse_password_file",
           "load_password_file", "edit_password_text", "user_name_problem", "hash_password",
           "verify_password"]

#: the hasher for new passwords: argon2-cffi's defaults (RFC 9106 "low memory" profile)
_HASHER = PasswordHasher()

_PHC = re.compile(r"\$argon2id\$v=19\$m=\d+,t=\d+,p=\d+\$[A-Za-z0-9+/]{11,}\$[A-Za-z0-9+/]{6,}")

FAILED_LOGIN_TEXT = "authentication failed"


class PasswordFileError(ValueError):
    """A password file that cannot be used; the text names the file (and line)."""

    def __init__(self, path: str, line: int | None, problem: str):
        self.path, self.line, self.problem = path, line, problem
        where = f"{path}, line {line}" if line is not None else path
        super().__init__(f"{where}: {problem}")


# -- hashing -----------------------------------------------------------------

def hash_password(password: str | bytes) -> str:
    """A new argon2id PHC string for ``password`` (argon2-cffi's default cost)."""
    return _HASHER.hash(password)


def verify_password(phc: str, password: str | bytes) -> bool:
    """Does ``password`` match the PHC string?  CPU- and memory-heavy: not on the reactor thread."""
    try:
        return _HASHER.verify(phc, password)
    except (VerificationError, InvalidHashError):
        return False


# -- the file format -----------------------------------------------------------

def user_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a user name in the file, or None if it can."""
    if not name:
        return "is empty"
    if ":" in name:
        return "contains ':'"
    if any(c.isspace() for c in name):
        return "contains whitespace"
    if not name.isprintable():
        return "contains a control character"
    return None


@dataclass(frozen=True)
class PasswordTable:
    """A parsed password file."""

    #: lookup key (the name, case-folded with case_insensitive) -> (name as written, PHC hash)
    entries: Mapping[str, tuple[str, str]]
    #: the argon2 parameters most entries use (for the dummy hash), None if empty
    typical_parameters: Parameters | None
    case_insensitive: bool = False

    def lookup(self, name: str) -> tuple[str, str] | None:
        return self.entries.get(name.casefold() if self.case_insensitive else name)

    def __len__(self) -> int:
        return len(self.entries)


def _entry_lines(text: str):
    """(line number, user, hash) for each entry line, without checking them."""
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if number == 1:
            stripped = stripped.lstrip("\ufeff")
        if not stripped or stripped.startswith("#"):
            continue
        user, colon, phc = stripped.partition(":")
        yield number, user, (phc if colon else None)


def parse_password_file(text: str, source: str, *, case_insensitive: bool = False) -> PasswordTable:
    """Parse the file's text; PasswordFileError naming ``source`` and the line on a problem.

    Error messages never quote a hash or a line that could hold a secret.
    """
    entries: dict[str, tuple[str, str]] = {}
    first_seen: dict[str, int] = {}
    parameter_counts: collections.Counter[tuple] = collections.Counter()
    parameters: dict[tuple, Parameters] = {}
    for number, user, phc in _entry_lines(text):
        if phc is None:
            raise PasswordFileError(source, number, "expected 'user:hash'")
        problem = user_name_problem(user)
        if problem:
            raise PasswordFileError(source, number, f"user name {user!r} {problem}")
        if phc != phc.strip() or any(c.isspace() for c in phc):
            raise PasswordFileError(source, number, f"the hash for {user!r} contains whitespace "
                                    "(write 'user:hash' with nothing around the colon)")
        if not _PHC.fullmatch(phc):
            raise PasswordFileError(source, number, f"the hash for {user!r} is not an argon2id "
                                    "PHC string ($argon2id$v=19$m=...,t=...,p=...$salt$hash)")
        try:
            found = extract_parameters(phc)
        except InvalidHashError:
            raise PasswordFileError(source, number, f"the hash for {user!r} is not a valid "
                                    "argon2id PHC string") from None
        key = user.casefold() if case_insensitive else user
        if key in entries:
            spelling = "" if entries[key][0] == user else f" (as {entries[key][0]!r})"
            raise PasswordFileError(source, number, f"duplicate user {user!r}: already on line "
                                    f"{first_seen[key]}{spelling}")
        entries[key] = (user, phc)
        first_seen[key] = number
        parameter_key = dataclasses.astuple(found)
        parameter_counts[parameter_key] += 1
        parameters.setdefault(parameter_key, found)
    typical = parameters[parameter_counts.most_common(1)[0][0]] if parameter_counts else None
    return PasswordTable(entries, typical, case_insensitive)


def load_password_file(path: str, *, case_insensitive: bool = False) -> PasswordTable:
    """Read and parse ``path``: OSError if unreadable, PasswordFileError if unusable.

    A file readable by "other" is unusable: it holds password hashes.
    """
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        if is_world_readable(mode):
            raise PasswordFileError(path, None, f"world-readable (mode {stat.S_IMODE(mode):04o}); "
                                    f"password hashes are secrets: chmod 600 it")
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise PasswordFileError(path, line, "not valid UTF-8") from None
    return parse_password_file(text, path, case_insensitive=case_insensitive)


def edit_password_text(text: str, source: str, user: str, phc: str | None) -> tuple[str, bool]:
    """Set (``phc`` given) or remove (``phc`` None) ``user``'s line; (new text, user was there).

    Every other line — comments, blank lines, other users, even lines the
    parser would refuse — is kept byte for byte, in place; a new user is
    appended at the end.  PasswordFileError if ``user`` is on several lines.
    """
    lines = text.split("\n")
    found = [number for number, name, _ in _entry_lines(text) if name == user]
    if len(found) > 1:
        listed = ", ".join(str(n) for n in found)
        raise PasswordFileError(source, found[1], f"user {user!r} is on lines {listed}; "
                                "remove all but one by hand first")
    if found:
        index = found[0] - 1
        if phc is None:
            del lines[index]
        else:
            ending = "\r" if lines[index].endswith("\r") else ""
            bom = "\ufeff" if index == 0 and lines[0].startswith("\ufeff") else ""
            lines[index] = f"{bom}{user}:{phc}{ending}"
        return "\n".join(lines), True
    if phc is None:
        return text, False
    if text and not text.endswith("\n"):
        text += "\n"
    return f"{text}{user}:{phc}\n", False


# -- the checker -----------------------------------------------------------------

class _DummyHashes:
    """One dummy hash per parameter set, made on first use (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hashes: dict[tuple, str] = {}

    def get(self, parameters: Parameters | None) -> str:
        key = dataclasses.astuple(parameters) if parameters is not None else ()
        with self._lock:
            phc = self._hashes.get(key)
            if phc is None:
                hasher = (PasswordHasher.from_parameters(parameters) if parameters is not None
                          else _HASHER)
                phc = self._hashes[key] = hasher.hash(secrets.token_bytes(16))
            return phc


def _as_text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    if isinstance(value, str):
        return value
    raise TypeError(f"credentials field must be bytes or str, not {type(value).__name__}")


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8")
    raise TypeError(f"credentials field must be bytes or str, not {type(value).__name__}")


@implementer(ICredentialsChecker)
class PasswordFileChecker:
    """``passwdfile``: check user name and password against an argon2id password file.

    See the module docstring for the file format and the options.
    ``requestAvatarId`` fires with the user name (str, spelt as in the file)
    or fails with :class:`~twisted.cred.error.UnauthorizedLogin`.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, options: Mapping[str, Any], context: Any, *,
                 clock: Callable[[], float] = time.monotonic):
        opts = Options(options)
        self.path = opts.path("file", context)
        self.case_insensitive = opts.bool("case_insensitive_users", default=False)
        self.concurrency = opts.int("concurrency", default=2, minimum=1, maximum=64)
        opts.finish()
        self._reactor = getattr(context, "reactor", None)
        try:
            self._file = WatchedFile(self.path, self._load, what="password file",
                                     errors=(PasswordFileError,), clock=clock)
        except OSError as e:
            raise OptionError("file", f"cannot read {self.path}: {e.strerror or e}") from None
        except PasswordFileError as e:
            raise OptionError("file", str(e)) from None
        self._dummies = _DummyHashes()
        # Start-up may block: make the dummy now, so the first unknown user is not slower.
        self._dummies.get(self._file.value.typical_parameters)
        self._semaphore = DeferredSemaphore(self.concurrency)

    def _load(self, path: str) -> PasswordTable:
        return load_password_file(path, case_insensitive=self.case_insensitive)

    @property
    def table(self) -> PasswordTable:
        """The users in force (as last loaded)."""
        return self._file.value

    def requestAvatarId(self, credentials: Any) -> Deferred:
        """ICredentialsChecker: a Deferred firing with the user name or failing UnauthorizedLogin."""
        table = self._file.current()
        name = _as_text(credentials.username)
        entry = table.lookup(name) if name is not None else None
        password = _as_bytes(credentials.password)
        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        d = self._semaphore.acquire()
        d.addCallback(self._in_thread, reactor, entry, table.typical_parameters, password)
        d.addCallback(_avatar_or_refusal)
        return d

    def _in_thread(self, _semaphore, reactor, *args) -> Deferred:
        """Verify in a pool thread, holding a slot of the semaphore until the thread is done.

        Cancelling the answer (``[limits] plugin_timeout``) drops the late
        result but does not free the slot early, so ``concurrency`` still
        bounds the verifications that run (each holds its memory cost)."""
        answer: Deferred = Deferred()

        def finished(result):
            self._semaphore.release()
            if not answer.called:           # else: cancelled meanwhile; the result is dropped
                if isinstance(result, Failure):
                    answer.errback(result)
                else:
                    answer.callback(result)
            return None

        deferToThreadPool(reactor, reactor.getThreadPool(), self._verify_blocking,
                          *args).addBoth(finished)
        return answer

    def _verify_blocking(self, entry: tuple[str, str] | None, parameters: Parameters | None,
                         password: bytes) -> str | None:
        """In a pool thread: the user name if the password matches, else None."""
        phc = entry[1] if entry is not None else self._dummies.get(parameters)
        matched = verify_password(phc, password)
        return entry[0] if matched and entry is not None else None


def _avatar_or_refusal(name: str | None) -> str:
    if name is None:
        raise UnauthorizedLogin(FAILED_LOGIN_TEXT)
    return name
