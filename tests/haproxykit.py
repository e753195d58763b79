"""A private HAProxy in TCP mode in front of pymta, started by the tests.

Its own configuration in a directory of the test's, frontends on loopback
ports, run in the foreground (``haproxy -f CFG -db``); the system's HAProxy
service, if any, is neither used nor touched.  Each frontend forwards to one
backend server line, e.g. ``127.0.0.1:2525 send-proxy`` (PROXY v1) or
``send-proxy-v2``.  HAProxy connects to the backend from 127.0.0.1.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from conftest import free_port, require_program


class PrivateHAProxy:
    def __init__(self, workdir: Path, backends: dict[str, str]) -> None:
        """``backends``: {frontend name: the server line's address and options}."""
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        sbin = "/usr/sbin/haproxy"        # not on a non-root PATH
        self.program = shutil.which("haproxy") or (sbin if os.access(sbin, os.X_OK) else None) \
            or require_program("haproxy")
        self.ports = {name: free_port() for name in backends}
        self.config = self.dir / "haproxy.cfg"
        self.log = self.dir / "haproxy.log"
        sections = []
        for name, server in backends.items():
            sections.append(f"frontend fe_{name}\n"
                            f"    bind 127.0.0.1:{self.ports[name]}\n"
                            f"    default_backend be_{name}\n\n"
                            f"backend be_{name}\n"
                            f"    server s_{name} {server}\n")
        self.config.write_text(
            "global\n"
            "    maxconn 100\n\n"
            "defaults\n"
            "    mode tcp\n"
            "    timeout connect 5s\n"
            "    timeout client 30s\n"
            "    timeout server 30s\n\n" + "\n".join(sections))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "PrivateHAProxy":
        check = subprocess.run([self.program, "-c", "-f", str(self.config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"haproxy rejects its configuration:\n{check.stdout}{check.stderr}")
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen([self.program, "-f", str(self.config), "-db"],
                                     cwd=self.dir, stdout=logf, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        pending = set(self.ports.values())
        while pending and time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"haproxy exited with {self.proc.returncode}:\n{self.log.read_text()}")
            for port in list(pending):
                try:
                    # a bare connect that sends nothing: the backend sees HAProxy's
                    # header and then a close, so only probe the listening socket
                    with socket.socket() as s:
                        s.settimeout(1)
                        s.connect(("127.0.0.1", port))
                    pending.discard(port)
                except OSError:
                    time.sleep(0.05)
        if pending:
            self.stop()
            raise RuntimeError(f"haproxy did not start:\n{self.log.read_text()}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "PrivateHAProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
