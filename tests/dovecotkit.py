"""A private Dovecot started by the tests: LMTP on a loopback port and a UNIX socket, and
the auth-client socket, with users and passwords in a passwd-file.

Everything lives in a temporary directory of its own (outside pytest's
``tmp_path``, which the unprivileged mail processes could not enter): the
configuration (a complete file, nothing included from the system's
``/etc/dovecot``), ``base_dir`` with the sockets, ``state_dir``, the log and
the Maildir store.  Dovecot runs in the foreground (``dovecot -F -c CONFIG``);
the system's Dovecot service, if any, is neither used nor touched.  As root,
mail is stored as ``nobody`` (Dovecot never writes mail as root); as another
user, every Dovecot process runs as that user.

Each user has a password (PLAIN scheme in the file: test data), optional
passdb extra fields (``nologin reason=...``) and, optionally, a storage
quota in KiB; plaintext mechanisms are allowed only on sessions the client
says are ``secured`` (Dovecot's default); an over-quota delivery is refused with
``452 4.2.2`` (``quota_full_tempfail = yes``) unless ``tempfail_quota`` is
False (then ``552 5.2.2``).
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from conftest import free_port, require_program

SBIN = "/usr/sbin/dovecot"


def dovecot_program() -> str:
    """The dovecot binary (in /usr/sbin, which is not on every PATH): fails under CI if missing."""
    return shutil.which("dovecot") or (SBIN if os.access(SBIN, os.X_OK) else None) \
        or require_program("dovecot")


class PrivateDovecot:
    def __init__(self, users: dict[str, str], quota_kib: dict[str, int] | None = None,
                 tempfail_quota: bool = True, mechanisms: str = "plain login",
                 extra_fields: dict[str, str] | None = None) -> None:
        self.program = dovecot_program()
        self.dir = Path(tempfile.mkdtemp(prefix="pymta-dovecot-"))
        os.chmod(self.dir, 0o755)
        self.base_dir = self.dir / "run"
        self.mail_dir = self.dir / "mail"
        self.mail_dir.mkdir()
        self.config = self.dir / "dovecot.conf"
        self.log = self.dir / "dovecot.log"
        self.users_file = self.dir / "users"
        self.lmtp_port = free_port()
        self.lmtp_socket = self.base_dir / "lmtp"
        self.auth_socket = self.base_dir / "auth-client"
        root = os.geteuid() == 0
        me = pwd.getpwuid(os.geteuid())
        mail_user = pwd.getpwnam("nobody") if root else me
        os.chown(self.mail_dir, mail_user.pw_uid, mail_user.pw_gid)
        quota_kib = quota_kib or {}
        extra_fields = extra_fields or {}
        lines = []
        for user, password in users.items():
            extra = " ".join(filter(None, [
                f"userdb_quota_rule=*:storage={quota_kib[user]}K" if user in quota_kib else "",
                extra_fields.get(user, "")]))
            lines.append(f"{user}:{{PLAIN}}{password}:{mail_user.pw_uid}:{mail_user.pw_gid}::"
                         f"{self.mail_dir}/{user}::{extra}")
        self.users_file.write_text("\n".join(lines) + "\n")
        own_users = "" if root else (f"default_internal_user = {me.pw_name}\n"
                                     f"default_login_user = {me.pw_name}\n"
                                     f"default_internal_group = {grp.getgrgid(os.getegid()).gr_name}\n")
        self.config.write_text(f"""\
base_dir = {self.base_dir}
state_dir = {self.dir}/state
instance_name = pymta-test-{self.lmtp_port}
log_path = {self.log}
protocols = lmtp
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = yes
auth_mechanisms = {mechanisms}
auth_verbose = yes
auth_failure_delay = 0
first_valid_uid = {min(mail_user.pw_uid, 1)}
mail_location = maildir:~/Maildir
mail_plugins = quota
lmtp_save_to_detail_mailbox = no
quota_full_tempfail = {'yes' if tempfail_quota else 'no'}
{own_users}
passdb {{
  driver = passwd-file
  args = {self.users_file}
}}
userdb {{
  driver = passwd-file
  args = {self.users_file}
}}
plugin {{
  quota = maildir:User quota
}}
service lmtp {{
  inet_listener lmtp {{
    address = 127.0.0.1
    port = {self.lmtp_port}
  }}
  unix_listener lmtp {{
    mode = 0666
  }}
}}
service auth {{
  unix_listener auth-client {{
    mode = 0666
  }}
}}
""")
        self.proc: subprocess.Popen | None = None

    # -- running --------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> "PrivateDovecot":
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen([self.program, "-F", "-c", str(self.config)],
                                     stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self.proc.returncode}:\n{self.log_text()}")
            if self._answers():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"dovecot did not start:\n{self.log_text()}")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.lmtp_port), timeout=1) as s:
                s.settimeout(5)
                if not s.recv(100).startswith(b"220"):
                    return False
                s.sendall(b"QUIT\r\n")
        except OSError:
            return False
        return self.auth_socket.exists() and self.lmtp_socket.exists()

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Dovecot and wait until all its processes are gone, as a service manager
        stops it (its process group: the auth process would otherwise serve the
        connections it has until they close)."""
        if self.proc is not None and self.proc.poll() is None:
            children = _children(self.proc.pid)
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            deadline = time.monotonic() + timeout
            while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
                time.sleep(0.05)
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def doveadm(self, *args: str) -> str:
        """``doveadm -c CONFIG ARGS``: its output (fails the test when it fails)."""
        program = shutil.which("doveadm") or "/usr/bin/doveadm"
        done = subprocess.run([program, "-c", str(self.config), *args], capture_output=True,
                              text=True, timeout=30)
        if done.returncode != 0:
            raise AssertionError(f"doveadm {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def set_quota(self, user: str, kib: int, timeout: float = 15.0) -> None:
        """Change the user's storage quota and wait until Dovecot's userdb gives the new one."""
        text = self.users_file.read_text()
        lines = [re.sub(r"storage=\d+K", f"storage={kib}K", line) if line.startswith(user + ":")
                 else line for line in text.splitlines()]
        self.users_file.write_text("\n".join(lines) + "\n")
        deadline = time.monotonic() + timeout
        while f"storage={kib}K" not in self.doveadm("user", user):
            if time.monotonic() > deadline:
                raise AssertionError(f"dovecot did not pick up the new quota of {user}")
            time.sleep(0.1)

    # -- reading mail back ------------------------------------------------------------
    def messages(self, user: str) -> list[bytes]:
        """The messages in the user's INBOX (Maildir new/ and cur/), oldest first."""
        maildir = self.mail_dir / user / "Maildir"
        files = [p for sub in ("new", "cur") if (maildir / sub).is_dir()
                 for p in (maildir / sub).iterdir()]
        return [p.read_bytes() for p in sorted(files, key=lambda p: p.stat().st_mtime_ns)]

    def wait_for_messages(self, user: str, count: int = 1, timeout: float = 15.0) -> list[bytes]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.messages(user)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        raise AssertionError(f"{user}: {len(self.messages(user))} of {count} messages arrived; "
                             f"dovecot log:\n{self.log_text()}")


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fp:
            return [int(p) for p in fp.read().split()]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fp:
            return fp.read().split(") ", 1)[1][:1] != "Z"      # a zombie is gone for our purpose
    except (OSError, IndexError):
        return False
