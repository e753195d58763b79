"""The user the server runs as, and the directories it needs, made ready at start-up.

``twistd --uid USER [--gid GROUP] pymta ...`` builds the service tree as
root, binds the listening ports as root (``privilegedStartService``), then
switches to USER and starts the services: the spool's recovery, the disk
worker's child process and every delivery run as USER.  So the spool and the
mail directories must be USER's before the switch.  :func:`prepare_directories`
runs when the service tree is built (as root, before the spool is opened,
and before twistd daemonizes, so that a problem is one line on the terminal):

* the spool directory and its subdirectories are created for USER (missing
  parents: root's, mode 0755); a spool left by a run as root is given to
  USER (``chown``), files included;
* a local mailbox backend's ``base`` directory is created for USER if it is
  missing; an existing one must be writable by USER (it is not changed);
* then each directory is checked as USER (effective ids switched for the
  check), and a problem is one :class:`StartupPermissionError` naming the
  path, its owner and mode, and the user it must serve.

Without ``--uid`` the same checks run as the current user.  Side files the
server reads again later (password and map files, TLS certificates) are read
at start-up as root; one that USER cannot read is a warning at start-up,
since a changed file then cannot be reloaded (:func:`unreadable_later`).

The uid and gid are twistd's own options (``--uid``, ``--gid``, ``--euid``):
the ``pymta`` sub-command's options have them on their ``parent``, parsed
as twistd parsed them (:meth:`RunAs.from_twistd_options`).
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Iterator

__all__ = ["RunAs", "StartupPermissionError", "check_python", "prepare_directories", "prepare_spool",
           "prepare_mail_base", "unreadable_later"]

#: the spool's subdirectories (pymta.spool.queuefile: TMP_DIR, QUEUE_DIR, CORRUPT_DIR, FREE_DIR)
SPOOL_SUBDIRS = ("tmp", "queue", "corrupt", "free")
#: a directory owned by root is given to the run-as user as a spool only if it
#: is empty or already holds this (a spool left by a run as root), never a
#: shared directory named by mistake (/var/spool)
SPOOL_MARKER = "queue"


class StartupPermissionError(Exception):
    """A directory the server needs cannot be used by the user it runs as (one line)."""


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


@dataclass(frozen=True)
class RunAs:
    """Whom the server runs as once started: its uid, gid and supplementary groups."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    #: True when the process is root now and becomes ``uid`` at the switch
    switching: bool = False

    @classmethod
    def current(cls) -> "RunAs":
        """The process as it is (no switch)."""
        return cls(os.geteuid(), os.getegid(), tuple(os.getgroups()), False)

    @classmethod
    def from_twistd_options(cls, options) -> "RunAs":
        """From twistd's ``--uid``/``--gid`` (on the sub-command options' ``parent``).

        As twistd does: without ``--gid`` the user's primary group; the
        supplementary groups are the user's (initgroups).  Raises
        StartupPermissionError for a uid without a passwd entry (twistd
        cannot switch to it).
        """
        parent = getattr(options, "parent", None)
        uid = parent.get("uid") if parent is not None else None
        gid = parent.get("gid") if parent is not None else None
        if uid is None or uid == os.geteuid() or os.geteuid() != 0:
            # no switch of user (without root, twistd refuses it itself)
            return cls.current()
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            raise StartupPermissionError(f"--uid {uid}: no such user in the password database") from None
        if gid is None:
            gid = entry.pw_gid
        try:
            groups = tuple(os.getgrouplist(entry.pw_name, gid))
        except OSError:
            groups = (gid,)
        return cls(uid, gid, groups, switching=True)

    def describe(self) -> str:
        """``nobody (uid 65534)``: for messages."""
        return f"{user_name(self.uid)} (uid {self.uid})"

    @contextmanager
    def effective(self) -> Iterator[None]:
        """Run the block with this user's effective ids (for access checks), then back.

        Only when switching (the process is root); otherwise the block runs
        as the process is.
        """
        if not self.switching:
            yield
            return
        saved_groups, saved_gid = os.getgroups(), os.getegid()
        os.setgroups(list(self.groups))
        os.setegid(self.gid)
        os.seteuid(self.uid)
        try:
            yield
        finally:
            os.seteuid(0)
            os.setegid(saved_gid)
            os.setgroups(saved_groups)


def _owner_and_mode(path: str) -> str:
    try:
        st = os.stat(path)
    except OSError as e:
        return e.strerror or str(e)
    return f"owned by {user_name(st.st_uid)} (mode {stat.S_IMODE(st.st_mode):04o})"


