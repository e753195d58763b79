"""A private Postfix instance on a loopback port: the real receiving MTA of the relay tests.

Everything lives in its own directory (main.cf, master.cf, queue, data,
the log file and the Maildirs): the system's Postfix, if any, is neither
used nor touched.  It listens on 127.0.0.1:<port> only, accepts mail for
the given domains as virtual mailbox domains (every recipient into the
one Maildir ``<mail>/all/``, files owned by ``nobody``, each with its
``Delivered-To:`` field), offers
STARTTLS when given a certificate (with ``smtpd_tls_received_header``, so
the Received: field says whether TLS was used), and refuses the addresses
listed in ``refuse``.  Nothing is sent out: every non-local transport is
``error:``.

Postfix needs root to start (it switches to its own users).  The
directory is created under the system temp directory and made searchable
for ``nobody``, who writes the Maildirs.
"""

from __future__ import annotations

import os
import pty
import pwd
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import IN_CI, require_program

MASTER_CF = """\
# written by tests/postfix.py: no chroot, one loopback listener
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
# written by tests/postfix.py
compatibility_level = 3.6
config_directory = {config}
queue_directory = {queue}
data_directory = {data}
maillog_file_prefixes = {work}
maillog_file = {work}/maillog
myhostname = {hostname}
mydomain = postfix.test
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost =
default_transport = error:the test instance sends no mail out
relay_transport = error:the test instance sends no mail out
alias_maps =
alias_database =
biff = no
smtpd_recipient_restrictions = check_recipient_access inline:{{ {refuse} }}, permit_mynetworks, reject_unauth_destination
virtual_mailbox_domains = {domains}
virtual_mailbox_base = {mail}
virtual_mailbox_maps = static:all/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_mailbox_limit = 0
{tls}
"""

TLS_CF = """\
smtpd_tls_security_level = may
smtpd_tls_cert_file = {cert}
smtpd_tls_key_file = {key}
smtpd_tls_received_header = yes
smtpd_tls_loglevel = 1
"""


def run_postfix(config_dir: Path, *args: str, timeout: float = 60.0) -> tuple[int, str]:
    """``postfix -c DIR args`` with a terminal: without one (or syslog) it reports errors nowhere."""
    exe = shutil.which("postfix") or "/usr/sbin/postfix"
    master_fd, slave_fd = pty.openpty()
    try:
        proc = subprocess.Popen([exe, "-c", str(config_dir), *args], stdin=subprocess.DEVNULL,
                                stdout=slave_fd, stderr=slave_fd)
    finally:
        os.close(slave_fd)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master_fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master_fd, 4096)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break
    finally:
        os.close(master_fd)
    return proc.wait(timeout=10), output.decode("utf-8", "replace").replace("\r\n", "\n").strip()


def require_postfix() -> None:
    """Postfix installed and root (it starts as root): else fail under CI, skip elsewhere."""
    if not os.path.exists("/usr/sbin/postfix"):
        require_program("postfix")
    if os.geteuid() != 0:
        message = "the Postfix test instance needs root (Postfix switches to its own users)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


class PostfixInstance:
    def __init__(self, port: int, domains: tuple[str, ...], hostname: str = "mx.postfix.test",
                 cert: tuple[Path, Path] | None = None, refuse: tuple[str, ...] = ()) -> None:
        self.port = port
        self.domains = domains
        self.hostname = hostname
        self.cert = cert
        self.refuse = refuse
        self.work = Path(tempfile.mkdtemp(prefix="pymta-postfix-"))
        os.chmod(self.work, 0o755)
        self.config_dir = self.work / "etc"
        self.queue_dir = self.work / "queue"
        self.data_dir = self.work / "data"
        self.mail = self.work / "mail"
        self.log = self.work / "maillog"
        self._master_pid: int | None = None

    def start(self) -> "PostfixInstance":
        for directory in (self.config_dir, self.queue_dir, self.data_dir, self.mail):
            directory.mkdir()
        nobody = pwd.getpwnam("nobody")
        owner = pwd.getpwnam("postfix")
        os.chown(self.data_dir, owner.pw_uid, owner.pw_gid)
        os.chown(self.mail, nobody.pw_uid, nobody.pw_gid)
        refuse = ", ".join(f"{{{a}=REJECT no such user here}}" for a in self.refuse) or "x@invalid=DUNNO"
        tls = TLS_CF.format(cert=self.cert[0], key=self.cert[1]) if self.cert else ""
        (self.config_dir / "master.cf").write_text(MASTER_CF.format(listen=f"127.0.0.1:{self.port}"))
        (self.config_dir / "main.cf").write_text(MAIN_CF.format(
            config=self.config_dir, queue=self.queue_dir, data=self.data_dir, work=self.work,
            hostname=self.hostname, refuse=refuse, domains=", ".join(self.domains), mail=self.mail,
            uid=nobody.pw_uid, gid=nobody.pw_gid, tls=tls))
        for step in ("check", "start"):
            code, output = run_postfix(self.config_dir, step)
            if code != 0:
                self.stop()
                raise RuntimeError(f"postfix {step} failed for {self.config_dir}:\n{output}\n"
                                   f"{self.log_text()}")
        self._master_pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        self._wait_for_banner()
        return self

    def _wait_for_banner(self, timeout: float = 20.0) -> None:
        import socket
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(100).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"postfix did not answer on port {self.port}:\n{self.log_text()}")

    def stop(self) -> None:
        if (self.config_dir / "main.cf").exists():
            run_postfix(self.config_dir, "stop", timeout=30)
            deadline = time.monotonic() + 15
            while self._alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            if self._alive():
                run_postfix(self.config_dir, "abort", timeout=20)
                try:
                    os.kill(self._master_pid, signal.SIGKILL)
                except (ProcessLookupError, TypeError):
                    pass
        shutil.rmtree(self.work, ignore_errors=True)

    def _alive(self) -> bool:
        if self._master_pid is None:
            return False
        try:
            os.kill(self._master_pid, 0)
        except ProcessLookupError:
            return False
        return True

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def delivered(self, address: str, count: int = 1, timeout: float = 20.0) -> list[bytes]:
        """Wait for ``count`` messages delivered to ``address``; return their bytes."""
        new = self.mail / "all" / "new"
        marker = f"Delivered-To: {address.lower()}\n".encode()
        deadline = time.monotonic() + timeout
        while True:
            files = sorted(new.glob("*")) if new.is_dir() else []
            mine = [data for data in (f.read_bytes() for f in files) if marker in data]
            if len(mine) >= count or time.monotonic() > deadline:
                return mine
