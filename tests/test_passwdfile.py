"""The passwdfile credentials checker: argon2id password file, reload, off-reactor verification."""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from pathlib import Path

import pytest
from argon2 import PasswordHasher, extract_parameters
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import CancelledError
from twisted.logger import globalLogPublisher, formatEvent
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer
from zope.interface.verify import verifyObject

from pymta.auth import passwdfile
from pymta.auth.passwdfile import (FAILED_LOGIN_TEXT, PasswordFileChecker, PasswordFileError,
                                   edit_password_text, hash_password, parse_password_file)
from pymta.config.errors import OptionError
from pymta.config.options import PluginContext

#: cheap argon2id parameters, so that each verification takes microseconds (tests only)
FAST = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
OTHER_COST = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)


class ThreadedReactor:
    """A reactor stand-in: a real thread pool; callFromThread queues, :meth:`wait` runs the queue."""

    def __init__(self) -> None:
        self.pool = ThreadPool(minthreads=0, maxthreads=4, name="test-auth")
        self.pool.start()
        self.from_threads: queue.Queue = queue.Queue()
        self.thread_ident = threading.get_ident()

    def getThreadPool(self) -> ThreadPool:
        return self.pool

    def callFromThread(self, f, *args, **kwargs) -> None:
        self.from_threads.put((f, args, kwargs))

    def wait(self, d, timeout: float = 10.0):
        """Run what the pool hands back until ``d`` fires; its result (or Failure)."""
        results: list = []
        d.addBoth(results.append)
        deadline = time.monotonic() + timeout
        while not results:
            f, args, kwargs = self.from_threads.get(timeout=max(0.01, deadline - time.monotonic()))
            f(*args, **kwargs)
        return results[0]

    def stop(self) -> None:
        self.pool.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def reactor():
    r = ThreadedReactor()
    yield r
    r.stop()


@pytest.fixture
def context(tmp_path, reactor):
    return PluginContext("mx.example.org", ("example.org",), str(tmp_path), reactor=reactor)


@pytest.fixture
def logged():
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def write_users(path: Path, users: dict[str, str], extra: str = "", hasher=FAST) -> None:
    lines = [f"{name}:{hasher.hash(password)}" for name, password in users.items()]
    path.write_text(extra + "\n".join(lines) + "\n")
    path.chmod(0o600)


def make_checker(tmp_path, context, users=None, *, extra: str = "", **options):
    path = tmp_path / "users"
    write_users(path, users if users is not None else {"alice": "s3cret", "bob@example.org": "hunter2"},
                extra)
    clock = Clock()
    checker = PasswordFileChecker({"file": "users", **options}, context, clock=clock)
    return checker, clock, path


def login(reactor, checker, user, password):
    """The checker's answer: the avatar id, or the Failure."""
    return reactor.wait(checker.requestAvatarId(UsernamePassword(user, password)))


def refused(result) -> bool:
    return (isinstance(result, Failure) and result.check(UnauthorizedLogin) is not None
            and result.getErrorMessage() == FAILED_LOGIN_TEXT)


# -- logging in -----------------------------------------------------------------------

def test_right_password_gives_the_user_name(tmp_path, context, reactor):
    checker, _, _ = make_checker(tmp_path, context)
    assert verifyObject(ICredentialsChecker, checker)
    assert login(reactor, checker, b"alice", b"s3cret") == "alice"
    assert login(reactor, checker, "bob@example.org", "hunter2") == "bob@example.org"


def test_wrong_password_and_unknown_user_fail_alike(tmp_path, context, reactor):
    checker, _, _ = make_checker(tmp_path, context)
    wrong = login(reactor, checker, b"alice", b"S3cret")
    unknown = login(reactor, checker, b"mallory", b"s3cret")
    assert refused(wrong) and refused(unknown)
    assert str(wrong.value) == str(unknown.value)
    assert refused(login(reactor, checker, b"alice", b""))
    assert refused(login(reactor, checker, b"\xff\xfe", b"s3cret"))     # not UTF-8
    assert refused(login(reactor, checker, b"alice\x00", b"s3cret"))


