"""A private Postfix instance delivering into a Maildir, for the benchmark.

Everything lives under the work dir: config_directory (main.cf, master.cf),
queue_directory, data_directory, the log file and the Maildir root.  It
listens on 127.0.0.1:<port> only, accepts mail for the test domain as a
virtual mailbox domain (user@bench.test -> <mail>/bench.test/user/new/, owned
by "nobody") and refuses to send anything out.  The system instance (if any)
is not touched.  Postfix's own tuning is left at its defaults except where the
benchmark needs otherwise (no per-client connection limit, no chroot, one
listening address).  Needs root: Postfix drops to its mail_owner itself.

The part every private instance shares (directories, the common main.cf and
master.cf, ``postfix -c DIR start/stop``) is tests/postfixkit.py, which the
relay tests use too; tests/ is appended to sys.path for it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from prerequisites import find_tool
from servers import _STARTED, BENCH_DIR, REPO_ROOT, TEST_DOMAIN, BenchServer, ServerStartError, TlsFiles

if str(REPO_ROOT / "tests") not in sys.path:
    sys.path.append(str(REPO_ROOT / "tests"))

from postfixkit import PostfixError, PrivatePostfix  # noqa: E402

#: main.cf lines of the benchmark's peer, besides the common ones and the Maildir delivery
BENCH_SETTINGS = """\
smtpd_recipient_restrictions = permit_mynetworks, reject_unauth_destination
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
message_size_limit = 70000000
"""


class PostfixMaildir(BenchServer):
    """Postfix (smtpd -> queue -> virtual) delivering into a Maildir under the work dir.

    With `tls`, smtpd offers STARTTLS with that certificate (security level "may").
    """

    name = "postfix"
    start_timeout = 30.0

    def __init__(self, work_dir: Path, tls: TlsFiles | None = None) -> None:
        super().__init__(work_dir)
        self.tls = tls
        self.instance = PrivatePostfix(work_dir, self.port, find_tool("postfix") or "postfix")
        self.log_path = self.instance.log_path

    def prepare(self) -> None:
        if os.geteuid() != 0:
            raise ServerStartError("the Postfix peer needs root (Postfix switches to its mail_owner itself)")
        self.instance.stop()  # a previous run that was killed may have left this instance running
        super().prepare()
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
        settings = BENCH_SETTINGS + self.instance.virtual_maildir((TEST_DOMAIN,), self.maildir_base,
                                                                  f"{TEST_DOMAIN}/user/")
        services = ["local", "virtual"]
        if self.tls is not None:
            settings += self.instance.starttls(self.tls.certificate, self.tls.key)
            services.append("tlsmgr")
        self.instance.configure(hostname="postfix.bench.localhost", mydomain="bench.localhost",
                                settings=settings, services=services)

    def start(self) -> None:
        _STARTED.append(self)
        try:
            self.prepare()
        except (OSError, KeyError) as exc:
            raise ServerStartError(f"postfix: could not prepare {self.work_dir}: {exc}") from exc
        try:
            self.instance.start()
        except PostfixError as exc:
            raise ServerStartError(str(exc)) from None
        self.wait_until_ready()

    @property
    def root_pid(self) -> int:
        assert self.instance.master_pid is not None, "postfix is not running"
        return self.instance.master_pid

    def stop(self) -> None:
        if self in _STARTED:
            _STARTED.remove(self)
        self.instance.stop()
