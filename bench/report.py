"""Benchmark results: what was measured, the printed tables and ratios, the JSON file."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from footprint import IdleResult, LargeMessageResult
from harness import busy_load, load_average, median_round, print_unmeasured_and_problems
from harness import spread as rate_spread
from prerequisites import find_tool
from servers import REPO_ROOT
from smtp_load import LoadCase

HEADLINE_BODY = 1024
HEADLINE_SESSIONS = 20
IDLE_TARGET_BYTES = 4096
LARGE_MESSAGE_TARGET_KIB = 10 * 1024


def is_headline(case: LoadCase) -> bool:
    return case.body_bytes == HEADLINE_BODY and case.sessions == HEADLINE_SESSIONS


@dataclass
class CaseResult:
    """One smtp-source run against one server."""

    server: str
    case: str
    body_bytes: int
    sessions: int
    persistent: bool
    asked: int
    accepted: int
    seconds: float
    #: Maildir files that appeared (None: smtp-sink, checked with its own counter instead)
    landed: int | None
    seconds_to_landed: float
    cpu_ms_per_message: float
    problem: str = ""

    @property
    def rate(self) -> float:
        return self.accepted / self.seconds if self.seconds > 0 else 0.0

    @property
    def landed_rate(self) -> float:
        return self.accepted / self.seconds_to_landed if self.seconds_to_landed > 0 else 0.0


@dataclass
class CaseSummary:
    """All rounds of one case on one server; figures are those of the median round by msg/s."""

    rounds: list[CaseResult]

    @property
    def median(self) -> CaseResult:
        return median_round(self.rounds)

    @property
    def problem(self) -> str:
        return "; ".join(r.problem for r in self.rounds if r.problem)

    @property
    def spread(self) -> str:
        """Half the min-max range of msg/s over the rounds, as a share of the median ("" for one round)."""
        return rate_spread(self.rounds)


@dataclass
class RunReport:
    started: str
    quick: bool
    machine: dict[str, str]
    cases: list[CaseResult] = field(default_factory=list)
    idle: list[IdleResult] = field(default_factory=list)
    large: list[LargeMessageResult] = field(default_factory=list)
    #: server name -> why it could not be measured
    not_started: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self, server: str, body: int, sessions: int, persistent: bool) -> CaseSummary | None:
        rounds = [r for r in self.cases
                  if (r.server, r.body_bytes, r.sessions, r.persistent) == (server, body, sessions, persistent)]
        return CaseSummary(rounds) if rounds else None


def machine_info() -> dict[str, str]:
    info = {"cpus": str(os.cpu_count()), "kernel": platform.release(),
            "python": platform.python_version(), "load_at_start": load_average()}
    try:
        info["postfix"] = subprocess.run([find_tool("postconf") or "postconf", "-dh", "mail_version"],
                                         capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version
        info["aiosmtpd"] = version("aiosmtpd")
        info["twisted"] = version("twisted")
    except Exception:  # noqa: BLE001 - informational only
        pass
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            info["commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# -- printing ------------------------------------------------------------------------

def format_progress(r: CaseResult) -> str:
    landed = "" if r.landed is None else f", landed {r.landed} after {r.seconds_to_landed:.1f}s"
    status = f"  PROBLEM: {r.problem}" if r.problem else ""
    return (f"   {r.case:<18} {r.server:<13} {r.accepted:>5} msgs in {r.seconds:6.2f}s = {r.rate:6.0f}/s, "
            f"CPU {r.cpu_ms_per_message:6.3f} ms/msg{landed}{status}")


def print_tables(report: RunReport, names: list[str], cases: list[LoadCase]) -> None:
    measured = [n for n in names if any(r.server == n for r in report.cases)]
    if not measured:
        return
    width = 16
    tables = (
        ("accepted msg/s (server CPU ms per message)",
         lambda s: f"{s.median.rate:.0f} ({s.median.cpu_ms_per_message:.2f})"),
        ("end-to-end msg/s: start of the run to the last message in the Maildir",
         lambda s: "-" if s.median.landed is None else f"{s.median.landed_rate:.0f}"),
    )
    for title, cell in tables:
        print(f"\n{title}")
        print(f"{'case':<19}" + "".join(f"{n:>{width}}" for n in measured))
        for case in cases:
            row = f"{case.label:<19}"
            for n in measured:
                s = report.summary(n, case.body_bytes, case.sessions, case.persistent)
                text = "n/a" if s is None else cell(s) + ("!" if s.problem else "")
                row += f"{text:>{width}}"
            print(row)
    notes = []
    if any(len(s.rounds) > 1 for n in measured for c in cases
           if (s := report.summary(n, c.body_bytes, c.sessions, c.persistent))):
        notes.append("1 KiB / 20-session rows: median of several rounds")
    if any(r.problem for r in report.cases):
        notes.append("! = see PROBLEMS below")
    if notes:
        print("(" + "; ".join(notes) + ")")


def headline_lines(report: RunReport) -> list[str]:
    lines: list[str] = []
    b, s = HEADLINE_BODY, HEADLINE_SESSIONS
    aio = report.summary("aiosmtpd", b, s, False)
    postfix = report.summary("postfix", b, s, False)
    sink = report.summary("smtp-sink", b, s, True)

    def ratio(mine: CaseSummary | None, peer: CaseSummary | None) -> str:
        if mine is None or peer is None or peer.median.rate == 0:
            return "n/a"
        spread = f" [rounds: {mine.spread} / {peer.spread}]" if mine.spread and peer.spread else ""
        flag = " (UNRELIABLE: see PROBLEMS)" if mine.problem or peer.problem else ""
        return f"{mine.median.rate / peer.median.rate:.2f}x{spread}{flag}"

    def cpu_ratio(mine: CaseSummary | None, peer: CaseSummary | None) -> str:
        if mine is None or peer is None or peer.median.cpu_ms_per_message == 0:
            return "n/a"
        return f"{mine.median.cpu_ms_per_message / peer.median.cpu_ms_per_message:.2f}x"

    for name in ("pymta", "pymta/syncfs"):
        per_conn = report.summary(name, b, s, False)
        persistent = report.summary(name, b, s, True)
        if per_conn is None and persistent is None:
            continue
        lines.append(f"{name + ' / aiosmtpd':<24} 1 msg/conn:  msg/s {ratio(per_conn, aio)}, "
                     f"CPU/msg {cpu_ratio(per_conn, aio)}")
        lines.append(f"{name + ' / postfix':<24} 1 msg/conn:  msg/s {ratio(per_conn, postfix)}, "
                     f"CPU/msg {cpu_ratio(per_conn, postfix)}")
        if persistent is not None and sink is not None and sink.median.rate:
            flag = " (UNRELIABLE: see PROBLEMS)" if persistent.problem or sink.problem else ""
            lines.append(f"{name + ' % of smtp-sink':<24} -d sessions: msg/s "
                         f"{100 * persistent.median.rate / sink.median.rate:.1f}%{flag}")
    metered, plain = report.summary("pymta/metrics", b, s, False), report.summary("pymta", b, s, False)
    if metered is not None and plain is not None:
        lines.append(f"{'pymta/metrics / pymta':<24} 1 msg/conn:  msg/s {ratio(metered, plain)}, "
                     f"CPU/msg {cpu_ratio(metered, plain)}")
    return lines


def print_summary(report: RunReport, names: list[str], cases: list[LoadCase]) -> None:
    print("\n" + "=" * 78)
    print(f"pymta bench, {report.started}, {'quick' if report.quick else 'full'} run, "
          f"{report.machine.get('cpus')} CPUs, load average {report.machine.get('load_at_start')} at start, "
          f"{report.machine.get('load_at_end', '?')} at end")
    print_tables(report, names, cases)
    lines = headline_lines(report)
    if lines:
        print(f"\nHEADLINE ({HEADLINE_BODY // 1024} KiB bodies, {HEADLINE_SESSIONS} sessions)")
        for line in lines:
            print("  " + line)
    if report.idle:
        print(f"\nIDLE CONNECTIONS (target for pymta: < {IDLE_TARGET_BYTES // 1024} KiB each)")
        for idle in report.idle:
            verdict = ""
            if idle.server.startswith("pymta"):
                ok = idle.bytes_per_connection < IDLE_TARGET_BYTES and not idle.failed
                verdict = "  OK" if ok else "  MISSED"
            print(f"  {idle.server:<13} {idle.opened}/{idle.wanted} open: "
                  f"{idle.bytes_per_connection / 1024:.2f} KiB/connection "
                  f"(RSS {idle.rss_before_kib / 1024:.1f} -> {idle.rss_after_kib / 1024:.1f} MiB){verdict}")
    if report.large:
        print(f"\nLARGE MESSAGE (target for pymta: < {LARGE_MESSAGE_TARGET_KIB // 1024} MiB RSS growth)")
        for large in report.large:
            verdict = ""
            if large.server.startswith("pymta"):
                ok = large.growth_kib < LARGE_MESSAGE_TARGET_KIB and large.landed
                verdict = "  OK" if ok else "  MISSED"
            mib_s = large.body_bytes / 2**20 / max(large.seconds_to_250, 1e-9)
            print(f"  {large.server:<13} {large.body_bytes / 2**20:.0f} MiB: +{large.growth_kib / 1024:.1f} MiB "
                  f"peak RSS, {mib_s:.0f} MiB/s to 250{verdict}"
                  + (f" ({large.problem})" if large.problem else ""))
    print_unmeasured_and_problems(report)
    busy = busy_load(report.machine.get("load_at_start", ""), os.cpu_count() or 1)
    if busy:
        print(f"\nNOTE: the machine was busy when the run started (load average {busy} on "
              f"{report.machine.get('cpus')} CPUs): absolute figures are low and noisy; "
              "the ratios, measured interleaved, suffer less.")


def write_json(report: RunReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = asdict(report)
    for row, r in zip(data["cases"], report.cases):
        row["rate"] = round(r.rate, 1)
        row["landed_rate"] = round(r.landed_rate, 1)
    for row, i in zip(data["idle"], report.idle):
        row["bytes_per_connection"] = round(i.bytes_per_connection, 1)
    for row, m in zip(data["large"], report.large):
        row["growth_kib"] = m.growth_kib
    data["headline_case"] = f"{HEADLINE_BODY // 1024} KiB bodies, {HEADLINE_SESSIONS} sessions"
    data["headline"] = headline_lines(report)
    path.write_text(json.dumps(data, indent=2) + "\n")
