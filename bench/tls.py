"""STARTTLS benchmark: handshakes/s and messages/s over TLS, pymta next to Postfix, same certificate.

    .venv/bin/python bench/tls.py            # full run, 1,000 jobs per case (1.5-3 min on 2 cores)
    .venv/bin/python bench/tls.py --quick    # smoke run, 200 jobs per case

One self-signed certificate (ECDSA P-256 by default; --certificates rsa or
ecdsa,rsa for RSA 2048) is made for the run and given to both servers.  Both
run at once on 127.0.0.1, idle unless driven; each case is run against each
server in turn, in a rotated order each round.  The cases: STARTTLS
handshakes, messages with one STARTTLS per message, messages in persistent
STARTTLS sessions, and (one round only) the same persistent sessions without
TLS as a control.  The client is bench/tls_load.py (blocking ssl sockets, 20
sessions in threads over 2 processes).  Every accepted message must be a file
in the server's Maildir.  See the STARTTLS
section of bench/README.md.  Exit status as bench/run.py: 1 when a server lost
or refused something or could not be measured, 2 when the bench could not run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import ssl
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from footprint import wait_for_landing  # noqa: E402
from harness import (append_problem, apply_defaults, busy_load, exit_status, lock_work_dir,  # noqa: E402
                     measuring, median_round, names_of, print_unmeasured_and_problems, results_path,
                     spread, start_servers, stop_on_sigterm)
from postfix_instance import PostfixMaildir  # noqa: E402
from prerequisites import PrerequisiteError, ensure_all, find_tool  # noqa: E402
from procstat import tree_cpu_seconds  # noqa: E402
from report import machine_info  # noqa: E402
from servers import BENCH_DIR, REPO_ROOT, BenchServer, Pymta, ServerStartError, TlsFiles  # noqa: E402
from tls_load import KINDS, SERVER_NAME, TlsCase, TlsLoadResult, run_tls_load  # noqa: E402

ALL_SERVERS = ("pymta", "postfix", "pymta/syncfs")
CERTIFICATE_KINDS = {"ecdsa": "ECDSA P-256", "rsa": "RSA 2048"}
#: cases run in the first round only (the rounds are for the STARTTLS figures)
CONTROL_KINDS = ("msg/session-plain",)


# -- the certificate -----------------------------------------------------------------

def make_certificate(directory: Path, kind: str) -> TlsFiles:
    """A fresh self-signed certificate for bench.localhost (key mode 600), valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1()) if kind == "ecdsa" else rsa.generate_private_key(65537, 2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SERVER_NAME)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SERVER_NAME)]), critical=False)
            .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(certificate=directory / f"{kind}-cert.pem", key=directory / f"{kind}-key.pem")
    files.key.unlink(missing_ok=True)
    files.key.touch(mode=0o600)
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    files.certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def certificate_sha256(files: TlsFiles) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    cert = x509.load_pem_x509_certificate(files.certificate.read_bytes())
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


# -- servers and cases ---------------------------------------------------------------

def make_server(name: str, work_root: Path, tls: TlsFiles) -> BenchServer:
    if name == "pymta":
        return Pymta(work_root / "tls-pymta", sync="fsync", tls=tls)
    if name == "pymta/syncfs":
        return Pymta(work_root / "tls-pymta-syncfs", sync="syncfs", tls=tls)
    if name == "postfix":
        return PostfixMaildir(work_root / "tls-postfix", tls=tls)
    raise SystemExit(f"bench/tls.py: unknown server {name!r}; choose from {', '.join(ALL_SERVERS)}")


def build_cases(jobs: int, sessions: int) -> list[TlsCase]:
    return [TlsCase(kind, jobs, sessions) for kind in KINDS]


@dataclass
class TlsCaseResult:
    """One case against one server in one round."""

    server: str
    certificate: str
    case: str
    kind: str
    round: int
    load: TlsLoadResult
    #: Maildir files that appeared (None for the handshake case, which sends no mail)
    landed: int | None
    #: server tree CPU from before the load until the last message landed, per completed job
    server_cpu_ms: float
    problem: str = ""

    @property
    def rate(self) -> float:
        return self.load.rate


