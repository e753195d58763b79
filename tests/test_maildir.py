"""Maildir delivery, and the mailbox naming rules the local backends share."""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from zope.interface.verify import verifyObject

from pymta.config.errors import OptionError
from pymta.delivery.mailbox import local_delivery_headers
from pymta.mailbox_names import safe_mailbox_name
from pymta.delivery import maildir as maildir_module
from pymta.delivery.maildir import MaildirBackend
from pymta.delivery.result import DEFERRED, DELIVERED, FAILED
from pymta.envelope import Envelope, Recipient
from pymta.interfaces import IDeliveryBackend
from pymta.spool.message import SpooledMessage
from relaykit import LocalContext, local_backend, spooled
from schedulerkit import SyncThreadPool

PREPEND = "Received: from client.example.net\r\n\tby mx.example.org with ESMTP id X; now\r\n"
BODY = b"From: a@example.net\r\nSubject: hi\r\n\r\nline\r\n.dot\r\nFrom the start\r\n"
NAME = re.compile(r"^(\d+)\.M(\d+)P(\d+)Q(\d+)\.mx\.example\.org,S=(\d+)$")


def make_message(tmp_path: Path, body: bytes = BODY, sender: str = "sender@example.net") -> SpooledMessage:
    return spooled(tmp_path, body=body, sender=sender, prepend=(PREPEND,), queue_id="1K0TJEHGTP5CKM06",
                   name="spooled.msg")


def rcpt(address: str) -> Recipient:
    return Recipient(address, address, "local")


def backend(tmp_path: Path, **options) -> MaildirBackend:
    (tmp_path / "mail").mkdir(exist_ok=True)
    return local_backend(MaildirBackend, tmp_path, **options)


def files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def new_files(maildir: Path) -> list[Path]:
    return sorted((maildir / "new").iterdir())


# -- safe names ---------------------------------------------------------------------

@pytest.mark.parametrize("local, expected", [
    ("alice", "alice"), ("Alice.Smith", "alice.smith"), ("ÜNÏCODE", "ünïcode"),
    ("a-b_c=d", "a-b_c=d"), ("ü" * 32, "ü" * 32), ("a" * 64, "a" * 64), ("x.", "x."),
])
def test_safe_mailbox_names(local, expected):
    assert safe_mailbox_name(local) == expected


@pytest.mark.parametrize("local", [
    "", "a/b", "a\\b", "a\x00b", "a\nb", "a\x7fb", "a\x85b", ".hidden", ".", "..", "a..b",
    "../x", "a" * 65, "ü" * 33,
])
def test_unsafe_mailbox_names_are_refused(local):
    with pytest.raises(ValueError):
        safe_mailbox_name(local)


def test_local_delivery_headers():
    envelope = Envelope("Q", "bounce+x@example.net", [], 0.0)
    recipient = Recipient("alice@example.org", "alias@example.org", "local")
    assert local_delivery_headers(envelope, recipient) == (
        b"Return-Path: <bounce+x@example.net>\r\nDelivered-To: alice@example.org\r\n")
    null = Envelope("Q", "", [], 0.0)
    assert local_delivery_headers(null, recipient).startswith(b"Return-Path: <>\r\n")


# -- options -------------------------------------------------------------------------

def test_provides_the_backend_interface(tmp_path):
    assert verifyObject(IDeliveryBackend, backend(tmp_path))


@pytest.mark.parametrize("options, key", [
    ({}, "base"),
    ({"base": ""}, "base"),
    ({"base": 7}, "base"),
    ({"base": "mail", "folders": "yes"}, "folders"),
    ({"base": "mail", "layout": "{user}"}, "layout"),
    ({"base": "mail", "layout": "/abs/{local}"}, "layout"),
    ({"base": "mail", "layout": "../{local}"}, "layout"),
    ({"base": "mail", "layout": "{local!r}"}, "layout"),
    ({"base": "mail", "recipient_delimiter": "/"}, "recipient_delimiter"),
    ({"base": "mail", "lock_timeout": 3}, "lock_timeout"),          # an mbox option
    ({"base": "mail", "colour": "blue"}, "colour"),
])
def test_bad_options_name_the_key(tmp_path, options, key):
    with pytest.raises(OptionError) as caught:
        MaildirBackend(options, LocalContext(tmp_path))
    assert caught.value.key == key


def test_base_is_relative_to_the_config_directory(tmp_path):
    assert backend(tmp_path).base == str(tmp_path / "mail")


