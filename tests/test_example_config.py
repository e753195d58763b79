"""``pymta example-config``, from the source tree and from a built wheel.

The wheel test builds pymta's wheel from a copy of the tracked files with
``pip wheel --no-deps --no-build-isolation`` (offline: the venv's setuptools),
checks that it carries the examples as ``pymta/etc/``, unpacks it as an
installer would and runs ``example-config`` from there, in a directory
without any ``etc/`` beside it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import ROOT

PYMTA = str(Path(sys.executable).parent / "pymta")
EXAMPLE = (ROOT / "etc" / "pymta.toml").read_bytes()


def test_example_config_prints_the_commented_example():
    result = subprocess.run([PYMTA, "example-config"], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == EXAMPLE


def test_other_example_files_and_a_wrong_name():
    result = subprocess.run([PYMTA, "example-config", "plugins/vip_tag.py"], capture_output=True,
                            timeout=60)
    assert result.stdout == (ROOT / "etc" / "plugins" / "vip_tag.py").read_bytes()
    result = subprocess.run([PYMTA, "example-config", "../pyproject.toml"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr == "pymta example-config: ../pyproject.toml: not a file of the examples\n"


def _tracked_tree(destination: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    for name in filter(None, files):
        source = ROOT / os.fsdecode(name)
        if not source.is_file():
            continue                                  # removed in the work tree
        target = destination / os.fsdecode(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())


def test_the_wheel_carries_the_examples(tmp_path):
    source = tmp_path / "source"
    _tracked_tree(source)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(tmp_path / "dist"), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    [wheel] = (tmp_path / "dist").glob("pymta-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert "pymta/etc/pymta.toml" in names
        assert "pymta/etc/plugins/vip_tag.py" in names
        assert archive.read("pymta/etc/pymta.toml") == EXAMPLE
        installed = tmp_path / "site"
        archive.extractall(installed)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = ("import sys, pymta; from pymta.admin import main; "
           "print(pymta.__file__, file=sys.stderr); sys.exit(main(['example-config']))")
    result = subprocess.run([sys.executable, "-c", run], cwd=elsewhere, capture_output=True,
                            timeout=60, env=os.environ | {"PYTHONPATH": str(installed)})
    assert result.returncode == 0, result.stderr
    assert result.stderr.decode().strip() == str(installed / "pymta" / "__init__.py")
    assert result.stdout == EXAMPLE
