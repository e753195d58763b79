"""README.md, "Checking a configuration and testing plugins": the snippets as written.

Each ```sh block of that section is run with bash in a directory holding a
copy of etc/ (as in a source checkout), with this venv's ``pymta`` first on
PATH.  Each ```text block must appear in what they printed, line by line and
in order: a line ``...`` stands for any lines, a line ending in ``...``
for any line starting with what precedes it, and queue ids, dates and
plugin timings may differ.  The README says the examples run in /srv/pymta:
the temp directory is written so in the output.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

HEADING = "## Checking a configuration and testing plugins\n"
_FENCE = re.compile(r"^```(sh|text)\n(.*?)^```", re.S | re.M)
_VARIABLE = [
    (re.compile(r"\b[0-9A-Z]{16}\b"), "QUEUEID"),
    (re.compile(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [-+]\d{4}"), "DATE"),
    (re.compile(r"\[\d+\.\d ms\]"), "[T ms]"),
]


def section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(HEADING)
    end = text.find("\n## ", start + len(HEADING))
    return text[start:end if end >= 0 else None]


def normalized(line: str) -> str:
    for pattern, replacement in _VARIABLE:
        line = pattern.sub(replacement, line)
    return line


def matches(expected: str, line: str) -> bool:
    expected, line = normalized(expected), normalized(line)
    if expected.endswith("...") and expected != "...":
        return line.startswith(expected[:-3])
    return line == expected


def appears_in_order(block: list[str], output: list[str]) -> str | None:
    """None if ``block`` matches a run of ``output`` as the module docstring says, else why not."""
    position = 0
    skipping = True                # the block may start anywhere
    for expected in block:
        if expected == "...":
            skipping = True
            continue
        if skipping:
            while position < len(output) and not matches(expected, output[position]):
                position += 1
        if position >= len(output) or not matches(expected, output[position]):
            return f"not found in order: {expected!r}"
        position += 1
        skipping = False
    return None


def test_readme_tool_snippets_run_as_written(tmp_path):
    shutil.copytree(ROOT / "etc", tmp_path / "etc")
    blocks = _FENCE.findall(section())
    commands = [text for kind, text in blocks if kind == "sh"]
    expected = [text for kind, text in blocks if kind == "text"]
    assert len(commands) == 3 and len(expected) == 3
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    output: list[str] = []
    for script in commands:
        result = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120)
        assert result.returncode == 0, f"{script}\n{result.stdout}"
        output += result.stdout.replace(str(tmp_path), "/srv/pymta").splitlines()
    for block in expected:
        problem = appears_in_order(block.splitlines(), output)
        assert problem is None, problem + "\n" + "\n".join(output)
    # the effective configuration the first snippet saved loads as a config again
    again = subprocess.run(["pymta", "check-config", "effective.toml"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert not (tmp_path / "var").exists()