# -- delivery ------------------------------------------------------------------------------

def test_delivers_into_new_with_maildir_name_and_exact_content(tmp_path):
    maildir_backend = backend(tmp_path)
    message = make_message(tmp_path)
    [result] = maildir_backend.deliver_sync(message, [rcpt("Alice@Example.org")])
    maildir = tmp_path / "mail" / "example.org" / "alice"
    assert result.status == DELIVERED, result
    assert result.relay == f"maildir:{maildir}"
    [path] = new_files(maildir)
    match = NAME.match(path.name)
    assert match, path.name
    assert int(match.group(3)) == os.getpid()
    content = path.read_bytes()
    assert int(match.group(5)) == len(content)
    assert content == (b"Return-Path: <sender@example.net>\r\nDelivered-To: Alice@Example.org\r\n"
                       + PREPEND.encode() + BODY)
    assert path.name in result.text
    for sub in ("cur", "new", "tmp"):
        assert stat.S_IMODE(os.stat(maildir / sub).st_mode) == 0o700
    assert list((maildir / "tmp").iterdir()) == []
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_each_delivery_gets_its_own_file(tmp_path):
    maildir_backend = backend(tmp_path)
    message = make_message(tmp_path)
    results = maildir_backend.deliver_sync(message, [rcpt("a@example.org")] * 3)
    assert [r.status for r in results] == [DELIVERED] * 3
    names = [p.name for p in new_files(tmp_path / "mail" / "example.org" / "a")]
    assert len(set(names)) == 3


def test_large_body_is_copied_exactly(tmp_path):
    body = b"Subject: big\r\n\r\n" + os.urandom(3 * 1024 * 1024 + 17)
    [result] = backend(tmp_path).deliver_sync(make_message(tmp_path, body), [rcpt("a@example.org")])
    assert result.status == DELIVERED
    [path] = new_files(tmp_path / "mail" / "example.org" / "a")
    assert path.read_bytes().endswith(PREPEND.encode() + body)


def test_extension_delivers_into_a_maildir_plus_plus_folder(tmp_path):
    [result] = backend(tmp_path).deliver_sync(make_message(tmp_path), [rcpt("bob+Lists.Python@example.org")])
    user = tmp_path / "mail" / "example.org" / "bob"
    folder = user / ".Lists.Python"
    assert result.status == DELIVERED, result
    assert result.relay == f"maildir:{folder}"
    assert (folder / "maildirfolder").is_file()
    for sub in ("cur", "new", "tmp"):
        assert (user / sub).is_dir() and (folder / sub).is_dir()
    assert len(new_files(folder)) == 1
    assert new_files(user) == []


def test_folders_off_ignores_the_extension(tmp_path):
    [result] = backend(tmp_path, folders=False).deliver_sync(make_message(tmp_path),
                                                             [rcpt("bob+lists@example.org")])
    assert result.status == DELIVERED
    assert len(new_files(tmp_path / "mail" / "example.org" / "bob")) == 1
    assert files_under(tmp_path / "mail" / "example.org" / "bob") == {
        "cur", "new", "tmp", f"new/{new_files(tmp_path / 'mail' / 'example.org' / 'bob')[0].name}"}


def test_empty_delimiter_keeps_the_whole_local_part(tmp_path):
    [result] = backend(tmp_path, recipient_delimiter="").deliver_sync(
        make_message(tmp_path), [rcpt("bob+lists@example.org")])
    assert result.status == DELIVERED
    assert len(new_files(tmp_path / "mail" / "example.org" / "bob+lists")) == 1


def test_custom_layout(tmp_path):
    [result] = backend(tmp_path, layout="{domain}/users/{local}/Maildir").deliver_sync(
        make_message(tmp_path), [rcpt("carol@example.org")])
    assert result.status == DELIVERED
    assert len(new_files(tmp_path / "mail" / "example.org" / "users" / "carol" / "Maildir")) == 1


def test_an_internationalized_domain_is_one_directory_in_either_form(tmp_path):
    """SMTPUTF8 clients write U-labels, ASCII ones A-labels: one domain, one mailbox."""
    deliver = backend(tmp_path, layout="{domain}/{local}").deliver_sync
    for address in ("jörg@Bücher.example", "jörg@xn--bcher-kva.example"):
        [result] = deliver(make_message(tmp_path), [rcpt(address)])
        assert result.status == DELIVERED
    assert os.listdir(tmp_path / "mail") == ["xn--bcher-kva.example"]
    assert len(new_files(tmp_path / "mail" / "xn--bcher-kva.example" / "jörg")) == 2


