"""CPU time and resident memory of a server's process tree, read from /proc.

CPU: for every live process of the tree, utime + stime + cutime + cstime.  A
child that exited and was reaped by a member of the tree has its time folded
into that member's cutime/cstime by the kernel, so a before/after difference
counts the work of short-lived children (Postfix's smtpd, cleanup, virtual...)
as well as of the long-lived ones.  Threads are part of their process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcessStat:
    pid: int
    ppid: int
    #: utime + stime + cutime + cstime, in clock ticks
    cpu_ticks: int


def read_process_stat(pid: int) -> ProcessStat | None:
    """The stat line of one process, or None when it has gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2:].split()
    # fields[0] is field 3 (state); field N is fields[N - 3]
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ProcessStat(pid=pid, ppid=ppid, cpu_ticks=utime + stime + cutime + cstime)


def _all_parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = read_process_stat(int(name))
        if stat is not None:
            parents[stat.pid] = stat.ppid
    return parents


def process_tree(root_pid: int) -> list[int]:
    """root_pid and all its live descendants."""
    children: dict[int, list[int]] = {}
    for pid, ppid in _all_parents().items():
        children.setdefault(ppid, []).append(pid)
    tree: list[int] = []
    pending = [root_pid]
    while pending:
        pid = pending.pop()
        if pid in tree:
            continue
        tree.append(pid)
        pending.extend(children.get(pid, ()))
    return tree


def tree_cpu_seconds(root_pid: int) -> float:
    """CPU seconds used so far by root_pid's tree (live members plus what they reaped)."""
    ticks = 0
    for pid in process_tree(root_pid):
        stat = read_process_stat(pid)
        if stat is not None:
            ticks += stat.cpu_ticks
    return ticks / CLOCK_TICKS_PER_SECOND


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    return 0


def tree_rss_kib(root_pid: int) -> int:
    """Sum of VmRSS over root_pid's tree, in KiB."""
    return sum(_status_kib(pid, "VmRSS") for pid in process_tree(root_pid))


def tree_peak_rss_kib(root_pid: int) -> int:
    """Sum of VmHWM (peak RSS since start or since reset_peak_rss) over the tree, in KiB."""
    return sum(_status_kib(pid, "VmHWM") for pid in process_tree(root_pid))


def reset_peak_rss(root_pid: int) -> bool:
    """Reset VmHWM of every process of the tree (Linux >= 4.0, needs ptrace rights); True if done."""
    done = True
    for pid in process_tree(root_pid):
        try:
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            done = False
    return done
