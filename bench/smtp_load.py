"""Drive a server with Postfix's smtp-source and report what it achieved."""

from __future__ import annotations

import re
import subprocess
import tempfile
import time
from dataclasses import dataclass

from prerequisites import find_tool
from servers import TEST_RECIPIENT, TEST_SENDER


@dataclass(frozen=True)
class LoadCase:
    """One load shape: body size, parallel sessions, and one message per connection or not."""

    body_bytes: int
    sessions: int
    persistent: bool
    messages: int

    @property
    def label(self) -> str:
        size = f"{self.body_bytes // 1024}KiB"
        mode = "-d" if self.persistent else "1/conn"
        return f"{size} s={self.sessions} {mode}"


@dataclass(frozen=True)
class LoadResult:
    #: messages smtp-source saw accepted (its -c counter)
    accepted: int
    #: wall-clock seconds smtp-source ran
    seconds: float
    #: smtp-source exited 0 and sent everything asked for
    complete: bool
    #: why not complete (exit status, stopped at the time cap, its last error line)
    problem: str = ""
    #: stopped at the time cap (then `accepted` is what it managed by then)
    capped: bool = False

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0


def smtp_source_command(port: int, case: LoadCase) -> list[str]:
    exe = find_tool("smtp-source") or "smtp-source"
    cmd = [exe, "-4", "-c", "-M", "client.bench.localhost",
           "-l", str(case.body_bytes), "-m", str(case.messages), "-s", str(case.sessions),
           "-f", TEST_SENDER, "-t", TEST_RECIPIENT]
    if case.persistent:
        cmd.append("-d")
    cmd.append(f"127.0.0.1:{port}")
    return cmd


def run_smtp_source(port: int, case: LoadCase, time_cap: float) -> LoadResult:
    """Run smtp-source to completion or until time_cap seconds, whichever comes first."""
    cmd = smtp_source_command(port, case)
    with tempfile.TemporaryFile() as out:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        capped = False
        try:
            proc.wait(timeout=time_cap)
        except subprocess.TimeoutExpired:
            capped = True
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        seconds = time.perf_counter() - started
        out.seek(0)
        text = out.read().decode("ascii", "replace")
    # The -c counter is a run of numbers separated by CR; error lines follow on their own lines.
    counter_values = [int(x) for x in re.findall(r"(?:^|\r)(\d+)(?=\r|\n|$)", text)]
    accepted = counter_values[-1] if counter_values else 0
    problem = ""
    if capped:
        problem = f"stopped at the {time_cap:.0f}s cap"
    elif proc.returncode != 0:
        errors = [line for line in text.replace("\r", "\n").splitlines() if line and not line.isdigit()]
        problem = f"smtp-source exit {proc.returncode}: {errors[-1] if errors else 'no message'}"
    elif accepted != case.messages:
        problem = f"smtp-source counted {accepted} of {case.messages}"
    return LoadResult(accepted=accepted, seconds=seconds, complete=not problem, problem=problem,
                      capped=capped)
