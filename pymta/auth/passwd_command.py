"""``pymta passwd``: add, change or delete a user in a ``passwdfile`` password file.

::

    pymta passwd FILE USER            # asks twice, without echo
    pymta passwd --stdin FILE USER    # first line of standard input (scripts)
    pymta passwd --delete FILE USER

The file is rewritten atomically (a temporary file in the same directory,
fsynced, renamed over the old one, directory fsynced), under an exclusive
lock on the directory so that two runs do not lose each other's change.
Comments, blank lines and other users stay as they were; a new user is
appended.  A new file is created with mode 0600; an existing one keeps its
mode, owner and group.  Neither the password nor its hash is ever printed.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import os
import stat
import sys
import tempfile
from collections.abc import Iterator

from pymta.admin import EXIT_OK, CommandError
from pymta.auth import passwdfile
from pymta.filesync import fsync_directory
from pymta.permissions import is_world_readable

__all__ = ["register", "run", "read_password", "write_atomically"]

NEW_FILE_MODE = 0o600


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "passwd", help="add, change or delete a user of a password file (passwdfile plugin)",
        description="Set USER's password in FILE (an argon2id password file for the passwdfile "
                    "auth plugin), creating FILE with mode 0600 if needed; with --delete, "
                    "remove USER.  The password is asked for twice without echo, or read "
                    "from the first line of standard input with --stdin.")
    parser.add_argument("file", metavar="FILE", help="the password file")
    parser.add_argument("user", metavar="USER", help="the user name (SASL authentication identity)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--stdin", action="store_true",
                      help="read the password from the first line of standard input")
    mode.add_argument("--delete", action="store_true", help="remove USER from FILE")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    user: str = args.user
    problem = passwdfile.user_name_problem(user)
    if problem:
        raise CommandError(f"user name {user!r} {problem}")
    path = os.path.realpath(args.file)        # through a symlink: replace its target
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise CommandError(f"directory {directory} does not exist")
    if os.path.isdir(path):
        raise CommandError(f"{args.file} is a directory")

    if args.delete:
        with _directory_locked(directory):
            text, existing = _read_file(path, args.file, missing_ok=False)
            new_text, found = _edit(text, path, user, None)
            if not found:
                raise CommandError(f"no user {user!r} in {args.file}")
            write_atomically(path, new_text.encode("utf-8"), existing)
        _warn_about(new_text, path, user, existing)
        print(f"removed user {user!r} from {args.file}")
        return EXIT_OK

    password = read_password(user, from_stdin=args.stdin)
    phc = passwdfile.hash_password(password)
    with _directory_locked(directory):
        text, existing = _read_file(path, args.file, missing_ok=True)
        new_text, found = _edit(text, path, user, phc)
        write_atomically(path, new_text.encode("utf-8"), existing)
    _warn_about(new_text, path, user, existing)
    print(f"{'changed password of' if found else 'added'} user {user!r} in {args.file}")
    return EXIT_OK


# -- the password ------------------------------------------------------------------

def read_password(user: str, *, from_stdin: bool) -> str:
    """The new password: from standard input's first line, or asked twice on the terminal."""
    if from_stdin:
        line = sys.stdin.buffer.readline()
        if not line:
            raise CommandError("no password on standard input")
        line = line.removesuffix(b"\n").removesuffix(b"\r")
        try:
            password = line.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandError("the password on standard input is not valid UTF-8") from None
    else:
        if not _have_terminal():
            raise CommandError("no terminal to ask for the password on; "
                               "use --stdin to read it from standard input")
        try:
            password = getpass.getpass(f"New password for {user}: ")
            again = getpass.getpass("Retype new password: ")
        except EOFError:
            raise CommandError("no password given, nothing changed") from None
        if password != again:
            raise CommandError("the passwords do not match, nothing changed")
    if not password:
        raise CommandError("empty password refused")
    if "\x00" in password:
        raise CommandError("a password cannot contain a NUL character (AUTH PLAIN cannot send it)")
    return password


def _have_terminal() -> bool:
    """Can getpass read without echo?  (It uses /dev/tty, else a terminal on stdin.)"""
    try:
        fd = os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY)
    except OSError:
        return sys.stdin is not None and sys.stdin.isatty()
    os.close(fd)
    return True


# -- the file ------------------------------------------------------------------------

@contextlib.contextmanager
def _directory_locked(directory: str) -> Iterator[None]:
    """Hold an exclusive flock on ``directory`` (serialises concurrent edits)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise CommandError(f"cannot open directory {directory}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_file(path: str, shown: str, *, missing_ok: bool) -> tuple[str, os.stat_result | None]:
    """(text, stat) of the file; ("", None) if it does not exist and ``missing_ok``."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read()
    except FileNotFoundError:
        if missing_ok:
            return "", None
        raise CommandError(f"{shown}: no such file") from None
    except OSError as e:
        raise CommandError(f"cannot read {shown}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8"), st
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CommandError(f"{shown}, line {line}: not valid UTF-8; nothing changed") from None


def _edit(text: str, path: str, user: str, phc: str | None) -> tuple[str, bool]:
    try:
        return passwdfile.edit_password_text(text, path, user, phc)
    except passwdfile.PasswordFileError as e:
        raise CommandError(f"{e}; nothing changed") from None


def write_atomically(path: str, data: bytes, existing: os.stat_result | None) -> None:
    """Replace ``path`` with ``data``: temp file + fsync + rename + directory fsync.

    The new file gets the mode, owner and group of ``existing`` (when given),
    else mode 0600 and the caller's owner.
    """
    directory = os.path.dirname(path)
    try:
        fd, temp_path = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                         dir=directory)
    except OSError as e:
        raise CommandError(f"cannot create a file in {directory}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            if existing is not None:
                os.fchmod(f.fileno(), stat.S_IMODE(existing.st_mode))
                if (existing.st_uid, existing.st_gid) != (os.geteuid(), os.getegid()):
                    try:
                        os.fchown(f.fileno(), existing.st_uid, existing.st_gid)
                    except PermissionError:
                        print(f"pymta passwd: warning: could not keep the owner/group of {path}",
                              file=sys.stderr)
            else:
                os.fchmod(f.fileno(), NEW_FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_path, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(temp_path)
        if isinstance(e, OSError):
            raise CommandError(f"cannot write {path}: {e.strerror or e}; nothing changed") from None
        raise
    fsync_directory(directory)


def _warn_about(text: str, path: str, user: str, existing: os.stat_result | None) -> None:
    """Tell about problems the server would have with the file (the edit is done)."""
    def warn(message: str) -> None:
        print(f"pymta passwd: warning: {message}", file=sys.stderr)

    if existing is not None and is_world_readable(existing.st_mode):
        warn(f"{path} is world-readable; the server refuses it: chmod 600 it")
    try:
        table = passwdfile.parse_password_file(text, path)
    except passwdfile.PasswordFileError as e:
        warn(f"{e}; the server refuses the file until this is fixed")
        return
    folded = user.casefold()
    others = sorted(name for name, _ in table.entries.values()
                    if name != user and name.casefold() == folded)
    if others:
        listed = ", ".join(repr(name) for name in others)
        warn(f"{path} also has {listed}: with case_insensitive_users = true the server "
             "refuses the file")
