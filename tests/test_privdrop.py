"""Privilege drop: started as root with ``twistd --uid/--gid``, pymta runs as that user.

A real twistd is started as root with ``--uid pymtatest --gid pymtatest`` (a
system user the test creates if missing): the spool and the Maildir base are
made the user's before the switch, the server and its disk worker run as
the user, a message goes in over smtplib and comes out in the Maildir owned
by the user, and a restart works.  A spool left by a run as root is given to
the user; a spool the user cannot reach is one line on stderr and exit 1.

The test user must be able to run the Python interpreter: when the one
running the tests lives where the user cannot go (a pyenv under /root), the
system's interpreter of the same version is used with the same packages.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import signal
import smtplib
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from conftest import IN_CI, free_port, wait_until_serving

USER = "pymtatest"
TWISTD_CODE = "import sys; sys.argv[0] = 'twistd'; from twisted.scripts.twistd import run; run()"


def need_root() -> None:
    if os.geteuid() != 0:
        message = "switching users needs root"
        if IN_CI:
            pytest.fail(message + " (the suite runs as root under CI)")
        pytest.skip(message)


@pytest.fixture(scope="module")
def user() -> pwd.struct_passwd:
    need_root()
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                    "--shell", "/usr/sbin/nologin", USER], check=True)
    return pwd.getpwnam(USER)


def _python_path() -> str:
    """The packages of this test run (not the interpreter's own library)."""
    return os.pathsep.join(p for p in sys.path if p and not p.startswith(sys.base_prefix))


@pytest.fixture(scope="module")
def python(user) -> str:
    """An interpreter the test user can run, with this run's packages importable."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    env = dict(os.environ, PYTHONPATH=_python_path())
    tried = []
    for candidate in (sys.executable, f"/usr/bin/python{version}"):
        if not os.path.exists(candidate):
            continue
        try:
            probe = subprocess.run([candidate, "-c", "import twisted.scripts.twistd, pymta.tap"],
                                   user=user.pw_uid, group=user.pw_gid, extra_groups=[], env=env,
                                   cwd="/", capture_output=True, text=True)
        except OSError as e:                 # the user cannot reach it
            tried.append(f"{candidate}: {e.strerror}")
            continue
        if probe.returncode == 0:
            return candidate
        tried.append(f"{candidate}: {probe.stderr.strip().splitlines()[-1:]}")
    message = f"no Python {version} interpreter usable by {USER}: {'; '.join(tried)}"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def workdir():
    """A directory the test user can reach (pytest's own tmp dirs are root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="pymta-privdrop-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


class DroppingServer:
    """``twistd -n --pidfile= [--uid U --gid G] pymta --config CFG`` as a real process."""

    def __init__(self, python: str, directory: Path, spool: Path, mail: Path,
                 extra_toml: str = "") -> None:
        self.python = python
        self.dir = directory
        self.port = free_port()
        self.config = directory / "pymta.toml"
        self.log = directory / "pymta.log"
        self.spool = spool
        self.mail = mail
        self.config.write_text(textwrap.dedent(f"""\
            [server]
            hostname = "mx.example.test"
            domains = ["example.test"]

            [spool]
            directory = "{spool}"

            [[listeners]]
            name = "mx"
            endpoint = "tcp:{self.port}:interface=127.0.0.1"
            role = "mx"

            [backends.local]
            use = "maildir"
            base = "{mail}"
            """) + textwrap.dedent(extra_toml))
        self.proc: subprocess.Popen | None = None

    def command(self, uid: str | None) -> list[str]:
        switch = ["--uid", uid, "--gid", uid] if uid else []
        return [self.python, "-c", TWISTD_CODE, "-n", "--pidfile=", *switch,
                "pymta", "--config", str(self.config)]

    def run(self, uid: str | None) -> subprocess.CompletedProcess:
        """Start expecting a start-up failure: the finished process."""
        return subprocess.run(self.command(uid), cwd=self.dir, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=_python_path()), timeout=60)

    def start(self, uid: str | None) -> "DroppingServer":
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(self.command(uid), cwd=self.dir, stdout=logf,
                                     stderr=subprocess.STDOUT,
                                     env=dict(os.environ, PYTHONPATH=_python_path()))
        logf.close()
        wait_until_serving(self.proc, self.port, self.log, 30, error=AssertionError)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # twistd ends itself with the signal it got
        assert self.proc is None or self.proc.returncode in (0, -signal.SIGTERM), self.log.read_text()

    def send(self, subject: str, local: str = "alice") -> None:
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            refused = client.sendmail("sender@elsewhere.test", [f"{local}@example.test"],
                                      f"Subject: {subject}\r\n\r\nhello\r\n".encode())
        assert refused == {}

    def delivered(self, count: int, local: str = "alice") -> list[Path]:
        new = self.mail / "example.test" / local / "new"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            files = sorted(new.iterdir()) if new.is_dir() else []
            if len(files) >= count:
                return files
            time.sleep(0.05)
        raise AssertionError(f"{count} messages not delivered:\n{self.log.read_text()}")


def ids_of(pid: int) -> tuple[list[int], list[int]]:
    """(real, effective, saved, fs uids), (the same gids) of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.split()
    return [int(v) for v in fields["Uid"]], [int(v) for v in fields["Gid"]]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            if f"\nPPid:\t{pid}\n" in status:
                found.append(int(entry.name))
    return found


def owners(top: Path) -> set[tuple[int, int]]:
    """(uid, gid) of ``top`` and of everything under it."""
    paths = [top, *top.rglob("*")]
    return {(p.lstat().st_uid, p.lstat().st_gid) for p in paths}


def test_runs_as_the_user_delivers_and_restarts(user, python, workdir):
    group = grp.getgrgid(user.pw_gid).gr_name
    hosts = workdir / "hosts"                # read as root at start; the user cannot read it
    hosts.write_text("127.0.0.1 localhost\n")
    hosts.chmod(0o600)
    server = DroppingServer(python, workdir, workdir / "spool", workdir / "mail",
                            f'[dns]\nhosts_file = "{hosts}"\n')
    server.start(USER)
    try:
        assert ids_of(server.proc.pid) == ([user.pw_uid] * 4, [user.pw_gid] * 4)
        server.send("first")
        first = server.delivered(1)
        workers = children_of(server.proc.pid)
        assert workers, "no disk worker process"
        for pid in workers:
            assert ids_of(pid) == ([user.pw_uid] * 4, [user.pw_gid] * 4)
    finally:
        server.stop()
    assert owners(server.spool) == {(user.pw_uid, user.pw_gid)}
    assert owners(server.mail) == {(user.pw_uid, user.pw_gid)}
    assert b"Subject: first" in first[0].read_bytes()
    log = server.log.read_text()
    assert f"set uid/gid {user.pw_uid}/{grp.getgrnam(group).gr_gid}" in log
    assert (f"hosts file {hosts} is not readable by {USER} (uid {user.pw_uid}), whom pymta runs as: "
            f"changes to it cannot be read after the start") in log

    server.start(USER)
    try:
        server.send("second")
        files = server.delivered(2)
    finally:
        server.stop()
    assert any(b"Subject: second" in f.read_bytes() for f in files)
    assert owners(server.spool) == {(user.pw_uid, user.pw_gid)}
    assert owners(server.mail) == {(user.pw_uid, user.pw_gid)}
    assert "Traceback" not in server.log.read_text()


def test_a_spool_left_by_a_run_as_root_is_given_to_the_user(user, python, workdir):
    mail = workdir / "mail"
    (mail / "example.test").mkdir(parents=True)
    for path in (mail, mail / "example.test"):
        os.chown(path, user.pw_uid, user.pw_gid)
    server = DroppingServer(python, workdir, workdir / "spool", mail)
    server.start(None)                       # as root: the spool and its files are root's
    try:
        server.send("as root")
        server.delivered(1)
    finally:
        server.stop()
    root_files = [p for p in server.spool.rglob("*") if p.is_file()]
    assert root_files, "the run as root left no file in the spool (free/)"
    assert {p.stat().st_uid for p in root_files} == {0}

    server.start(USER)
    try:
        # (to another mailbox: alice's Maildir is root's now, and stays so:
        # pymta does not change existing mail directories)
        server.send("as the user", "bob")    # reuses the recycled file the root run left
        files = server.delivered(1, "bob")
    finally:
        server.stop()
    assert b"Subject: as the user" in files[0].read_bytes()
    assert owners(server.spool) == {(user.pw_uid, user.pw_gid)}
    assert owners(mail / "example.test" / "bob") == {(user.pw_uid, user.pw_gid)}
    assert "Traceback" not in server.log.read_text()


def test_a_spool_the_user_cannot_reach_is_one_line_and_exit_1(user, python, workdir):
    private = workdir / "private"            # root's, 0700: the user cannot enter it
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    spool = private / "spool"
    server = DroppingServer(python, workdir, spool, workdir / "mail")
    done = server.run(USER)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"pymta: cannot use spool directory {spool}: {private} is owned by root (mode 0700), "
        f"{USER} (uid {user.pw_uid}) cannot enter it"]
    assert not any(f"{server.port}" in line and "starting on" in line for line in done.stdout.splitlines())


def test_a_spool_owned_by_another_user_is_one_line_and_exit_1(user, python, workdir):
    spool = workdir / "spool"
    spool.mkdir(mode=0o700)
    nobody = pwd.getpwnam("nobody")
    os.chown(spool, nobody.pw_uid, nobody.pw_gid)
    spool.chmod(0o700)
    server = DroppingServer(python, workdir, spool, workdir / "mail")
    done = server.run(USER)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"pymta: cannot use spool directory {spool}: owned by nobody (mode 0700), "
        f"needs to be writable by {USER} (uid {user.pw_uid})"]
    assert spool.stat().st_uid == nobody.pw_uid          # not taken from its owner


def test_a_mail_base_the_user_cannot_write_is_one_line_and_exit_1(user, python, workdir):
    mail = workdir / "mail"                  # the administrator's, not changed by pymta
    mail.mkdir(mode=0o755)
    mail.chmod(0o755)
    server = DroppingServer(python, workdir, workdir / "spool", mail)
    done = server.run(USER)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr.splitlines() == [
        f"pymta: cannot use backends.local base directory {mail}: owned by root (mode 0755), "
        f"needs to be writable by {USER} (uid {user.pw_uid})"]
    assert owners(mail) == {(0, 0)}


# -- pymta.runas on its own (as root, no server) ----------------------------------

def run_as_user(user) -> "RunAs":
    from pymta.runas import RunAs
    return RunAs(user.pw_uid, user.pw_gid, tuple(os.getgrouplist(USER, user.pw_gid)), switching=True)


def test_a_root_directory_that_is_no_spool_is_not_given_away(user, workdir):
    from pymta.runas import StartupPermissionError, prepare_spool
    shared = workdir / "shared"              # a spool named by mistake: /var/spool
    (shared / "cron").mkdir(parents=True)
    with pytest.raises(StartupPermissionError) as raised:
        prepare_spool(str(shared), run_as_user(user))
    assert str(raised.value) == (f"cannot use spool directory {shared}: owned by root and not a "
                                 f"pymta spool (no queue/ in it); make it a new directory, or give "
                                 f"it to {USER} (uid {user.pw_uid})")
    assert owners(shared) == {(0, 0)}


def test_a_hard_link_to_a_root_file_in_the_users_spool_is_refused(user, workdir):
    from pymta.runas import StartupPermissionError, prepare_spool
    spool = workdir / "spool"
    prepare_spool(str(spool), run_as_user(user))
    assert owners(spool) == {(user.pw_uid, user.pw_gid)}
    secret = workdir / "secret"
    secret.write_text("root's\n")
    secret.chmod(0o600)
    os.link(secret, spool / "queue" / "1K1QT2ZFNA4BTFH9.msg")   # as the user could
    with pytest.raises(StartupPermissionError, match="is owned by root and has other links"):
        prepare_spool(str(spool), run_as_user(user))
    assert secret.stat().st_uid == 0


def test_root_files_of_a_root_spool_are_given_to_the_user(user, workdir):
    from pymta.runas import prepare_spool
    spool = workdir / "spool"
    for name in ("queue", "free", "tmp"):
        (spool / name).mkdir(parents=True, mode=0o700)
    (spool / "queue" / "1K1QT2ZFNA4BTFH9.msg").write_bytes(b"body")
    (spool / "queue" / "1K1QT2ZFNA4BTFH9.env").write_bytes(b"{}")
    os.link(spool / "queue" / "1K1QT2ZFNA4BTFH9.env", spool / "free" / "7")  # as an update leaves it
    prepare_spool(str(spool), run_as_user(user))
    assert owners(spool) == {(user.pw_uid, user.pw_gid)}
    assert {p.name for p in spool.iterdir()} == {"tmp", "queue", "corrupt", "free"}


# -- directories made as root where the user can write: fd-based, no path followed ---------
def _swapping_mkdir(monkeypatch, victim_of, swap):
    """``os.mkdir`` as runas calls it, with the name swapped by ``swap`` right after it is made
    (what a user who can write into the parent can do between root's calls)."""
    from pymta import runas
    real_mkdir = os.mkdir

    def mkdir(path, mode=0o777, *args, **kw):
        real_mkdir(path, mode, *args, **kw)
        victim = victim_of(path)
        if victim is not None:
            swap(path, victim)

    monkeypatch.setattr(runas.os, "mkdir", mkdir)


def test_a_parent_swapped_for_a_symlink_is_not_chmodded_through_it(user, workdir, monkeypatch):
    from pymta.runas import StartupPermissionError, prepare_spool
    mine = workdir / "users"                 # a directory the user may write into
    mine.mkdir()
    os.chown(mine, user.pw_uid, user.pw_gid)
    secret = workdir / "secret"
    secret.write_text("root's\n")
    secret.chmod(0o600)
    parent = mine / "pymta"

    def swap(path, victim):
        os.rename(path, str(path) + ".moved")
        os.symlink(victim, path)

    _swapping_mkdir(monkeypatch, lambda p: secret if str(p) == str(parent) else None, swap)
    with pytest.raises(StartupPermissionError) as raised:
        prepare_spool(str(parent / "spool"), run_as_user(user))
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert str(raised.value) == (f"cannot create spool directory {parent / 'spool'}: {parent} "
                                 "is not a directory (replaced while it was made)")


def test_a_new_directory_swapped_for_a_root_file_is_not_given_away(user, workdir, monkeypatch):
    from pymta.runas import StartupPermissionError, prepare_spool
    mine = workdir / "users"
    mine.mkdir()
    os.chown(mine, user.pw_uid, user.pw_gid)
    secret = workdir / "secret"
    secret.write_text("root's\n")
    secret.chmod(0o600)
    spool = mine / "spool"

    def swap(path, victim):
        os.rename(path, str(path) + ".moved")
        os.link(victim, path)                # a hard link, as the user could without protected_hardlinks

    _swapping_mkdir(monkeypatch, lambda p: secret if str(p) == str(spool) else None, swap)
    with pytest.raises(StartupPermissionError) as raised:
        prepare_spool(str(spool), run_as_user(user))
    assert secret.stat().st_uid == 0
    assert str(raised.value) == (f"cannot create spool directory {spool}: {spool} "
                                 "is not a directory (replaced while it was made)")