def _unreachable(path: str, run_as: RunAs) -> str | None:
    """The first directory above ``path`` that ``run_as`` cannot enter, described; or None.

    Call with ``run_as``'s effective ids.
    """
    parts = os.path.abspath(path).split(os.sep)
    for n in range(1, len(parts)):
        ancestor = os.sep.join(parts[:n]) or os.sep
        if not os.access(ancestor, os.X_OK, effective_ids=True):
            return f"{ancestor} is {_owner_and_mode(ancestor)}, {run_as.describe()} cannot enter it"
    return None


def _check_usable(path: str, what: str, run_as: RunAs) -> None:
    """``path`` must be a directory ``run_as`` can list, enter and write into."""
    with run_as.effective():
        if os.access(path, os.R_OK | os.W_OK | os.X_OK, effective_ids=True):
            return
        blocked = _unreachable(path, run_as)
    if blocked:
        raise StartupPermissionError(f"cannot use {what} {path}: {blocked}")
    if not os.path.isdir(path):
        raise StartupPermissionError(f"cannot use {what} {path}: not a directory")
    raise StartupPermissionError(f"cannot use {what} {path}: {_owner_and_mode(path)}, "
                                 f"needs to be writable by {run_as.describe()}")


def check_python(run_as: RunAs) -> None:
    """The interpreter and the code the server runs must be usable by ``run_as``.

    After the switch the server still imports modules as it needs them, and
    the disk worker is a new interpreter started as ``run_as``.
    """
    if not run_as.switching:
        return
    import twisted
    import pymta
    needed = [("the Python interpreter", os.path.realpath(sys.executable), os.X_OK),
              ("the Python library", os.path.dirname(os.__file__), os.R_OK | os.X_OK),
              ("Twisted", os.path.dirname(twisted.__file__), os.R_OK | os.X_OK),
              ("pymta's code", os.path.dirname(pymta.__file__), os.R_OK | os.X_OK)]
    with run_as.effective():
        for what, path, mode in needed:
            if os.access(path, mode, effective_ids=True):
                continue
            problem = (_unreachable(path, run_as)
                       or f"{_owner_and_mode(path)}, needs to be readable by {run_as.describe()}")
            raise StartupPermissionError(f"cannot run as {run_as.describe()}: {what} {path}: {problem}")


def _make_directory(path: str, what: str, run_as: RunAs) -> bool:
    """Create ``path`` if missing, for ``run_as``; True if it was created.

    Missing parents are created as ``mkdir -p`` would, mode 0755 (whatever
    the umask), owned by the process (root); the directory itself is mode
    0700, owned by ``run_as`` when switching.  Each is changed through a
    descriptor opened without following a link (:func:`_set_up`): a user who
    can write into a parent cannot swap the new name for a link between the
    ``mkdir`` and the ``chmod``/``chown`` and have root change another file.
    """
    path = os.path.abspath(path)
    if os.path.lexists(path):
        return False
    missing = []
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    try:
        for parent in reversed(missing):
            try:
                os.mkdir(parent, 0o755)
            except FileExistsError:
                continue
            _set_up(parent, path, what, mode=0o755)
        os.mkdir(path, 0o700)
        if run_as.switching:
            _set_up(path, path, what, owner=(run_as.uid, run_as.gid))
    except FileExistsError:
        return False
    except PermissionError as e:
        where = os.path.dirname(e.filename) if isinstance(e.filename, str) else parent
        raise StartupPermissionError(f"cannot create {what} {path}: {where} is {_owner_and_mode(where)}, "
                                     f"not writable by {run_as.describe()}") from None
    except OSError as e:
        raise StartupPermissionError(f"cannot create {what} {path}: {e.strerror or e}") from None
    return True


def _set_up(directory: str, path: str, what: str, mode: int | None = None,
            owner: tuple[int, int] | None = None) -> None:
    """chmod/chown the directory just made, through a descriptor (no link followed)."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StartupPermissionError(f"cannot create {what} {path}: {directory} is not a "
                                         "directory (replaced while it was made)") from None
        raise
    try:
        if mode is not None:
            os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
    finally:
        os.close(fd)


# -- the spool ---------------------------------------------------------------------

def prepare_spool(directory: str, run_as: RunAs) -> None:
    """Make the spool ``directory`` (and its subdirectories) ``run_as``'s; see the module."""
    what = "spool directory"
    _make_directory(directory, what, run_as)
    if run_as.switching:
        try:
            _give_spool(directory, run_as)
        except OSError as e:
            raise StartupPermissionError(f"cannot use {what} {directory}: {e.strerror or e}"
                                         + (f": {e.filename}" if e.filename else "")) from None
    else:
        for name in SPOOL_SUBDIRS:
            _make_directory(os.path.join(directory, name), what, run_as)
    for path in (directory, *(os.path.join(directory, name) for name in SPOOL_SUBDIRS)):
        _check_usable(path, what, run_as)


