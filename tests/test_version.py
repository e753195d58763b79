"""``pymta --version`` and ``twistd pymta --version``."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pymta
from conftest import TWISTD

PYMTA = str(Path(sys.executable).parent / "pymta")


def test_the_package_version_is_the_installed_one():
    assert pymta.__version__ == importlib.metadata.version("pymta")


def test_pymta_version_prints_the_version_and_exits_0(tmp_path):
    r = subprocess.run([PYMTA, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"pymta {pymta.__version__}\n", "")


def test_twistd_pymta_version_prints_the_version_and_starts_nothing(tmp_path):
    r = subprocess.run([TWISTD, "pymta", "--version"], cwd=tmp_path, capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stdout.strip()) == (0, f"pymta {pymta.__version__}")
    assert list(tmp_path.iterdir()) == []          # no pid file, no log, no spool
