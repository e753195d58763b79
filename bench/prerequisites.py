"""Install what the benchmark needs on a fresh machine.

- Debian's ``postfix`` package, for ``smtp-source``/``smtp-sink`` and for the
  Postfix peer.  It is installed with debconf preseeded to "No configuration",
  so the system instance gets no main.cf and is never started; a temporary
  policy-rc.d (only if the machine has none) stops the maintainer scripts from
  starting any service during the install.
- ``aiosmtpd`` from PyPI into the Python that runs the bench (the project venv).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys

POSTFIX_TOOLS = ("smtp-source", "smtp-sink", "postfix", "postconf")
SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")
POLICY_RC_D = "/usr/sbin/policy-rc.d"


class PrerequisiteError(RuntimeError):
    """A tool the bench needs is missing and could not be installed."""


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in SBIN_DIRS:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _run(cmd: list[str], env: dict[str, str] | None = None, input_text: str | None = None) -> None:
    print(f"bench: running {' '.join(cmd)}", flush=True)
    result = subprocess.run(cmd, env=env, input=input_text, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = "\n".join(result.stdout.splitlines()[-20:])
        raise PrerequisiteError(f"command failed ({result.returncode}): {' '.join(cmd)}\n{tail}")


def ensure_postfix() -> None:
    """Install Debian's postfix package (unconfigured, not started) if its tools are missing."""
    if all(find_tool(tool) for tool in POSTFIX_TOOLS):
        return
    if os.geteuid() != 0:
        raise PrerequisiteError(
            "the bench needs smtp-source, smtp-sink and postfix; install them as root with:\n"
            "  echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections\n"
            "  DEBIAN_FRONTEND=noninteractive apt-get install -y postfix")
    if not shutil.which("apt-get"):
        raise PrerequisiteError("smtp-source/postfix are missing and this machine has no apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["debconf-set-selections"], env=env, input_text=(
        "postfix postfix/main_mailer_type select No configuration\n"
        "postfix postfix/mailname string bench.localhost\n"))
    created_policy = False
    if not os.path.exists(POLICY_RC_D):
        with open(POLICY_RC_D, "w") as f:
            f.write("#!/bin/sh\n# written by pymta bench/prerequisites.py for one install\nexit 101\n")
        os.chmod(POLICY_RC_D, 0o755)
        created_policy = True
    try:
        _run(["apt-get", "update", "-q"], env=env)
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", "postfix"], env=env)
    finally:
        if created_policy:
            os.unlink(POLICY_RC_D)
    missing = [tool for tool in POSTFIX_TOOLS if not find_tool(tool)]
    if missing:
        raise PrerequisiteError(f"postfix was installed but these tools are still missing: {missing}")


def ensure_aiosmtpd() -> None:
    """pip-install aiosmtpd into the running Python if it is not importable."""
    if importlib.util.find_spec("aiosmtpd") is not None:
        return
    _run([sys.executable, "-m", "pip", "install", "-q", "aiosmtpd"])
    importlib.invalidate_caches()
    if importlib.util.find_spec("aiosmtpd") is None:
        raise PrerequisiteError(f"aiosmtpd was installed but {sys.executable} cannot import it")


def ensure_all(need_postfix: bool = True, need_aiosmtpd: bool = True) -> None:
    if need_postfix:
        ensure_postfix()
    if need_aiosmtpd:
        ensure_aiosmtpd()