def run_case(server: BenchServer, case: TlsCase, certificate: str, round_number: int,
             args: argparse.Namespace) -> TlsCaseResult:
    cpu_before = tree_cpu_seconds(server.root_pid)
    load = run_tls_load(server.port, case, args.client_processes, args.time_cap)
    problem = load.problem
    landed: int | None = None
    if case.kind != "handshake":
        wait_for_landing(server, load.completed, args.land_timeout)
        time.sleep(0.1)  # a duplicate delivery would show up now
        landed = server.delivered_count()
        assert landed is not None
        # a 250 may have been on its way when a session failed or the cap stopped it
        slack = load.failed + (case.sessions if load.capped else 0)
        if landed < load.completed:
            problem = append_problem(problem, f"LOST: {load.completed - landed} of {load.completed} accepted "
                                       f"messages not in {server.maildir_base} after {args.land_timeout:.0f}s")
        elif landed > load.completed + slack:
            problem = append_problem(problem, f"{landed - load.completed} more Maildir files than accepted messages")
    else:
        time.sleep(0.1)  # let the server finish closing the last connections
    cpu_after = tree_cpu_seconds(server.root_pid)
    if load.completed < case.jobs and not load.capped and not load.failed:
        problem = append_problem(problem, f"only {load.completed} of {case.jobs} completed")
    server.clear_delivered()
    cpu_ms = 1000 * (cpu_after - cpu_before) / load.completed if load.completed else 0.0
    return TlsCaseResult(server=server.name, certificate=certificate, case=case.label, kind=case.kind,
                         round=round_number, load=load, landed=landed, server_cpu_ms=cpu_ms, problem=problem)


def warm_up(server: BenchServer, files: TlsFiles, args: argparse.Namespace) -> None:
    """A few messages over STARTTLS: they must land, and the server must present our certificate."""
    try:
        load = run_tls_load(server.port, TlsCase("msg/conn", 40, 10), 1, args.time_cap)
    except RuntimeError as exc:
        raise ServerStartError(f"{server.name}: STARTTLS warm-up failed: {exc}") from exc
    if load.failed or load.completed != 40:
        raise ServerStartError(f"{server.name}: STARTTLS warm-up failed ({load.completed}/40 sent; "
                               f"{load.problem}); log {server.log_path}")
    if load.certificate_sha256 != certificate_sha256(files):
        raise ServerStartError(f"{server.name} presented a certificate other than {files.certificate}")
    if wait_for_landing(server, 40, args.land_timeout) != 40:
        raise ServerStartError(f"{server.name}: warm-up messages did not all land in {server.maildir_base} "
                               f"within {args.land_timeout:.0f}s; log {server.log_path}")
    server.clear_delivered()


# -- the run -------------------------------------------------------------------------

@dataclass
class TlsRunReport:
    started: str
    quick: bool
    machine: dict[str, str]
    client_processes: int
    sessions: int
    results: list[TlsCaseResult] = field(default_factory=list)
    not_started: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def rounds(self, server: str, certificate: str, kind: str) -> list[TlsCaseResult]:
        return [r for r in self.results if (r.server, r.certificate, r.kind) == (server, certificate, kind)]


def format_progress(r: TlsCaseResult) -> str:
    landed = "" if r.landed is None else f", landed {r.landed}"
    status = f"  PROBLEM: {r.problem}" if r.problem else ""
    return (f"   {r.case:<22} {r.server:<13} {r.load.completed:>5} in {r.load.seconds:6.2f}s = "
            f"{r.rate:6.0f}/s, server CPU {r.server_cpu_ms:5.2f} ms, client CPU {r.load.client_cpu_ms:5.2f} ms "
            f"({100 * r.load.client_busy:.0f}% busy){landed}{status}")


def run_certificate(kind: str, names: list[str], cases: list[TlsCase], args: argparse.Namespace,
                    report: TlsRunReport) -> None:
    certificate = CERTIFICATE_KINDS[kind]
    files = make_certificate(args.work_dir / "tls-certificates", kind)
    print(f"\n== {certificate} certificate {files.certificate}: starting servers", flush=True)
    running: list[BenchServer] = []
    try:
        start_servers(names, lambda name: make_server(name, args.work_dir, files),
                      lambda server: warm_up(server, files, args), report, running,
                      label=lambda name: f"{name} ({certificate})")
        for round_number in range(args.rounds):
            for case in cases:
                if case.kind in CONTROL_KINDS and round_number > 0:
                    continue  # the no-TLS control is a reference: one round keeps the run short
                print(f"\n== {certificate}: {case.label}, round {round_number + 1}/{args.rounds}", flush=True)
                shift = (round_number + cases.index(case)) % max(1, len(running))
                for server in running[shift:] + running[:shift]:
                    try:
                        result = run_case(server, case, certificate, round_number, args)
                    except RuntimeError as exc:  # a client process that did not start or finish
                        report.problems.append(f"{server.name} {certificate} {case.label}: {exc}")
                        print(f"   {server.name}: FAILED: {exc}", flush=True)
                        continue
                    report.results.append(result)
                    print(format_progress(result), flush=True)
                    if result.problem:
                        report.problems.append(f"{server.name} {certificate} {case.label} round "
                                               f"{round_number + 1}: {result.problem}")
    finally:
        for server in running:
            server.stop()