@pytest.mark.parametrize("address", [
    "../x@example.org", ".hidden@example.org", "a/b@example.org", "a\x00b@example.org",
    "x@../../etc", "x@.", "bob+../../x@example.org", "bob+.hidden@example.org", "bob+a/b@example.org",
    "bob+x.@example.org",
])
def test_unsafe_names_fail_without_writing_anything(tmp_path, address):
    maildir_backend = backend(tmp_path)
    message = make_message(tmp_path)
    before = files_under(tmp_path)
    [result] = maildir_backend.deliver_sync(message, [rcpt(address)])
    assert result.status == FAILED, result
    assert (result.code, result.enhanced) == (550, "5.1.3")
    assert files_under(tmp_path) == before


def test_a_symlink_out_of_base_is_refused(tmp_path):
    maildir_backend = backend(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    (tmp_path / "mail" / "example.org").mkdir()
    (tmp_path / "mail" / "example.org" / "evil").symlink_to(outside)
    [result] = maildir_backend.deliver_sync(make_message(tmp_path), [rcpt("evil@example.org")])
    assert result.status == FAILED
    assert "outside" in result.text
    assert list(outside.iterdir()) == []


def test_missing_base_is_created(tmp_path):
    maildir_backend = MaildirBackend({"base": "var/mail"}, LocalContext(tmp_path))
    [result] = maildir_backend.deliver_sync(make_message(tmp_path), [rcpt("a@example.org")])
    assert result.status == DELIVERED
    assert stat.S_IMODE(os.stat(tmp_path / "var" / "mail").st_mode) == 0o700
    assert len(new_files(tmp_path / "var" / "mail" / "example.org" / "a")) == 1


def test_uncreatable_base_is_a_temporary_failure(tmp_path):
    (tmp_path / "file").write_text("")
    maildir_backend = MaildirBackend({"base": "file/mail"}, LocalContext(tmp_path))
    [result] = maildir_backend.deliver_sync(make_message(tmp_path), [rcpt("a@example.org")])
    assert result.status == DEFERRED
    assert str(tmp_path / "file" / "mail") in result.text


@pytest.mark.parametrize("code, enhanced, words", [
    (errno.ENOSPC, "4.3.1", "full"), (errno.EDQUOT, "4.2.2", "quota"), (errno.EIO, "4.3.0", "error"),
])
def test_disk_errors_defer_and_leave_no_file(tmp_path, monkeypatch, code, enhanced, words):
    maildir_backend = backend(tmp_path)
    message = make_message(tmp_path)
    maildir_backend.deliver_sync(message, [rcpt("a@example.org")])   # maildir exists now
    maildir = tmp_path / "mail" / "example.org" / "a"
    before = files_under(maildir)
    real_fsync = os.fsync

    def failing_fsync(fd):
        if os.path.isfile(f"/proc/self/fd/{fd}"):
            raise OSError(code, os.strerror(code))
        real_fsync(fd)
    monkeypatch.setattr(os, "fsync", failing_fsync)
    [result] = maildir_backend.deliver_sync(message, [rcpt("a@example.org")])
    assert result.status == DEFERRED
    assert result.enhanced == enhanced
    assert words in result.text.lower()
    assert files_under(maildir) == before


def test_permission_problem_defers_and_names_the_path(tmp_path, monkeypatch):
    maildir_backend = backend(tmp_path)
    real_open = os.open

    def refusing_open(path, flags, mode=0o777, **kw):
        if "/example.org/a/tmp/" in str(path):          # the maildir's tmp/ file
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, mode, **kw)
    monkeypatch.setattr(os, "open", refusing_open)
    [result] = maildir_backend.deliver_sync(make_message(tmp_path), [rcpt("a@example.org")])
    assert result.status == DEFERRED
    assert "Permission denied" in result.text
    assert str(tmp_path / "mail" / "example.org" / "a" / "tmp") in result.text


# -- batches ---------------------------------------------------------------------------------

