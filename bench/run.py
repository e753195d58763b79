"""pymta benchmark: throughput and footprint against peers measured in the same run.

    .venv/bin/python bench/run.py            # full run (about 10-15 min on 2 cores)
    .venv/bin/python bench/run.py --quick    # smoke run (about 1 min)

All servers of the throughput part run at once (idle unless driven) and every
load case is run against each of them in turn, so a change in the machine's
background load hits all of them alike.  See bench/README.md for what each row
means.  Not part of the test suite: it prints figures and ratios; it exits 1
when a server lost or refused messages or could not be measured, 2 when the
bench could not run at all.
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from footprint import measure_idle_connections, measure_large_message, wait_for_landing  # noqa: E402
from harness import (append_problem, apply_defaults, exit_status, lock_work_dir, measuring,  # noqa: E402
                     names_of, results_path, start_servers, stop_on_sigterm)
from postfix_instance import PostfixMaildir  # noqa: E402
from prerequisites import PrerequisiteError, ensure_all, find_tool  # noqa: E402
from procstat import tree_cpu_seconds  # noqa: E402
from report import (CaseResult, RunReport, format_progress, is_headline, machine_info,  # noqa: E402
                    print_summary, write_json)
from servers import (BENCH_DIR, AiosmtpdMaildir, BenchServer, Pymta, ServerStartError,  # noqa: E402
                     SmtpSink, raise_fd_limit)
from smtp_load import LoadCase, run_smtp_source  # noqa: E402

ALL_SERVERS = ("smtp-sink", "aiosmtpd", "postfix", "pymta", "pymta/syncfs")
#: further rows, run only when named in --servers
EXTRA_SERVERS = ("pymta/metrics",)


def build_cases(quick: bool, scale: float) -> list[LoadCase]:
    def n(count: int) -> int:
        return max(10, int(count * scale))

    if quick:
        return [LoadCase(1024, 20, False, n(300)), LoadCase(1024, 20, True, n(300)),
                LoadCase(102400, 20, False, n(100))]
    cases: list[LoadCase] = []
    for body, counts in ((1024, {1: 500, 20: 2000, 100: 2000}),
                         (102400, {1: 200, 20: 600, 100: 600})):
        for sessions in (1, 20, 100):
            for persistent in (False, True):
                cases.append(LoadCase(body, sessions, persistent, n(counts[sessions])))
    return cases


def make_server(name: str, work_root: Path) -> BenchServer:
    if name == "smtp-sink":
        return SmtpSink(work_root / "smtp-sink")
    if name == "aiosmtpd":
        return AiosmtpdMaildir(work_root / "aiosmtpd")
    if name == "postfix":
        return PostfixMaildir(work_root / "postfix")
    if name == "pymta":
        return Pymta(work_root / "pymta", sync="fsync")
    if name == "pymta/syncfs":
        return Pymta(work_root / "pymta-syncfs", sync="syncfs")
    if name == "pymta/metrics":
        return Pymta(work_root / "pymta-metrics", sync="fsync", metrics=True)
    raise SystemExit(f"bench: unknown server {name!r}; choose from "
                     f"{', '.join(ALL_SERVERS + EXTRA_SERVERS)}")


# -- one load case on one server -----------------------------------------------------

def run_case(server: BenchServer, case: LoadCase, time_cap: float, land_timeout: float) -> CaseResult:
    """smtp-source against the server, then check that every accepted message arrived."""
    sink_before = server.messages_seen() if isinstance(server, SmtpSink) else None
    cpu_before = tree_cpu_seconds(server.root_pid)
    started = time.perf_counter()
    load = run_smtp_source(server.port, case, time_cap)
    problem = load.problem
    landed: int | None = None
    if server.stores:
        wait_for_landing(server, load.accepted, land_timeout)
        landed_at = time.perf_counter()
        time.sleep(0.1)  # a duplicate delivery would show up now
        landed = server.delivered_count()
        assert landed is not None
        # smtp-source stopped at the cap may have had a 250 in flight that it never counted
        slack = case.sessions if load.capped else 0
        if landed < load.accepted:
            problem = append_problem(problem, f"LOST: {load.accepted - landed} of {load.accepted} accepted "
                                       f"messages not in the Maildir after {land_timeout:.0f}s")
        elif landed > load.accepted + slack:
            problem = append_problem(problem, f"{landed - load.accepted} more Maildir files than accepted messages")
    else:
        landed_at = started + load.seconds
        time.sleep(0.2)  # smtp-sink prints its counter as sessions end
        if isinstance(server, SmtpSink):
            sink_after = server.messages_seen()
            seen = (sink_after or 0) - (sink_before or 0)
            if sink_after is None:
                problem = append_problem(problem, f"no message counter in smtp-sink's output {server.log_path}")
            elif seen < load.accepted:
                problem = append_problem(problem, f"smtp-sink counted {seen} messages, smtp-source {load.accepted}")
    cpu_after = tree_cpu_seconds(server.root_pid)
    cpu_ms = (cpu_after - cpu_before) * 1000 / load.accepted if load.accepted else 0.0
    server.clear_delivered()
    return CaseResult(server=server.name, case=case.label, body_bytes=case.body_bytes,
                      sessions=case.sessions, persistent=case.persistent, asked=case.messages,
                      accepted=load.accepted, seconds=load.seconds, landed=landed,
                      seconds_to_landed=landed_at - started, cpu_ms_per_message=cpu_ms, problem=problem)


def warm_up(server: BenchServer, time_cap: float) -> None:
    load = run_smtp_source(server.port, LoadCase(1024, 10, False, 100), time_cap)
    if not load.complete:
        raise ServerStartError(f"{server.name}: warm-up run failed: {load.problem}; log {server.log_path}")
    if server.stores and wait_for_landing(server, load.accepted, 60) != load.accepted:
        raise ServerStartError(f"{server.name}: warm-up messages did not all land in "
                               f"{server.maildir_base} within 60s; log {server.log_path}")
    server.clear_delivered()


# -- the two parts of the run --------------------------------------------------------

def run_throughput(names: list[str], cases: list[LoadCase], args: argparse.Namespace,
                   report: RunReport) -> None:
    print("\n== throughput: starting servers", flush=True)
    running: list[BenchServer] = []
    try:
        start_servers(names, lambda name: make_server(name, args.work_dir),
                      lambda server: warm_up(server, args.time_cap), report, running)
        if not running:
            return
        #: per (server, case): the message count after a too-short first try
        counts: dict[tuple[str, str], int] = {}
        for case in cases:
            rounds = args.rounds if is_headline(case) or args.cases else 1
            print(f"\n== {case.label}" + (f" ({rounds} rounds)" if rounds > 1 else ""), flush=True)
            for round_number in range(rounds):
                # rotate the order each round so no server always goes first
                order = running[round_number % len(running):] + running[:round_number % len(running)]
                for server in order:
                    key = (server.name, case.label)
                    this = replace(case, messages=counts.get(key, case.messages))
                    result = run_case(server, this, args.time_cap, args.land_timeout)
                    if (args.min_seconds and not result.problem and result.accepted
                            and result.seconds < args.min_seconds and key not in counts):
                        # Too short to time well (smtp-sink, mostly): run it again, longer.
                        wanted = math.ceil(result.rate * args.min_seconds * 1.25)
                        counts[key] = min(case.messages * 20, max(wanted, case.messages))
                        print(format_progress(result) + f"  (too short: again with {counts[key]})",
                              flush=True)
                        result = run_case(server, replace(case, messages=counts[key]),
                                          args.time_cap, args.land_timeout)
                    report.cases.append(result)
                    print(format_progress(result), flush=True)
                    if result.problem:
                        report.problems.append(f"{server.name} {case.label}: {result.problem}")
    finally:
        for server in running:
            server.stop()
        for server in running:
            server.remove_delivered()


def run_footprint(names: list[str], args: argparse.Namespace, report: RunReport) -> None:
    """Each check on a freshly started server, so one check's garbage is not the next one's baseline."""
    for name in names:
        for test in ("idle", "large"):
            server = make_server(name, args.work_dir)
            label = (f"{args.idle_connections} idle connections" if test == "idle"
                     else f"one {args.large_message_mib} MiB message")
            print(f"\n== {name}: {label}", flush=True)
            try:
                server.start()
                if test == "idle":
                    idle = measure_idle_connections(server, args.idle_connections)
                    report.idle.append(idle)
                    print(f"   opened {idle.opened}/{idle.wanted} in {idle.seconds:.1f}s, RSS "
                          f"{idle.rss_before_kib / 1024:.1f} -> {idle.rss_after_kib / 1024:.1f} MiB, "
                          f"{idle.bytes_per_connection / 1024:.2f} KiB/connection"
                          + (f"; {idle.failed} failed, first: {idle.first_error}" if idle.failed else ""),
                          flush=True)
                    if idle.failed:
                        report.problems.append(f"{name} idle: {idle.failed} connections failed "
                                               f"({idle.first_error})")
                else:
                    large = measure_large_message(server, args.large_message_mib * 1024 * 1024)
                    report.large.append(large)
                    print(f"   250 after {large.seconds_to_250:.2f}s, landed after "
                          f"{large.seconds_to_landed:.2f}s, RSS {large.rss_before_kib / 1024:.1f} MiB "
                          f"+{large.growth_kib / 1024:.1f} MiB at peak"
                          + (f"; PROBLEM: {large.problem}" if large.problem else ""), flush=True)
                    if large.problem:
                        report.problems.append(f"{name} large message: {large.problem}")
            except ServerStartError as exc:
                report.not_started.setdefault(name, str(exc))
                print(f"   NOT MEASURED: {exc}", flush=True)
                break
            except Exception as exc:  # noqa: BLE001 - report it and go on with the next check
                report.problems.append(f"{name} {test}: {type(exc).__name__}: {exc}")
                print(f"   FAILED: {type(exc).__name__}: {exc}", flush=True)
            finally:
                server.stop()


# -- main ----------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark pymta against aiosmtpd, Postfix and smtp-sink on loopback.")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: a few hundred messages, 3 cases, 1000 idle connections, 10 MiB")
    parser.add_argument("--servers", default=",".join(ALL_SERVERS),
                        help=f"comma-separated subset of: {','.join(ALL_SERVERS)}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every message count by this")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of the headline cases (1 KiB, 20 sessions); median reported "
                             "(default 3, quick 1)")
    parser.add_argument("--time-cap", type=float, default=None,
                        help="seconds per load case before smtp-source is stopped (default 40, quick 20)")
    parser.add_argument("--min-seconds", type=float, default=None,
                        help="a case that ran shorter is run again with more messages (default 2, quick 0)")
    parser.add_argument("--land-timeout", type=float, default=60.0,
                        help="seconds to wait for accepted messages to appear in the Maildir")
    parser.add_argument("--cases", default=None,
                        help="only these load cases, by label, comma-separated (e.g. "
                             "\"1KiB s=1 1/conn,1KiB s=20 1/conn\"); each runs --rounds rounds")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-footprint", action="store_true")
    parser.add_argument("--footprint-servers", default="pymta,aiosmtpd",
                        help="servers for the idle/large-message checks (pymta is the one with targets)")
    parser.add_argument("--idle-connections", type=int, default=None, help="default 10000, quick 1000")
    parser.add_argument("--large-message-mib", type=int, default=None, help="default 50, quick 10")
    parser.add_argument("--work-dir", type=Path, default=BENCH_DIR / ".work")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default bench/results/<UTC time>.json)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not apt-get/pip install missing tools; fail instead")
    return apply_defaults(parser.parse_args(argv), {
        "rounds": (1, 3), "time_cap": (20.0, 40.0), "min_seconds": (0.0, 2.0),
        "idle_connections": (1000, 10000), "large_message_mib": (10, 50)})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = names_of(args.servers)
    footprint_names = names_of(args.footprint_servers)
    for n in names + footprint_names:
        make_server(n, args.work_dir)  # an unknown name stops here
    stop_on_sigterm()
    try:
        if args.no_install:
            missing = [t for t in ("smtp-source", "smtp-sink", "postfix") if not find_tool(t)]
            if missing:
                raise PrerequisiteError(f"missing tools: {', '.join(missing)}")
        else:
            ensure_all(need_postfix=True, need_aiosmtpd="aiosmtpd" in names + footprint_names)
    except PrerequisiteError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    fd_limit = raise_fd_limit(max(65536, 2 * args.idle_connections + 1024))
    if fd_limit < args.idle_connections + 256:
        print(f"bench: RLIMIT_NOFILE is {fd_limit}, too low for {args.idle_connections} connections",
              file=sys.stderr)
        return 2
    lock = lock_work_dir(args.work_dir, "bench")
    if lock is None:
        return 2
    started = dt.datetime.now(dt.timezone.utc)
    report = RunReport(started=started.strftime("%Y-%m-%d %H:%M UTC"), quick=args.quick,
                       machine=machine_info())
    cases = build_cases(args.quick, args.scale)
    if args.cases:
        wanted = [label.strip() for label in args.cases.split(",")]
        unknown = [label for label in wanted if label not in {case.label for case in cases}]
        if unknown:
            print(f"bench: unknown case {unknown[0]!r}; the cases: "
                  f"{', '.join(case.label for case in cases)}", file=sys.stderr)
            return 2
        cases = [case for case in cases if case.label in wanted]
    with measuring(report, "bench") as t0:
        if not args.skip_throughput:
            run_throughput(names, cases, args, report)
        if not args.skip_footprint:
            run_footprint(footprint_names, args, report)
    print_summary(report, names, cases)
    json_path = args.json or results_path("", started)
    write_json(report, json_path)
    print(f"\nbench: {time.monotonic() - t0:.0f}s; results written to {json_path}")
    return exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