def test_non_ascii_user_and_password(tmp_path, context, reactor):
    checker, _, _ = make_checker(tmp_path, context, {"jürgen": "pässwörd ∑"})
    assert login(reactor, checker, "jürgen".encode(), "pässwörd ∑".encode()) == "jürgen"
    assert refused(login(reactor, checker, "jürgen".encode("latin-1"), "pässwörd ∑".encode()))


def test_unknown_user_is_verified_against_a_dummy_of_the_usual_cost(tmp_path, context, reactor,
                                                                   monkeypatch):
    path = tmp_path / "users"
    path.write_text(f"a:{OTHER_COST.hash('x')}\nb:{FAST.hash('y')}\nc:{FAST.hash('z')}\n")
    path.chmod(0o600)
    checker = PasswordFileChecker({"file": "users"}, context)
    verified: list[str] = []
    real_verify = passwdfile.verify_password

    def recording_verify(phc, password):
        verified.append(phc)
        return real_verify(phc, password)

    monkeypatch.setattr(passwdfile, "verify_password", recording_verify)
    assert refused(login(reactor, checker, b"nobody", b"y"))
    assert len(verified) == 1                       # a real argon2 verification was made
    usual = dataclasses.astuple(extract_parameters(FAST.hash("q")))
    assert dataclasses.astuple(extract_parameters(verified[0])) == usual
    assert verified[0] not in path.read_text()


def test_verification_runs_in_the_thread_pool_not_on_the_calling_thread(tmp_path, context, reactor,
                                                                       monkeypatch):
    checker, _, _ = make_checker(tmp_path, context)
    threads: list[int] = []
    real_verify = passwdfile.verify_password

    def recording_verify(phc, password):
        threads.append(threading.get_ident())
        return real_verify(phc, password)

    monkeypatch.setattr(passwdfile, "verify_password", recording_verify)
    d = checker.requestAvatarId(UsernamePassword(b"alice", b"s3cret"))
    assert threads == [] or threads[0] != reactor.thread_ident
    assert reactor.wait(d) == "alice"
    assert refused(login(reactor, checker, b"mallory", b"x"))
    assert len(threads) == 2
    assert reactor.thread_ident not in threads


def test_concurrency_limits_verifications_in_flight(tmp_path, context, reactor, monkeypatch):
    checker, _, _ = make_checker(tmp_path, context, concurrency=1)
    lock = threading.Lock()
    active = [0, 0]                                  # now, most seen

    def slow_verify(phc, password):
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return False

    monkeypatch.setattr(passwdfile, "verify_password", slow_verify)
    ds = [checker.requestAvatarId(UsernamePassword(b"alice", b"x")) for _ in range(3)]
    assert all(refused(reactor.wait(d)) for d in ds)
    assert active[1] == 1


def test_a_cancelled_verification_keeps_its_slot_until_its_thread_is_done(tmp_path, context, reactor,
                                                                        monkeypatch):
    # plugin_timeout cancels a pending login; the thread still runs, and the
    # next verification must wait for it (concurrency bounds memory use)
    checker, _, _ = make_checker(tmp_path, context, concurrency=1)
    release = threading.Event()
    lock = threading.Lock()
    active = [0, 0]                                  # now, most seen

    def held_verify(phc, password):
        with lock:
            active[0] += 1
            active[1] = max(active[1], active[0])
        release.wait(5)
        with lock:
            active[0] -= 1
        return True

    monkeypatch.setattr(passwdfile, "verify_password", held_verify)
    first = checker.requestAvatarId(UsernamePassword(b"alice", b"x"))
    time.sleep(0.1)
    first.cancel()
    cancelled = []
    first.addErrback(cancelled.append)
    assert cancelled and cancelled[0].check(CancelledError)
    second = checker.requestAvatarId(UsernamePassword(b"alice", b"x"))
    time.sleep(0.1)
    assert active[0] == 1                            # the second waits for the slot
    release.set()
    assert reactor.wait(second) == "alice"
    assert active[1] == 1