# -- printing ------------------------------------------------------------------------

KIND_TITLES = {"handshake": "handshakes/s", "msg/conn": "msg/s, 1 msg/conn", "msg/session": "msg/s, session",
               "msg/session-plain": "msg/s, no TLS"}


def summary_lines(report: TlsRunReport, names: list[str], certificates: list[str]) -> list[str]:
    lines: list[str] = []
    for certificate in certificates:
        measured = [n for n in names if any(r.server == n and r.certificate == certificate
                                            for r in report.results)]
        if not measured:
            continue
        negotiated = sorted({f"{r.load.tls_version} {r.load.cipher}" for r in report.results
                             if r.certificate == certificate and r.load.tls_version})
        lines.append(f"\n{certificate} certificate, {' / '.join(negotiated) or 'no TLS session'}, "
                     f"{report.sessions} sessions, client in {report.client_processes} processes"
                     + (f", median of {len(report.rounds(measured[0], certificate, 'handshake'))} rounds "
                        "(no-TLS control: 1)"
                        if len(report.rounds(measured[0], certificate, "handshake")) > 1 else ""))
        lines.append(f"  {'case':<20} {'server':<13} {'rate':>8} {'spread':>7} {'srv CPU ms':>11} "
                     f"{'cli CPU ms':>11} {'cli busy':>9} {'TLS hs ms':>10}")
        for kind in KINDS:
            for name in measured:
                rounds = report.rounds(name, certificate, kind)
                if not rounds:
                    continue
                m = median_round(rounds)
                flag = "!" if any(r.problem for r in rounds) else ""
                lines.append(f"  {KIND_TITLES[kind]:<20} {name:<13} {m.rate:>7.0f}{flag:1} {spread(rounds):>7} "
                             f"{m.server_cpu_ms:>11.2f} {m.load.client_cpu_ms:>11.2f} "
                             f"{100 * m.load.client_busy:>8.0f}% "
                             + (f"{m.load.handshake_ms_median:>10.1f}" if m.load.handshake_ms else f"{'-':>10}"))
        for name in measured:
            if name == "postfix" or "postfix" not in measured:
                continue
            parts = []
            for kind in KINDS:
                mine, peer = report.rounds(name, certificate, kind), report.rounds("postfix", certificate, kind)
                if not mine or not peer:
                    continue
                a, b = median_round(mine), median_round(peer)
                rate = f"{a.rate / b.rate:.2f}x" if b.rate else "n/a"
                cpu = f"{a.server_cpu_ms / b.server_cpu_ms:.2f}x" if b.server_cpu_ms else "n/a"
                flag = " (UNRELIABLE)" if any(r.problem for r in mine + peer) else ""
                parts.append(f"{KIND_TITLES[kind]} {rate} (CPU/op {cpu}){flag}")
            lines.append(f"  {name} / postfix: " + "; ".join(parts))
    return lines


def print_summary(report: TlsRunReport, names: list[str], certificates: list[str]) -> None:
    print("\n" + "=" * 78)
    print(f"pymta STARTTLS bench, {report.started}, {'quick' if report.quick else 'full'} run, "
          f"pymta {report.machine.get('commit', '?')}{report.machine.get('pymta_dirty', '')}, "
          f"{report.machine.get('cpus')} CPUs, load average {report.machine.get('load_at_start')} at start, "
          f"{report.machine.get('load_at_end', '?')} at end")
    print("rate: handshakes or messages per second; srv CPU: server process tree, ms per handshake or "
          "message;\ncli CPU / cli busy: the client's CPU per operation and as a share of its processes' "
          "capacity;\nTLS hs ms: median client-side handshake time; ! = see PROBLEMS")
    for line in summary_lines(report, names, certificates):
        print(line)
    busiest = max((r.load.client_busy for r in report.results), default=0.0)
    cpus = int(report.machine.get("cpus") or 1)
    print(f"\nThe client ran on the same {cpus} CPUs as the servers; its busiest case kept its "
          f"{report.client_processes} processes {100 * busiest:.0f}% busy"
          + (" (CLIENT-BOUND: add --client-processes)" if busiest > 0.8 else "") + ".")
    busy = busy_load(report.machine.get("load_at_start", ""), cpus)
    if busy:
        print(f"NOTE: the machine was busy when the run started (load average {busy} on {cpus} CPUs): "
              "absolute figures are low and noisy; the ratios, measured interleaved, suffer less.")
    print_unmeasured_and_problems(report)


