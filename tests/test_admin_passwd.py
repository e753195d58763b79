"""`pymta passwd`: add, change and delete users of a passwdfile password file."""

from __future__ import annotations

import io
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from pymta import admin
from pymta.auth import passwd_command, passwdfile
from pymta.auth.passwdfile import parse_password_file, verify_password

PYMTA = str(Path(sys.executable).parent / "pymta")
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
PASSWORD = "Tr0ub4dor&3 unique"


@pytest.fixture
def fast_hashes(monkeypatch):
    """In-process runs hash with cheap parameters (the subprocess runs keep the real ones)."""
    monkeypatch.setattr(passwdfile, "hash_password", FAST.hash)


def run_main(monkeypatch, capsys, argv: list[str], stdin: bytes = b""):
    """main(argv) with ``stdin``: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    code = admin.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def users_of(path: Path) -> dict[str, str]:
    return {name: phc for name, phc in parse_password_file(path.read_text(), str(path)).entries.values()}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# -- as a function ----------------------------------------------------------------------------

def test_adds_a_user_to_a_new_file_with_mode_0600(tmp_path, monkeypatch, capsys, fast_hashes):
    path = tmp_path / "users"
    code, out, err = run_main(monkeypatch, capsys, ["passwd", "--stdin", str(path), "alice"],
                              PASSWORD.encode() + b"\n")
    assert (code, err) == (0, "")
    assert out == f"added user 'alice' in {path}\n"
    assert path.stat().st_mode & 0o777 == 0o600
    users = users_of(path)
    assert list(users) == ["alice"]
    assert verify_password(users["alice"], PASSWORD)
    assert not verify_password(users["alice"], PASSWORD + "\n")
    assert leftovers(tmp_path) == []


def test_changes_a_password_keeping_comments_other_users_and_mode(tmp_path, monkeypatch, capsys,
                                                                   fast_hashes):
    path = tmp_path / "users"
    before = f"# site users\r\n\nalice:{FAST.hash('old')}\n  # bob is the admin\nbob:{FAST.hash('b')}\n"
    path.write_bytes(before.encode())
    path.chmod(0o640)
    old_inode = path.stat().st_ino
    with open(path, "rb") as still_open:
        code, out, err = run_main(monkeypatch, capsys, ["passwd", "--stdin", str(path), "alice"],
                                  b"new\r\n")
        assert still_open.read() == before.encode()   # replaced by rename, not rewritten in place
    assert (code, err) == (0, "")
    assert out == f"changed password of user 'alice' in {path}\n"
    after = path.read_bytes().decode()
    lines_before, lines_after = before.split("\n"), after.split("\n")
    assert len(lines_after) == len(lines_before)
    assert [l for i, l in enumerate(lines_after) if i != 2] == [l for i, l in enumerate(lines_before) if i != 2]
    assert verify_password(users_of(path)["alice"], "new")
    assert path.stat().st_mode & 0o777 == 0o640
    assert path.stat().st_ino != old_inode
    assert leftovers(tmp_path) == []


def test_deletes_a_user(tmp_path, monkeypatch, capsys, fast_hashes):
    path = tmp_path / "users"
    path.write_text(f"# users\nalice:{FAST.hash('a')}\nbob:{FAST.hash('b')}\n")
    path.chmod(0o600)
    code, out, err = run_main(monkeypatch, capsys, ["passwd", "--delete", str(path), "alice"])
    assert (code, out, err) == (0, f"removed user 'alice' from {path}\n", "")
    assert list(users_of(path)) == ["bob"]
    assert path.read_text().startswith("# users\nbob:")
    code, out, err = run_main(monkeypatch, capsys, ["passwd", "--delete", str(path), "alice"])
    assert (code, out) == (1, "")
    assert err == f"pymta passwd: no user 'alice' in {path}\n"
    code, _, err = run_main(monkeypatch, capsys, ["passwd", "--delete", str(tmp_path / "none"), "a"])
    assert code == 1 and err == f"pymta passwd: {tmp_path / 'none'}: no such file\n"


@pytest.mark.parametrize("user, problem", [
    ("a:b", "contains ':'"), ("a b", "contains whitespace"), ("a\tb", "contains whitespace"),
    ("", "is empty"), ("a\x7fb", "contains a control character")])
def test_refuses_bad_user_names(tmp_path, monkeypatch, capsys, fast_hashes, user, problem):
    path = tmp_path / "users"
    code, out, err = run_main(monkeypatch, capsys, ["passwd", "--stdin", str(path), user], b"pw\n")
    assert (code, out) == (1, "")
    assert err == f"pymta passwd: user name {user!r} {problem}\n"
    assert not path.exists()


@pytest.mark.parametrize("stdin, problem", [
    (b"", "no password on standard input"),
    (b"\n", "empty password refused"),
    (b"\xff\xfe\n", "the password on standard input is not valid UTF-8"),
    (b"a\x00b\n", "a password cannot contain a NUL character (AUTH PLAIN cannot send it)")])
def test_refuses_bad_passwords_on_stdin(tmp_path, monkeypatch, capsys, fast_hashes, stdin, problem):
    path = tmp_path / "users"
    code, out, err = run_main(monkeypatch, capsys, ["passwd", "--stdin", str(path), "alice"], stdin)
    assert (code, out, err) == (1, "", f"pymta passwd: {problem}\n")
    assert not path.exists()


def test_only_the_first_line_of_stdin_is_the_password(tmp_path, monkeypatch, capsys, fast_hashes):
    path = tmp_path / "users"
    code, _, _ = run_main(monkeypatch, capsys, ["passwd", "--stdin", str(path), "alice"],
                          b" spaced pass \nsecond line\n")
    assert code == 0
    assert verify_password(users_of(path)["alice"], " spaced pass ")


def test_usage_errors_exit_2(tmp_path, monkeypatch, capsys):
    for argv in ([], ["passwd"], ["passwd", "f"], ["passwd", "--stdin", "--delete", "f", "u"],
                 ["nosuchcommand"]):
        code, out, err = run_main(monkeypatch, capsys, argv)
        assert code == 2, argv
        assert "usage: pymta" in err
    code, out, _ = run_main(monkeypatch, capsys, ["passwd", "--help"])
    assert code == 0 and "--delete" in out


def test_failed_write_leaves_the_file_alone(tmp_path, monkeypatch, capsys, fast_hashes):
    path = tmp_path / "users"
    before = f"alice:{FAST.hash('a')}\n"
    path.write_text(before)
    path.chmod(0o600)

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(passwd_command.os, "fsync", failing_fsync)
    code, out, err = run_main(monkeypatch, capsys, ["passwd", "--stdin", str(path), "alice"], b"b\n")
    assert (code, out) == (1, "")
    assert err == f"pymta passwd: cannot write {path}: No space left on device; nothing changed\n"
    assert path.read_text() == before
    assert leftovers(tmp_path) == []


def test_edits_the_target_of_a_symlink(tmp_path, monkeypatch, capsys, fast_hashes):
    real = tmp_path / "real-users"
    real.write_text("")
    real.chmod(0o600)
    link = tmp_path / "users"
    link.symlink_to(real.name)
    code, _, _ = run_main(monkeypatch, capsys, ["passwd", "--stdin", str(link), "alice"], b"pw\n")
    assert code == 0
    assert link.is_symlink()
    assert list(users_of(real)) == ["alice"]


def test_warns_about_problems_the_server_would_have(tmp_path, monkeypatch, capsys, fast_hashes):
    path = tmp_path / "users"
    path.write_text(f"Alice:{FAST.hash('a')}\nbroken line\n")
    path.chmod(0o644)
    code, out, err = run_main(monkeypatch, capsys, ["passwd", "--stdin", str(path), "bob"], b"pw\n")
    assert code == 0 and out == f"added user 'bob' in {path}\n"
    assert err.splitlines() == [
        f"pymta passwd: warning: {path} is world-readable; the server refuses it: chmod 600 it",
        f"pymta passwd: warning: {path}, line 2: expected 'user:hash'; "
        "the server refuses the file until this is fixed"]
    path.write_text(f"Alice:{FAST.hash('a')}\n")
    path.chmod(0o600)
    code, out, err = run_main(monkeypatch, capsys, ["passwd", "--stdin", str(path), "alice"], b"pw\n")
    assert code == 0
    assert err == (f"pymta passwd: warning: {path} also has 'Alice': with case_insensitive_users "
                   "= true the server refuses the file\n")


def test_refuses_a_user_on_several_lines(tmp_path, monkeypatch, capsys, fast_hashes):
    path = tmp_path / "users"
    before = f"a:{FAST.hash('1')}\na:{FAST.hash('2')}\n"
    path.write_text(before)
    path.chmod(0o600)
    code, _, err = run_main(monkeypatch, capsys, ["passwd", "--stdin", str(path), "a"], b"pw\n")
    assert code == 1
    assert err == (f"pymta passwd: {path}, line 2: user 'a' is on lines 1, 2; remove all but one "
                   "by hand first; nothing changed\n")
    assert path.read_text() == before


# -- as the installed console script -------------------------------------------------------

def test_console_script_with_stdin(tmp_path):
    path = tmp_path / "users"
    result = subprocess.run([PYMTA, "passwd", "--stdin", str(path), "alice"],
                            input=PASSWORD.encode() + b"\n", capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"added user 'alice' in {path}\n".encode()
    assert result.stderr == b""
    phc = users_of(path)["alice"]
    assert PASSWORD.encode() not in result.stdout + result.stderr
    assert phc.encode() not in result.stdout + result.stderr
    assert verify_password(phc, PASSWORD)
    assert path.stat().st_mode & 0o777 == 0o600


def test_console_script_without_a_terminal_asks_for_stdin(tmp_path):
    path = tmp_path / "users"
    result = subprocess.run([PYMTA, "passwd", str(path), "alice"], stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=60, start_new_session=True)
    assert result.returncode == 1
    assert result.stderr == (b"pymta passwd: no terminal to ask for the password on; "
                             b"use --stdin to read it from standard input\n")
    assert not path.exists()


class Terminal:
    """``pymta`` run on a pseudo-terminal (its controlling terminal), as a person would."""

    def __init__(self, argv: list[str]):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:                                   # the child
            try:
                os.execv(PYMTA, [PYMTA, *argv])
            finally:
                os._exit(127)
        self.seen = b""

    def read_until(self, wanted: bytes, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while wanted not in self.seen:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"waited for {wanted!r}, saw {self.seen!r}")
            ready, _, _ = select.select([self.fd], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.fd, 1024)
                except OSError:                              # EIO: the child closed the pty
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"EOF while waiting for {wanted!r}, saw {self.seen!r}")
                self.seen += chunk

    def type(self, text: str) -> None:
        os.write(self.fd, text.encode())

    def finish(self, timeout: float = 30.0) -> int:
        """Read everything up to the child's exit; its exit code."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(self.fd, 1024)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                self.seen += chunk
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def test_prompts_twice_without_echo_on_a_terminal(tmp_path):
    path = tmp_path / "users"
    term = Terminal(["passwd", str(path), "alice"])
    term.read_until(b"New password for alice: ")
    term.type(PASSWORD + "\n")
    term.read_until(b"Retype new password: ")
    term.type(PASSWORD + "\n")
    assert term.finish() == 0, term.seen
    assert PASSWORD.encode() not in term.seen                # not echoed, not printed
    assert f"added user 'alice' in {path}".encode() in term.seen
    assert verify_password(users_of(path)["alice"], PASSWORD)


def test_mismatched_confirmation_changes_nothing(tmp_path):
    path = tmp_path / "users"
    term = Terminal(["passwd", str(path), "alice"])
    term.read_until(b"New password for alice: ")
    term.type(PASSWORD + "\n")
    term.read_until(b"Retype new password: ")
    term.type(PASSWORD + "x\n")
    assert term.finish() == 1
    assert b"pymta passwd: the passwords do not match, nothing changed" in term.seen
    assert PASSWORD.encode() not in term.seen
    assert not path.exists()