def test_two_verifications_run_at_once_with_concurrency_two(tmp_path, context, reactor, monkeypatch):
    checker, _, _ = make_checker(tmp_path, context, concurrency=2)
    both_in = threading.Barrier(2)

    def meeting_verify(phc, password):
        both_in.wait(timeout=5)                     # BrokenBarrierError unless two run together
        return True

    monkeypatch.setattr(passwdfile, "verify_password", meeting_verify)
    ds = [checker.requestAvatarId(UsernamePassword(b"alice", b"x")) for _ in range(2)]
    assert [reactor.wait(d) for d in ds] == ["alice", "alice"]


def test_works_through_a_twisted_cred_portal(tmp_path, context, reactor):
    class IMailUser(Interface):
        pass

    @implementer(IRealm)
    class Realm:
        def requestAvatar(self, avatar_id, mind, *interfaces):
            return IMailUser, avatar_id, lambda: None

    checker, _, _ = make_checker(tmp_path, context)
    portal = Portal(Realm(), [checker])
    interface, avatar, _ = reactor.wait(portal.login(UsernamePassword(b"alice", b"s3cret"), None,
                                                     IMailUser))
    assert (interface, avatar) == (IMailUser, "alice")
    assert refused(reactor.wait(portal.login(UsernamePassword(b"alice", b"no"), None, IMailUser)))


def test_case_insensitive_users(tmp_path, context, reactor):
    sensitive, _, _ = make_checker(tmp_path, context, {"Alice": "pw"})
    assert refused(login(reactor, sensitive, b"alice", b"pw"))
    assert login(reactor, sensitive, b"Alice", b"pw") == "Alice"
    insensitive = PasswordFileChecker({"file": "users", "case_insensitive_users": True}, context)
    assert login(reactor, insensitive, b"ALICE", b"pw") == "Alice"       # spelt as in the file


def test_production_hasher_uses_argon2_cffi_defaults():
    phc = hash_password("correct horse")
    assert phc.startswith("$argon2id$v=19$")
    assert extract_parameters(phc) == extract_parameters(PasswordHasher().hash("x"))
    assert passwdfile.verify_password(phc, "correct horse")
    assert not passwdfile.verify_password(phc, "Correct horse")


# -- the file ---------------------------------------------------------------------------

def test_comments_blank_lines_and_crlf_are_accepted(tmp_path, context, reactor):
    path = tmp_path / "users"
    path.write_text(f"\ufeff# users\r\n\r\n   # indented comment\nalice:{FAST.hash('a')}\r\n"
                    f"  bob:{FAST.hash('b')}  \n")
    path.chmod(0o600)
    checker = PasswordFileChecker({"file": str(path)}, context)
    assert len(checker.table) == 2
    assert login(reactor, checker, b"alice", b"a") == "alice"
    assert login(reactor, checker, b"bob", b"b") == "bob"


#: a fixed FAST hash of "pw" (a literal, so that test ids are the same in every pytest-xdist worker)
HASH = "$argon2id$v=19$m=8,t=1,p=1$7sF/AkVkP6I3dIIywfYzwA$MkVpcHe3RoiBw63+EfC1XKduq7Me/x10yTsgrJUM+zg"


@pytest.mark.parametrize("text, line, problem", [
    ("alice\n", 1, "expected 'user:hash'"),
    ("# c\n\nalice:" + HASH + "\nbob\n", 4, "expected 'user:hash'"),
    (":" + HASH + "\n", 1, "user name '' is empty"),
    ("al ice:" + HASH + "\n", 1, "user name 'al ice' contains whitespace"),
    ("al\x01ice:" + HASH + "\n", 1, "user name 'al\\x01ice' contains a control character"),
    ("alice: " + HASH + "\n", 1, "the hash for 'alice' contains whitespace"),
    ("alice:" + HASH[:-1] + " x\n", 1, "the hash for 'alice' contains whitespace"),
    ("alice:plaintextpassword\n", 1, "the hash for 'alice' is not an argon2id PHC string"),
    ("alice:" + HASH.replace("argon2id", "argon2i") + "\n", 1, "is not an argon2id PHC string"),
    ("alice:" + HASH.replace("v=19", "v=16") + "\n", 1, "is not an argon2id PHC string"),
    ("alice:" + HASH + "\nbob:" + HASH + "\nalice:" + HASH + "\n", 3,
     "duplicate user 'alice': already on line 1"),
], ids=["no-colon", "no-colon-line-4", "empty-user", "space-in-user", "control-in-user",
        "space-before-hash", "space-in-hash", "plaintext", "argon2i", "version-16", "duplicate"])
