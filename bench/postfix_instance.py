"""A private Postfix instance delivering into a Maildir, for the benchmark.

Everything lives under the work dir: config_directory (main.cf, master.cf),
queue_directory, data_directory, the log file and the Maildir root.  It
listens on 127.0.0.1:<port> only, accepts mail for the test domain as a
virtual mailbox domain (user@bench.test -> <mail>/bench.test/user/new/, owned
by "nobody") and refuses to send anything out.  The system instance (if any)
is not touched.  Postfix's own tuning is left at its defaults except where the
benchmark needs otherwise (no per-client connection limit, no chroot, one
listening address).  Needs root: Postfix drops to its mail_owner itself.
"""

from __future__ import annotations

import os
import pwd
import grp
import pty
import select
import signal
import subprocess
import time
from pathlib import Path

from prerequisites import find_tool
from servers import _STARTED, BENCH_DIR, TEST_DOMAIN, BenchServer, ServerStartError, TlsFiles, log_tail

MASTER_CF = """\
# written by bench/postfix_instance.py: no chroot, one loopback listener
{listen} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
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
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

MAIN_CF = """\
# written by bench/postfix_instance.py for one benchmark run
compatibility_level = 3.6
config_directory = {config}
queue_directory = {queue}
data_directory = {data}
maillog_file_prefixes = {work}
maillog_file = {work}/maillog
myhostname = postfix.bench.localhost
mydomain = bench.localhost
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
relayhost =
default_transport = error:the benchmark instance sends no mail out
relay_transport = error:the benchmark instance sends no mail out
alias_maps =
alias_database =
biff = no
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
message_size_limit = {max_size}
virtual_mailbox_limit = 0
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {mail}
virtual_mailbox_maps = static:{domain}/user/
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
"""

#: added to main.cf when the instance is given a certificate: STARTTLS offered, not required
MAIN_CF_TLS = """\
smtpd_tls_security_level = may
smtpd_tls_cert_file = {certificate}
smtpd_tls_key_file = {key}
"""

#: added to master.cf with a certificate: smtpd asks tlsmgr for its PRNG seed and ticket keys
MASTER_CF_TLS = """\
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
"""


def run_with_terminal(cmd: list[str], timeout: float = 60.0) -> tuple[int, str]:
    """Run a postfix command with a pty as stdout/stderr: without a terminal (or a
    syslog socket) postfix(1) reports its errors nowhere we can see."""
    master_fd, slave_fd = pty.openpty()
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=slave_fd, stderr=slave_fd)
    finally:
        os.close(slave_fd)
    output = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                proc.kill()
                output += f"\n(bench: killed after {timeout:.0f}s)".encode()
                break
            ready, _, _ = select.select([master_fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master_fd, 4096)
                except OSError:  # EIO: every writer closed the terminal
                    chunk = b""
                if not chunk:
                    break
                output += chunk
            elif proc.poll() is not None:
                break  # a daemon it started may still hold the terminal open
    finally:
        os.close(master_fd)
    returncode = proc.wait(timeout=10)
    return returncode, output.decode("utf-8", "replace").replace("\r\n", "\n").strip()


class PostfixMaildir(BenchServer):
    """Postfix (smtpd -> queue -> virtual) delivering into a Maildir under the work dir.

    With `tls`, smtpd offers STARTTLS with that certificate (security level "may").
    """

    name = "postfix"
    start_timeout = 30.0

    def __init__(self, work_dir: Path, tls: TlsFiles | None = None) -> None:
        super().__init__(work_dir)
        self.tls = tls
        self.config_dir = work_dir / "etc"
        self.queue_dir = work_dir / "queue"
        self.data_dir = work_dir / "data"
        self.log_path = work_dir / "maillog"
        self._master_pid: int | None = None

    def postfix(self, *args: str, timeout: float = 60.0) -> tuple[int, str]:
        exe = find_tool("postfix") or "postfix"
        return run_with_terminal([exe, "-c", str(self.config_dir), *args], timeout=timeout)

    def _stop_stale_instance(self) -> None:
        """A previous run that was killed may have left this instance running."""
        pid_file = self.queue_dir / "pid" / "master.pid"
        if (self.config_dir / "main.cf").exists() and pid_file.exists():
            self.postfix("abort", timeout=20)
            try:
                pid = int(pid_file.read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
            except (ValueError, IndexError, ProcessLookupError, OSError):
                pass

    def prepare(self) -> None:
        if os.geteuid() != 0:
            raise ServerStartError("the Postfix peer needs root (Postfix switches to its mail_owner itself)")
        self._stop_stale_instance()
        super().prepare()
        for directory in (self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir()
        nobody = pwd.getpwnam("nobody")
        mail_owner = pwd.getpwnam("postfix")
        os.chown(self.data_dir, mail_owner.pw_uid, grp.getgrnam("postfix").gr_gid)
        os.chown(self.maildir_base, nobody.pw_uid, nobody.pw_gid)
        # The virtual agent runs as "nobody": it must be able to reach the Maildir root.
        for parent in [self.work_dir, *self.work_dir.parents]:
            mode = parent.stat().st_mode
            if mode & 0o001:
                continue
            if parent == BENCH_DIR or BENCH_DIR in parent.parents:
                os.chmod(parent, mode | 0o001)
            else:
                raise ServerStartError(
                    f"the Postfix peer delivers as user 'nobody', who cannot enter {parent} "
                    f"(mode {mode & 0o777:o}); use a work dir whose parents are world-searchable")
        master_cf = MASTER_CF.format(listen=f"127.0.0.1:{self.port}")
        main_cf = MAIN_CF.format(
            config=self.config_dir, queue=self.queue_dir, data=self.data_dir, work=self.work_dir,
            mail=self.maildir_base, domain=TEST_DOMAIN, uid=nobody.pw_uid, gid=nobody.pw_gid,
            max_size=70_000_000)
        if self.tls is not None:
            master_cf += MASTER_CF_TLS
            main_cf += MAIN_CF_TLS.format(certificate=self.tls.certificate, key=self.tls.key)
        (self.config_dir / "master.cf").write_text(master_cf)
        (self.config_dir / "main.cf").write_text(main_cf)

    def start(self) -> None:
        _STARTED.append(self)
        try:
            self.prepare()
        except (OSError, KeyError) as exc:
            raise ServerStartError(f"postfix: could not prepare {self.work_dir}: {exc}") from exc
        code, output = self.postfix("check")
        if code != 0:
            raise ServerStartError(f"postfix check failed for {self.config_dir}:\n{output}")
        code, output = self.postfix("start")
        if code != 0:
            self.stop()
            raise ServerStartError(f"postfix start failed for {self.config_dir}:\n{output}\n"
                                   f"log {self.log_path}:\n{log_tail(self.log_path)}")
        pid_file = self.queue_dir / "pid" / "master.pid"
        try:
            self._master_pid = int(pid_file.read_text().split()[0])
        except (OSError, ValueError, IndexError) as exc:
            self.stop()
            raise ServerStartError(f"postfix started but its pid file {pid_file} is unreadable: {exc}")
        self.wait_until_ready()

    @property
    def root_pid(self) -> int:
        assert self._master_pid is not None, "postfix is not running"
        return self._master_pid

    def _master_alive(self) -> bool:
        if self._master_pid is None:
            return False
        try:
            os.kill(self._master_pid, 0)
        except ProcessLookupError:
            return False
        return True

    def stop(self) -> None:
        if self in _STARTED:
            _STARTED.remove(self)
        if not (self.config_dir / "main.cf").exists():
            return
        if self._master_pid is None:
            self._stop_stale_instance()
            return
        self.postfix("stop", timeout=30)
        deadline = time.monotonic() + 15
        while self._master_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if self._master_alive():
            self.postfix("abort", timeout=20)
            time.sleep(1)
        if self._master_alive():
            os.kill(self._master_pid, signal.SIGKILL)
        self._master_pid = None
