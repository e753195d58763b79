"""A private Postfix instance on a loopback port: the real receiving MTA of the relay tests.

Everything lives in its own directory (main.cf, master.cf, queue, data,
the log file and the Maildirs; see tests/postfixkit.py for the part the
bench shares): the system's Postfix, if any, is neither used nor touched.
It listens on 127.0.0.1:<port> only, accepts mail for the given domains as
virtual mailbox domains (every recipient into the one Maildir
``<mail>/all/``, files owned by ``nobody``, each with its ``Delivered-To:``
field), offers STARTTLS when given a certificate (with
``smtpd_tls_received_header``, so the Received: field says whether TLS was
used), and refuses the addresses listed in ``refuse``.  Nothing is sent out:
every non-local transport is ``error:``.

Postfix needs root to start (it switches to its own users).  The
directory is created under the system temp directory and made searchable
for ``nobody``, who writes the Maildirs.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from conftest import IN_CI, require_program
from postfixkit import PrivatePostfix


def require_postfix() -> None:
    """Postfix installed and root (it starts as root): else fail under CI, skip elsewhere."""
    if not os.path.exists("/usr/sbin/postfix"):
        require_program("postfix")
    if os.geteuid() != 0:
        message = "the Postfix test instance needs root (Postfix switches to its own users)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


class PostfixInstance(PrivatePostfix):
    """The relay tests' Postfix (see the module docstring), in a fresh temp directory."""

    def __init__(self, port: int, domains: tuple[str, ...], hostname: str = "mx.postfix.test",
                 cert: tuple[Path, Path] | None = None, refuse: tuple[str, ...] = ()) -> None:
        work = Path(tempfile.mkdtemp(prefix="pymta-postfix-"))
        os.chmod(work, 0o755)
        super().__init__(work, port)
        self.domains = domains
        self.hostname = hostname
        self.cert = cert
        self.refuse = refuse
        self.mail = work / "mail"

    def start(self) -> "PostfixInstance":
        self.mail.mkdir()
        refuse = ", ".join(f"{{{a}=REJECT no such user here}}" for a in self.refuse) or "x@invalid=DUNNO"
        settings = (f"smtpd_recipient_restrictions = check_recipient_access inline:{{ {refuse} }}, "
                    "permit_mynetworks, reject_unauth_destination\n"
                    + self.virtual_maildir(self.domains, self.mail, "all/"))
        if self.cert:
            settings += (self.starttls(*self.cert)
                         + "smtpd_tls_received_header = yes\nsmtpd_tls_loglevel = 1\n")
        self.configure(hostname=self.hostname, mydomain="postfix.test", settings=settings,
                       services=("tlsmgr", "virtual"))
        super().start()
        self.wait_for_banner()
        return self

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.work, ignore_errors=True)

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
            time.sleep(0.1)