def test_syntax_errors_name_file_and_line(tmp_path, context, text, line, problem):
    path = tmp_path / "users"
    path.write_text(text)
    path.chmod(0o600)
    with pytest.raises(OptionError) as caught:
        PasswordFileChecker({"file": "users"}, context)
    assert caught.value.key == "file"
    assert caught.value.problem.startswith(f"{path}, line {line}: ")
    assert problem in caught.value.problem
    assert "$argon2id$v=19$m=8" not in caught.value.problem          # never quotes a hash
    assert "plaintextpassword" not in caught.value.problem


def test_case_variants_are_duplicates_when_case_insensitive(tmp_path, context):
    path = tmp_path / "users"
    path.write_text(f"alice:{HASH}\nALICE:{HASH}\n")
    path.chmod(0o600)
    PasswordFileChecker({"file": "users"}, context)                 # two users
    with pytest.raises(OptionError, match=r"line 2: duplicate user 'ALICE': already on line 1 \(as 'alice'\)"):
        PasswordFileChecker({"file": "users", "case_insensitive_users": True}, context)


def test_invalid_utf8_names_the_line(tmp_path, context):
    path = tmp_path / "users"
    path.write_bytes(f"alice:{HASH}\n".encode() + b"j\xfcrgen:" + HASH.encode() + b"\n")
    path.chmod(0o600)
    with pytest.raises(OptionError, match=r"line 2: not valid UTF-8"):
        PasswordFileChecker({"file": "users"}, context)


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o606])
def test_world_readable_file_is_refused(tmp_path, context, mode):
    path = tmp_path / "users"
    write_users(path, {"alice": "pw"})
    path.chmod(mode)
    with pytest.raises(OptionError) as caught:
        PasswordFileChecker({"file": "users"}, context)
    assert caught.value.key == "file"
    assert caught.value.problem == (f"{path}: world-readable (mode {mode:04o}); "
                                    "password hashes are secrets: chmod 600 it")


def test_group_readable_file_is_allowed(tmp_path, context, reactor):
    path = tmp_path / "users"
    write_users(path, {"alice": "pw"})
    path.chmod(0o640)
    checker = PasswordFileChecker({"file": "users"}, context)
    assert login(reactor, checker, b"alice", b"pw") == "alice"


def test_missing_file_and_bad_options(tmp_path, context):
    with pytest.raises(OptionError, match=r"^file: cannot read .*/nope: No such file"):
        PasswordFileChecker({"file": "nope"}, context)
    with pytest.raises(OptionError, match="required option missing"):
        PasswordFileChecker({}, context)
    write_users(tmp_path / "users", {"alice": "pw"})
    with pytest.raises(OptionError, match="did you mean 'case_insensitive_users'"):
        PasswordFileChecker({"file": "users", "case_insensitive_user": True}, context)
    with pytest.raises(OptionError, match="concurrency: must be at least 1"):
        PasswordFileChecker({"file": "users", "concurrency": 0}, context)


def test_empty_file_refuses_everyone(tmp_path, context, reactor):
    path = tmp_path / "users"
    path.write_text("# nobody yet\n")
    path.chmod(0o600)
    checker = PasswordFileChecker({"file": "users"}, context)
    assert refused(login(reactor, checker, b"alice", b"pw"))


# -- reloading ----------------------------------------------------------------------------