def pymta_state() -> str:
    """' (+ uncommitted changes in pymta/)' when the working tree differs from HEAD there."""
    try:
        status = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "pymta"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return " (+ uncommitted changes in pymta/)" if status.stdout.strip() else ""


def write_json(report: TlsRunReport, path: Path, names: list[str], certificates: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = asdict(report)
    for row, r in zip(data["results"], report.results):
        row["rate"] = round(r.rate, 1)
        row["load"].pop("handshake_ms")
        row["load"]["handshake_ms_median"] = round(r.load.handshake_ms_median, 2)
        row["load"]["client_cpu_ms"] = round(r.load.client_cpu_ms, 3)
        row["load"]["client_busy"] = round(r.load.client_busy, 3)
    data["summary"] = summary_lines(report, names, certificates)
    path.write_text(json.dumps(data, indent=2) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="STARTTLS handshakes/s and messages/s, pymta next to Postfix.")
    parser.add_argument("--quick", action="store_true", help="smoke run: 200 jobs per case, one round")
    parser.add_argument("--servers", default="pymta,postfix",
                        help=f"comma-separated subset of: {','.join(ALL_SERVERS)}")
    parser.add_argument("--certificates", default="ecdsa",
                        help="key types, comma-separated: ecdsa (P-256), rsa (2048); one server start each")
    parser.add_argument("--jobs", type=int, default=None,
                        help="handshakes or messages per case (default 1000, quick 200)")
    parser.add_argument("--sessions", type=int, default=20, help="concurrent sessions")
    parser.add_argument("--client-processes", type=int, default=2, help="client processes sharing the sessions")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of the STARTTLS cases, median reported (default 3, quick 1); "
                             "the no-TLS control runs once")
    parser.add_argument("--time-cap", type=float, default=None,
                        help="seconds per case after which no new job starts (default 30, quick 15)")
    parser.add_argument("--land-timeout", type=float, default=60.0,
                        help="seconds to wait for accepted messages to appear in the Maildir")
    parser.add_argument("--work-dir", type=Path, default=BENCH_DIR / ".work",
                        help="shared with bench/run.py (and its lock), subdirectories tls-*")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default bench/results/tls-<UTC time>.json)")
    parser.add_argument("--no-install", action="store_true",
                        help="do not apt-get install Postfix when missing; fail instead")
    return apply_defaults(parser.parse_args(argv), {"jobs": (200, 1000), "rounds": (1, 3),
                                                    "time_cap": (15.0, 30.0)})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = names_of(args.servers)
    kinds = names_of(args.certificates)
    for kind in kinds:
        if kind not in CERTIFICATE_KINDS:
            raise SystemExit(f"bench/tls.py: unknown certificate type {kind!r}; choose from ecdsa, rsa")
    for name in names:
        make_server(name, args.work_dir, TlsFiles(Path("-"), Path("-")))  # an unknown name stops here
    stop_on_sigterm()
    try:
        if args.no_install and "postfix" in names and not find_tool("postfix"):
            raise PrerequisiteError("missing tool: postfix")
        if not args.no_install:
            ensure_all(need_postfix="postfix" in names, need_aiosmtpd=False)
    except PrerequisiteError as exc:
        print(f"bench/tls.py: {exc}", file=sys.stderr)
        return 2
    lock = lock_work_dir(args.work_dir, "bench/tls.py")
    if lock is None:
        return 2
    started = dt.datetime.now(dt.timezone.utc)
    machine = machine_info()
    machine.pop("aiosmtpd", None)
    machine["pymta_dirty"] = pymta_state()
    machine["client_openssl"] = ssl.OPENSSL_VERSION
    try:
        from OpenSSL import SSL
        machine["pymta_openssl"] = SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode()
    except Exception:  # noqa: BLE001 - informational only
        pass
    report = TlsRunReport(started=started.strftime("%Y-%m-%d %H:%M UTC"), quick=args.quick, machine=machine,
                          client_processes=args.client_processes, sessions=args.sessions)
    cases = build_cases(args.jobs, args.sessions)
    with measuring(report, "bench/tls.py") as t0:
        for kind in kinds:
            run_certificate(kind, names, cases, args, report)
    certificates = [CERTIFICATE_KINDS[k] for k in kinds]
    print_summary(report, names, certificates)
    json_path = args.json or results_path("tls-", started)
    write_json(report, json_path, names, certificates)
    print(f"\nbench/tls.py: {time.monotonic() - t0:.0f}s; results written to {json_path}")
    return exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
