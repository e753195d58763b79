"""A private Postfix instance in a directory of its own: the part the tests and the bench share.

The relay tests (tests/postfix.py) and the benchmarks (bench/postfix_instance.py,
bench/relay.py) each run a Postfix of their own next to pymta.  What every such
instance has in common lives here: the directory layout under one work
directory (``etc/`` for main.cf and master.cf, ``queue/``, ``data/`` and the log
file ``maillog``), the main.cf settings that keep it private (loopback only,
its own log, no aliases, nothing sent out unless given a relayhost), a
master.cf without chroot and with one loopback listener, ``postfix -c DIR``
check/start/stop, and waiting for its SMTP banner.  What it accepts and where
it delivers is the caller's: extra main.cf settings and master.cf services.

The system's Postfix, if any, is neither used nor touched.  Postfix needs root
to start (it switches to its own users).

This module needs only the standard library (no pytest, nothing from bench/),
so that both can import it: tests/ is on sys.path under pytest, and bench/
appends it.
"""

from __future__ import annotations

import grp
import os
import pty
import pwd
import select
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

__all__ = ["PostfixError", "PrivatePostfix", "run_with_terminal"]

#: the master.cf services every instance runs (no chroot); the listener comes first
BASE_SERVICES = """\
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
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

#: master.cf services an instance asks for by name, for what it does
OPTIONAL_SERVICES = {
    # smtpd asks tlsmgr for its PRNG seed and session ticket keys
    "tlsmgr": "tlsmgr    unix  -       -       n       1000?   1       tlsmgr",
    "virtual": "virtual   unix  -       n       n       -       -       virtual",
    "local": "local     unix  -       n       n       -       -       local",
    "smtp": "smtp      unix  -       -       n       -       -       smtp",
    "relay": "relay     unix  -       -       n       -       -       smtp",
}

MAIN_CF = """\
# written by tests/postfixkit.py for a private instance
compatibility_level = 3.6
config_directory = {config}
queue_directory = {queue}
data_directory = {data}
maillog_file_prefixes = {work}
maillog_file = {log}
myhostname = {hostname}
mydomain = {mydomain}
myorigin = $myhostname
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
biff = no
{outbound}
"""

#: main.cf lines of an instance without a relayhost: every non-local transport fails
NOTHING_OUT = """\
relayhost =
default_transport = error:this private instance sends no mail out
relay_transport = error:this private instance sends no mail out"""


class PostfixError(RuntimeError):
    """The private instance could not be started or did not answer; the message says why."""


def run_with_terminal(cmd: list[str], timeout: float = 60.0) -> tuple[int, str]:
    """Run a postfix command with a pty as stdout/stderr: (exit status, output).

    Without a terminal (or a syslog socket) postfix(1) reports its errors
    nowhere we can see.  A command still running after ``timeout`` seconds is
    killed, and the output says so.
    """
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
                output += f"\n(killed after {timeout:.0f}s)".encode()
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


class PrivatePostfix:
    """One private Postfix instance under ``work``, listening on 127.0.0.1:``port``.

    Use: :meth:`configure` (creates the directories, writes main.cf and
    master.cf), :meth:`start`, :meth:`wait_for_banner`; :meth:`stop` at the
    end, also after a failed start.  ``executable``: the postfix(1) to run
    (default: the one on PATH, else /usr/sbin/postfix).
    """

    def __init__(self, work: Path, port: int, executable: str | None = None) -> None:
        self.work = work
        self.port = port
        self.executable = executable or shutil.which("postfix") or "/usr/sbin/postfix"
        self.config_dir = work / "etc"
        self.queue_dir = work / "queue"
        self.data_dir = work / "data"
        self.log_path = work / "maillog"
        #: the pid of master(8) while the instance runs
        self.master_pid: int | None = None

    # -- configuration -----------------------------------------------------------------

    def configure(self, *, hostname: str, mydomain: str, settings: str = "",
                  services: Iterable[str] = (), relayhost: str = "") -> None:
        """Create etc/, queue/ and data/ (and ``work`` if need be); write main.cf and master.cf.

        ``settings``: main.cf lines added after the common ones.  ``services``:
        names from :data:`OPTIONAL_SERVICES` added to master.cf.  Without a
        ``relayhost`` every non-local transport is ``error:``.
        """
        for directory in (self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir(parents=True)
        os.chown(self.data_dir, pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid)
        outbound = f"relayhost = {relayhost}" if relayhost else NOTHING_OUT
        main_cf = MAIN_CF.format(config=self.config_dir, queue=self.queue_dir, data=self.data_dir,
                                 work=self.work, log=self.log_path, hostname=hostname,
                                 mydomain=mydomain, outbound=outbound)
        (self.config_dir / "main.cf").write_text(main_cf + settings)
        listener = f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
        extra = "".join(OPTIONAL_SERVICES[name] + "\n" for name in services)
        (self.config_dir / "master.cf").write_text(
            "# written by tests/postfixkit.py: no chroot, one loopback listener\n"
            + listener + BASE_SERVICES + extra)

    @staticmethod
    def virtual_maildir(domains: Iterable[str], base: Path, mailbox: str) -> str:
        """main.cf lines: virtual(8) delivers every recipient in ``domains`` to ``base/mailbox``.

        ``mailbox`` ends in ``/`` for a Maildir.  The agent runs as ``nobody``:
        ``base`` is given to that user, and its parents must be searchable.
        """
        nobody = pwd.getpwnam("nobody")
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        return (f"virtual_mailbox_domains = {', '.join(domains)}\n"
                f"virtual_mailbox_base = {base}\n"
                f"virtual_mailbox_maps = static:{mailbox}\n"
                f"virtual_uid_maps = static:{nobody.pw_uid}\n"
                f"virtual_gid_maps = static:{nobody.pw_gid}\n"
                "virtual_mailbox_limit = 0\n")

    @staticmethod
    def starttls(certificate: Path | str, key: Path | str) -> str:
        """main.cf lines: smtpd offers STARTTLS with this certificate (not required)."""
        return (f"smtpd_tls_security_level = may\n"
                f"smtpd_tls_cert_file = {certificate}\n"
                f"smtpd_tls_key_file = {key}\n")

    # -- running -------------------------------------------------------------------------

    def postfix(self, *args: str, timeout: float = 60.0) -> tuple[int, str]:
        """``postfix -c <etc> args``: (exit status, output)."""
        return run_with_terminal([self.executable, "-c", str(self.config_dir), *args],
                                 timeout=timeout)

    def start(self) -> None:
        """``postfix check`` and ``postfix start``; PostfixError (after :meth:`stop`) if either fails."""
        for step in ("check", "start"):
            code, output = self.postfix(step)
            if code != 0:
                self.stop()
                raise PostfixError(f"postfix {step} failed for {self.config_dir}:\n{output}\n"
                                   f"log {self.log_path}:\n{self.log_tail()}")
        pid_file = self.queue_dir / "pid" / "master.pid"
        self.master_pid = _read_pid(pid_file)
        if self.master_pid is None:
            self.stop()
            raise PostfixError(f"postfix started but its pid file {pid_file} is unreadable")

    def wait_for_banner(self, timeout: float = 20.0) -> None:
        """Until smtpd answers with a 220 banner; PostfixError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                    if s.recv(200).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise PostfixError(f"postfix did not answer on 127.0.0.1:{self.port} within {timeout:.0f}s; "
                           f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self) -> None:
        """Stop the instance: ``postfix stop``, then ``abort`` and SIGKILL if master lingers.

        Without a known master pid (a failed start, or an instance a killed
        run left behind) the pid file's is used.  Nothing happens when the
        instance was never configured.
        """
        if not (self.config_dir / "main.cf").exists():
            return
        pid = self.master_pid or _master_in(self.queue_dir / "pid" / "master.pid")
        self.postfix("stop", timeout=30)
        deadline = time.monotonic() + 15
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            self.postfix("abort", timeout=20)
            time.sleep(1)
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.master_pid = None

    # -- its log ---------------------------------------------------------------------------

    def log_text(self) -> str:
        """The instance's whole log ("" before it wrote one)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log, for error messages."""
        return "\n".join(self.log_text().splitlines()[-lines:])


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _master_in(pid_file: Path) -> int | None:
    """The pid in a master.pid left behind, if that process is still a Postfix master."""
    pid = _read_pid(pid_file)
    if pid is None:
        return None
    if not os.path.exists("/proc/self/comm"):
        return pid  # no /proc to ask: trust the pid file
    try:
        command = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None  # gone
    return pid if command == "master" else None


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