def test_a_batch_fsyncs_each_new_directory_once(tmp_path, monkeypatch):
    maildir_backend = backend(tmp_path)
    maildir_backend.deliver_sync(make_message(tmp_path), [rcpt("a@example.org"), rcpt("b@example.org")])
    synced = []
    real = maildir_module.fsync_directory
    monkeypatch.setattr(maildir_module, "fsync_directory", lambda path: (synced.append(path), real(path)))
    first, second = make_message(tmp_path), make_message(tmp_path)
    results = maildir_backend.deliver_all([
        (first, [rcpt("a@example.org"), rcpt("b@example.org"), rcpt("a+Work@example.org")]),
        (second, [rcpt("a@example.org"), rcpt("../x@example.org")]),
    ])
    assert [[r.status for r in job] for job in results] == [[DELIVERED] * 3, [DELIVERED, FAILED]]
    mail = tmp_path / "mail" / "example.org"
    # a/new twice, b/new and the folder once each: one fsync per directory
    # (creating the folder also syncs the directories it was made in)
    synced = [path for path in synced if path.endswith("/new")]
    assert sorted(synced) == sorted(str(p / "new") for p in (mail / "a", mail / "b", mail / "a" / ".Work"))
    assert len(new_files(mail / "a")) == 3 and len(new_files(mail / "a" / ".Work")) == 1


def test_a_directory_that_cannot_be_synced_defers_its_deliveries_and_keeps_no_file(tmp_path, monkeypatch):
    maildir_backend = backend(tmp_path)
    maildir_backend.deliver_sync(make_message(tmp_path), [rcpt("a@example.org"), rcpt("b@example.org")])
    mail = tmp_path / "mail" / "example.org"
    before = {who: new_files(mail / who) for who in ("a", "b")}
    real = maildir_module.fsync_directory

    def failing(path):
        if path == str(mail / "a" / "new"):
            raise OSError(errno.EIO, os.strerror(errno.EIO), path)
        real(path)
    monkeypatch.setattr(maildir_module, "fsync_directory", failing)
    results = maildir_backend.deliver_all([(make_message(tmp_path), [rcpt("a@example.org")]),
                                           (make_message(tmp_path), [rcpt("b@example.org"),
                                                                     rcpt("a@example.org")])])
    assert [[r.status for r in job] for job in results] == [[DEFERRED], [DELIVERED, DEFERRED]]
    assert new_files(mail / "a") == before["a"]             # not durable: not left behind either
    assert len(new_files(mail / "b")) == len(before["b"]) + 1
    assert list((mail / "a" / "tmp").iterdir()) == []


# -- through the reactor's thread pool ---------------------------------------------------

class CountingThreadPool(SyncThreadPool):
    def __init__(self):
        self.calls = 0

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.calls += 1
        super().callInThreadWithCallback(on_result, f, *args, **kwargs)


class FakeReactor(Clock):
    def __init__(self):
        super().__init__()
        self.pool = CountingThreadPool()

    def getThreadPool(self):
        return self.pool

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def test_deliver_runs_in_the_thread_pool(tmp_path):
    reactor = FakeReactor()
    (tmp_path / "mail").mkdir()
    maildir_backend = local_backend(MaildirBackend, tmp_path, reactor)
    results = []
    maildir_backend.deliver(make_message(tmp_path), [rcpt("a@example.org"), rcpt("../b@example.org")]
                            ).addCallback(results.append)
    assert reactor.pool.calls == 1
    assert [r.status for r in results[0]] == [DELIVERED, FAILED]


# -- stale files in tmp/ ------------------------------------------------------------------

#: the sweep tests' wall clock runs this far ahead: a file just written is
#: that old by its ctime (which utime cannot set), and by its mtime what _aged says
CLOCK_AHEAD = 100 * 3600


def _aged(path: Path, hours: float) -> Path:
    """A file in tmp/ ``hours`` old for a backend whose ``_wall`` is CLOCK_AHEAD ahead."""
    path.write_bytes(b"half a message")
    when = path.stat().st_mtime + CLOCK_AHEAD - hours * 3600
    os.utime(path, (when, when))
    return path