def _give_spool(directory: str, run_as: RunAs) -> None:
    """As root: the spool's subdirectories and files owned by root become ``run_as``'s.

    Works on file descriptors (no path is followed twice), contents before
    their directory, so that the user cannot swap a name for a link while
    root works on it.  In a directory the user already owned, a root-owned
    file is given only if it has no other name (a hard link the user made
    to a root file is refused).
    """
    who = run_as.describe()
    top = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        top_st = os.fstat(top)
        if top_st.st_uid not in (0, run_as.uid):
            return                   # someone else's: the check says whether it is usable
        if top_st.st_uid == 0:
            names = os.listdir(top)
            if names and SPOOL_MARKER not in names:
                raise StartupPermissionError(
                    f"cannot use spool directory {directory}: owned by root and not a pymta spool "
                    f"(no {SPOOL_MARKER}/ in it); make it a new directory, or give it to {who}")
        for name in SPOOL_SUBDIRS:
            try:
                os.mkdir(name, 0o700, dir_fd=top)
            except FileExistsError:
                pass
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=top)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise StartupPermissionError(f"cannot use spool directory {directory}: "
                                                 f"{name} is not a directory") from None
                raise
            try:
                sub_st = os.fstat(sub)
                if sub_st.st_uid not in (0, run_as.uid):
                    continue         # the check reports it
                _give_files(sub, os.path.join(directory, name), run_as,
                            trusted=top_st.st_uid == 0 and sub_st.st_uid == 0)
                if sub_st.st_uid == 0:
                    os.fchown(sub, run_as.uid, run_as.gid)
            finally:
                os.close(sub)
        if top_st.st_uid == 0:
            os.fchown(top, run_as.uid, run_as.gid)
    finally:
        os.close(top)


def _give_files(dir_fd: int, path: str, run_as: RunAs, trusted: bool) -> None:
    """The root-owned regular files in one spool subdirectory become ``run_as``'s.

    ``trusted``: the directory (and its parent) are root's, nobody else
    could have put anything there.
    """
    with os.scandir(dir_fd) as entries:
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if st.st_uid != 0 or not stat.S_ISREG(st.st_mode):
                continue
            try:
                fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode) or st.st_uid != 0:
                    continue
                if st.st_nlink > 1 and not trusted:
                    raise StartupPermissionError(
                        f"cannot use spool directory {os.path.dirname(path)}: "
                        f"{os.path.join(path, entry.name)} is owned by root and has other links; "
                        f"not given to {run_as.describe()}")
                os.fchown(fd, run_as.uid, run_as.gid)
            finally:
                os.close(fd)


# -- local mailboxes --------------------------------------------------------------

def prepare_mail_base(base: str, what: str, run_as: RunAs) -> None:
    """A local backend's base directory: created for ``run_as`` when switching, checked if it exists.

    An existing directory is never changed: it may be shared with a mail
    reader (Dovecot) and belongs to the administrator.
    """
    if run_as.switching:
        _make_directory(base, what, run_as)
    if os.path.lexists(base):
        _check_usable(base, what, run_as)


def prepare_directories(config, run_as: RunAs) -> None:
    """The spool and each local backend's base, for ``run_as`` (StartupPermissionError)."""
    from pymta.delivery.mailbox import LocalMailboxBackend
    check_python(run_as)
    prepare_spool(config.spool_dir, run_as)
    for name, backend in config.backends.items():
        if isinstance(backend, LocalMailboxBackend):
            prepare_mail_base(backend.base, f"backends.{name} base directory", run_as)


# -- files read again later -------------------------------------------------------

def unreadable_later(files: Iterable[tuple[str, str]], run_as: RunAs) -> list[tuple[str, str]]:
    """Those of ``(what, path)`` that ``run_as`` cannot read (read as root at start-up)."""
    if not run_as.switching:
        return []
    unreadable = []
    with run_as.effective():
        for what, path in files:
            if not os.access(path, os.R_OK, effective_ids=True):
                unreadable.append((what, path))
    return unreadable