def test_changed_file_is_reloaded_at_most_once_a_second(tmp_path, context, reactor):
    checker, clock, path = make_checker(tmp_path, context, {"alice": "old"})
    write_users(path, {"alice": "new", "carol": "c"})
    clock.now += 0.5
    assert login(reactor, checker, b"alice", b"old") == "alice"          # not looked at yet
    clock.now += 0.6
    assert refused(login(reactor, checker, b"alice", b"old"))
    assert login(reactor, checker, b"alice", b"new") == "alice"
    assert login(reactor, checker, b"carol", b"c") == "carol"


def test_broken_file_at_reload_keeps_the_previous_users(tmp_path, context, reactor, logged):
    checker, clock, path = make_checker(tmp_path, context, {"alice": "old"})
    path.write_text(f"alice:{FAST.hash('new')}\nbroken line\n")
    clock.now += 1.0
    assert login(reactor, checker, b"alice", b"old") == "alice"
    errors = [formatEvent(e) for e in logged if e.get("log_level") and e["log_level"].name == "error"]
    assert errors == [f"password file {path} not reloaded, keeping the previous contents: "
                      f"{path}, line 2: expected 'user:hash'"]
    write_users(path, {"alice": "fixed"})
    clock.now += 1.0
    assert login(reactor, checker, b"alice", b"fixed") == "alice"


def test_file_made_world_readable_at_reload_is_not_used(tmp_path, context, reactor, logged):
    checker, clock, path = make_checker(tmp_path, context, {"alice": "old"})
    write_users(path, {"alice": "new"})
    path.chmod(0o644)
    clock.now += 1.0
    assert login(reactor, checker, b"alice", b"old") == "alice"
    errors = [formatEvent(e) for e in logged if e.get("log_level") and e["log_level"].name == "error"]
    assert len(errors) == 1 and "world-readable (mode 0644)" in errors[0]
    path.chmod(0o600)                                  # the chmod alone is noticed (ctime)
    clock.now += 1.0
    assert login(reactor, checker, b"alice", b"new") == "alice"


def test_removed_file_keeps_the_previous_users(tmp_path, context, reactor, logged):
    checker, clock, path = make_checker(tmp_path, context, {"alice": "pw"})
    path.unlink()
    clock.now += 1.0
    assert login(reactor, checker, b"alice", b"pw") == "alice"
    clock.now += 1.0
    assert login(reactor, checker, b"alice", b"pw") == "alice"
    errors = [formatEvent(e) for e in logged if e.get("log_level") and e["log_level"].name == "error"]
    assert len(errors) == 1 and "cannot be read (No such file or directory)" in errors[0]


# -- editing (the library side of pymta passwd) ------------------------------------------------

def test_edit_keeps_other_lines_byte_for_byte():
    text = "# users\r\n\nalice:OLD\r\n  # note\nbob:B\n"
    new, found = edit_password_text(text, "f", "alice", "NEW")
    assert found and new == "# users\r\n\nalice:NEW\r\n  # note\nbob:B\n"
    new, found = edit_password_text(text, "f", "carol", "C")
    assert not found and new == text + "carol:C\n"
    new, found = edit_password_text("bob:B", "f", "carol", "C")
    assert new == "bob:B\ncarol:C\n"
    new, found = edit_password_text(text, "f", "alice", None)
    assert found and new == "# users\r\n\n  # note\nbob:B\n"
    assert edit_password_text(text, "f", "nobody", None) == (text, False)
    assert edit_password_text("", "f", "a", "H") == ("a:H\n", False)


def test_edit_refuses_a_user_on_several_lines():
    with pytest.raises(PasswordFileError, match=r"f, line 3: user 'a' is on lines 1, 3"):
        edit_password_text("a:1\nb:2\na:3\n", "f", "a", "H")


def test_parse_reports_parameters_most_entries_use():
    table = parse_password_file(f"a:{OTHER_COST.hash('x')}\nb:{HASH}\nc:{FAST.hash('z')}\n", "f")
    assert dataclasses.astuple(table.typical_parameters) == dataclasses.astuple(extract_parameters(HASH))
    assert parse_password_file("", "f").typical_parameters is None
