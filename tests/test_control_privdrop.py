"""The control socket and users: it belongs to the user the server runs as, and a user who
may not use it is told so in one line.  (Needs root: see tests/test_privdrop.py.)"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

from test_privdrop import USER, DroppingServer, _python_path, python, user, workdir  # noqa: F401

PYMTA = str(Path(sys.executable).parent / "pymta")
ADMIN_CODE = "import sys; from pymta.admin import main; sys.exit(main())"


def test_socket_belongs_to_the_run_as_user(user, python, workdir):
    server = DroppingServer(python, workdir, workdir / "spool", workdir / "mail")
    server.start(USER)
    try:
        socket_path = server.spool / "control.sock"
        st = socket_path.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        assert (st.st_uid, st.st_gid) == (user.pw_uid, user.pw_gid)
        done = subprocess.run([PYMTA, "queue", "list", "--config", str(server.config)],
                              capture_output=True, text=True, timeout=60)
        assert (done.returncode, done.stdout, done.stderr) == (0, "-- queue empty\n", "")
    finally:
        server.stop()
    assert not socket_path.exists()
    assert "Traceback" not in server.log.read_text()


def test_a_user_who_may_not_use_the_socket_is_told_whose_it_is(user, python, workdir):
    server = DroppingServer(python, workdir, workdir / "spool", workdir / "mail")
    server.start(None)                     # as root: the spool (0700) and the socket are root's
    try:
        socket_path = server.spool / "control.sock"
        done = subprocess.run([python, "-c", ADMIN_CODE, "queue", "hold", "--all",
                               "--socket", str(socket_path)],
                              user=user.pw_uid, group=user.pw_gid, extra_groups=[], cwd="/",
                              env=dict(os.environ, PYTHONPATH=_python_path()),
                              capture_output=True, text=True, timeout=60)
    finally:
        server.stop()
    assert done.returncode == 1, done
    assert done.stderr == (f"pymta queue: permission denied on the control socket {socket_path} "
                           f"(its directory {server.spool} is owned by root, mode 0700): run "
                           "pymta queue as that user or root\n")
