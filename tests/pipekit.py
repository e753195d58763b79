"""Helpers for the pipe delivery tests: an unprivileged user and commands that record their runs."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import IN_CI

#: the unprivileged user the test commands run as (also used by test_privdrop)
USER = "pymtatest"


def need_root() -> None:
    if os.geteuid() != 0:
        message = "running a command as another user needs root"
        if IN_CI:
            pytest.fail(message + " (the suite runs as root under CI)")
        pytest.skip(message)


def unprivileged_user() -> pwd.struct_passwd:
    """The ``pymtatest`` user, created (a system user, no home) if missing."""
    need_root()
    try:
        return pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                        "--shell", "/usr/sbin/nologin", USER], check=True)
        return pwd.getpwnam(USER)


class CommandBox:
    """A directory the unprivileged user can reach, with recording scripts in it.

    A script made by :meth:`script` writes, for each run, ``N.uid`` (its uid),
    ``N.argv`` (one argument a line), ``N.stdin`` and ``N.env`` into ``out/``,
    prints ``output`` and exits with ``status``.
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="pymta-pipe-"))
        os.chmod(self.dir, 0o755)
        self.out = self.dir / "out"
        self.out.mkdir()
        os.chmod(self.out, 0o777)

    def script(self, name: str, status: int = 0, output: str = "", extra: str = "",
               read_stdin: bool = True) -> str:
        path = self.dir / name
        stdin = 'cat > "$d/$n.stdin"' if read_stdin else ": no reading"
        path.write_text(textwrap.dedent(f"""\
            #!/bin/sh
            d={self.out}
            n=$$
            id -u > "$d/$n.uid"
            for a in "$@"; do printf '%s\\n' "$a"; done > "$d/$n.argv"
            env > "$d/$n.env"
            {stdin}
            {extra}
            printf '%s' '{output}'
            exit {status}
            """))
        os.chmod(path, 0o755)
        return str(path)

    def runs(self) -> list[dict[str, str | bytes]]:
        """What each run recorded: uid, argv (list), stdin (bytes), env (dict)."""
        runs = []
        for uid_file in sorted(self.out.glob("*.uid")):
            stem = uid_file.with_suffix("")
            stdin = stem.with_suffix(".stdin")
            runs.append({
                "uid": int(uid_file.read_text()),
                "argv": stem.with_suffix(".argv").read_text().splitlines(),
                "stdin": stdin.read_bytes() if stdin.exists() else b"",
                "env": dict(line.split("=", 1) for line in
                            stem.with_suffix(".env").read_text().splitlines() if "=" in line),
            })
        return runs

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def box():
    commands = CommandBox()
    yield commands
    commands.remove()
