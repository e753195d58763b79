"""What the bench scripts (bench/run.py, bench/tls.py, bench/relay.py) share around their measurements.

The command line (comma-separated server lists, quick/full defaults), the
run itself (SIGTERM as Ctrl-C, the work dir's lock, starting and warming up
the servers, an interrupted run still reported), the figures over rounds
(median, spread, a busy machine) and the end (the results file, the NOT
MEASURED and PROBLEMS sections, the exit status).  Standard library only, and
nothing from the other bench modules but servers.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

from servers import BENCH_DIR, BenchServer, ServerStartError


class Report(Protocol):
    machine: dict[str, str]
    not_started: dict[str, str]
    problems: list[str]


class Rated(Protocol):
    @property
    def rate(self) -> float: ...


R = TypeVar("R", bound=Rated)


# -- the command line ----------------------------------------------------------------

def names_of(text: str) -> list[str]:
    """The names of a comma-separated list such as ``--servers pymta,postfix``."""
    return [n.strip() for n in text.split(",") if n.strip()]


def apply_defaults(args: argparse.Namespace, defaults: dict[str, tuple[Any, Any]]) -> argparse.Namespace:
    """Options left unset take their (quick, full) default; at least one round; the work dir absolute."""
    for name, (quick_value, full_value) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick_value if args.quick else full_value)
    args.rounds = max(1, args.rounds)
    args.work_dir = args.work_dir.resolve()
    return args


# -- the run ---------------------------------------------------------------------------

def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_sigterm() -> None:
    """SIGTERM stops the run as Ctrl-C does: servers stopped, what was measured reported."""
    signal.signal(signal.SIGTERM, _stop_on_sigterm)


def lock_work_dir(work_dir: Path, program: str) -> IO[str] | None:
    """The work dir, created and locked for this run (keep the file open); None, said on
    stderr, when another bench run holds it."""
    work_dir.mkdir(parents=True, exist_ok=True)
    lock = open(work_dir / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"{program}: another bench run is using {work_dir}; wait for it or pass --work-dir",
              file=sys.stderr)
        return None
    return lock


def start_servers(names: Sequence[str], make: Callable[[str], BenchServer],
                  warm_up: Callable[[BenchServer], None], report: Report, running: list[BenchServer],
                  label: Callable[[str], str] = str) -> None:
    """Start and warm up each server; those that come up are appended to ``running``, the
    others are stopped and listed in ``report.not_started`` under ``label(name)``."""
    for name in names:
        server = make(name)
        try:
            server.start()
            warm_up(server)
        except ServerStartError as exc:
            server.stop()
            report.not_started[label(name)] = str(exc)
            print(f"   {name}: NOT MEASURED: {exc}", flush=True)
            continue
        running.append(server)
        print(f"   {name}: 127.0.0.1:{server.port}, pid {server.root_pid}, warmed up", flush=True)


@contextmanager
def measuring(report: Report, program: str) -> Iterator[float]:
    """The measurements, timed from the ``monotonic()`` it yields; Ctrl-C or SIGTERM ends them
    with a problem "run interrupted".  The load average and the seconds go into ``report.machine``."""
    t0 = time.monotonic()
    try:
        yield t0
    except KeyboardInterrupt:
        print(f"\n{program}: interrupted; servers stopped", file=sys.stderr)
        report.problems.append("run interrupted")
    report.machine["load_at_end"] = load_average()
    report.machine["seconds"] = f"{time.monotonic() - t0:.0f}"


def append_problem(problem: str, more: str) -> str:
    return f"{problem}; {more}" if problem else more


# -- figures -----------------------------------------------------------------------------

def load_average() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def busy_load(load: str, cpus: int) -> str:
    """The one-minute load average when it is above half the CPUs, else ""."""
    try:
        one_minute = float(load.split()[0])
    except (ValueError, IndexError):
        return ""
    return f"{one_minute:.1f}" if one_minute > 0.5 * cpus else ""


def median_round(rounds: Sequence[R]) -> R:
    """The round with the median rate (the lower of the two middle ones for an even count)."""
    ordered = sorted(rounds, key=lambda r: r.rate)
    return ordered[(len(ordered) - 1) // 2]


def spread(rounds: Sequence[Rated]) -> str:
    """Half the min-max range of the rounds' rates, as a share of their median ("" for one round)."""
    rates = [r.rate for r in rounds]
    if len(rates) < 2 or not statistics.median(rates):
        return ""
    return f"±{50 * (max(rates) - min(rates)) / statistics.median(rates):.0f}%"


# -- the end -----------------------------------------------------------------------------

def utc_stamp(when: dt.datetime) -> str:
    """``when`` (in UTC) as results files name it: 20261203T190000Z."""
    return when.strftime("%Y%m%dT%H%M%SZ")


def results_path(prefix: str, started: dt.datetime) -> Path:
    """``bench/results/<prefix><UTC time>.json``."""
    return BENCH_DIR / "results" / f"{prefix}{utc_stamp(started)}.json"


def print_unmeasured_and_problems(report: Report) -> None:
    if report.not_started:
        print("\nNOT MEASURED")
        for name, why in report.not_started.items():
            print(f"  {name}: {why}")
    if report.problems:
        print("\nPROBLEMS")
        for problem in report.problems:
            print(f"  {problem}")


def exit_status(report: Report) -> int:
    """1 when a server lost, refused or duplicated something or could not be measured, else 0."""
    return 1 if report.problems or report.not_started else 0