def test_tmp_files_older_than_36_hours_are_removed_when_delivering(tmp_path):
    from twisted.logger import capturedLogs
    maildir_backend = backend(tmp_path)
    now = [1000.0]
    maildir_backend._clock = lambda: now[0]
    maildir_backend._wall = lambda: time.time() + CLOCK_AHEAD
    message = make_message(tmp_path)
    maildir = tmp_path / "mail" / "example.org" / "alice"
    folder = maildir / ".Lists"
    for tmp in (maildir / "tmp", folder / "tmp"):
        tmp.mkdir(parents=True)
    (folder / "maildirfolder").touch()
    stale = _aged(maildir / "tmp" / "1.M1P1Q1.crashed", 37)
    young = _aged(maildir / "tmp" / "2.M1P1Q1.writing", 35)
    in_folder = _aged(folder / "tmp" / "3.M1P1Q1.crashed", 40)
    os.mkdir(maildir / "tmp" / "a-directory")        # not a file: left alone
    os.utime(maildir / "tmp" / "a-directory", (0, 0))
    with capturedLogs() as events:
        [result] = maildir_backend.deliver_sync(message, [rcpt("alice@example.org")])
    assert result.status == DELIVERED
    assert not stale.exists() and young.exists() and in_folder.exists()   # the folder not delivered to
    assert sorted(p.name for p in (maildir / "tmp").iterdir()) == ["2.M1P1Q1.writing", "a-directory"]
    assert len(new_files(maildir)) == 1
    assert [e["log_format"] for e in events if "tmp" in str(e.get("tmp", ""))] == [
        "maildir: removed {count} file(s) older than {hours} hours from {tmp}"]
    assert events[-1]["count"] == 1 and events[-1]["hours"] == 36
    # the folder is swept when delivered to
    maildir_backend.deliver_sync(message, [rcpt("alice+Lists@example.org")])
    assert not in_folder.exists()
    # at most once an hour per Maildir
    stale = _aged(maildir / "tmp" / "4.M1P1Q1.crashed", 37)
    now[0] += 3599
    maildir_backend.deliver_sync(message, [rcpt("alice@example.org")])
    assert stale.exists()
    now[0] += 1
    maildir_backend.deliver_sync(message, [rcpt("alice@example.org")])
    assert not stale.exists() and young.exists()


def test_a_tmp_that_cannot_be_scanned_does_not_stop_delivery(tmp_path, monkeypatch):
    maildir_backend = backend(tmp_path)
    real_scandir = os.scandir

    def scandir(path):
        if str(path).endswith("/tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_scandir(path)
    monkeypatch.setattr(maildir_module.os, "scandir", scandir)
    from twisted.logger import capturedLogs, formatEvent
    with capturedLogs() as events:
        [result] = maildir_backend.deliver_sync(make_message(tmp_path), [rcpt("bob@example.org")])
    assert result.status == DELIVERED
    tmp = tmp_path / "mail" / "example.org" / "bob" / "tmp"
    assert [formatEvent(e) for e in events] == [f"maildir: cannot clean up {tmp}: Permission denied"]


def test_a_tmp_file_whose_mtime_was_set_back_is_kept_until_its_ctime_is_old(tmp_path):
    """A writer may date its file before renaming it (Dovecot's saves set the received date with
    utime(2)): an old mtime does not make a file in tmp/ stale; its ctime, which utime cannot
    set back, must be old too, as Dovecot's own tmp/ cleanup checks."""
    maildir_backend = backend(tmp_path)
    tmp = tmp_path / "mail" / "example.org" / "alice" / "tmp"
    tmp.mkdir(parents=True)
    being_saved = _aged(tmp / "1.M1P1Q1.dated", 24 * 365)
    [result] = maildir_backend.deliver_sync(make_message(tmp_path), [rcpt("alice@example.org")])
    assert result.status == DELIVERED
    assert being_saved.exists()


def test_remembering_the_swept_maildirs_costs_no_more_per_maildir_when_there_are_many(
        tmp_path, monkeypatch):
    """The sweep runs in the delivery batch: with tens of thousands of Maildirs swept within
    the hour, remembering one more must not go over every one remembered (quadratic: 25,000
    Maildirs took 25 s of CPU in the delivery batches)."""
    import contextlib
    monkeypatch.setattr(maildir_module.os, "scandir", lambda path: contextlib.nullcontext(iter(())))
    maildir_backend = backend(tmp_path)
    now = [0.0]
    maildir_backend._clock = lambda: now[0]
    count = 30_000
    started = time.process_time()
    for n in range(count):
        now[0] += 0.1                        # all within the hour
        maildir_backend._sweep_tmp(f"/maildirs/{n}/tmp")
    cpu = time.process_time() - started
    assert cpu < 5, f"{cpu:.1f} s of CPU to remember {count} sweeps"
    # past the interval, the Maildirs swept are forgotten as new ones come
    now[0] += 3601
    maildir_backend._sweep_tmp("/maildirs/new/tmp")
    assert list(maildir_backend._swept) == ["/maildirs/new/tmp"]
