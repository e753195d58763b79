"""Relay throughput: pymta and Postfix empty a full queue into the same smtp-sink.

    .venv/bin/python bench/relay.py                  # 10,000 messages of 1 KiB, both MTAs
    .venv/bin/python bench/relay.py --messages 2000  # a quicker run

Each MTA starts with the same number of messages (1 KiB bodies, one
recipient each) waiting in its queue, all for one next hop: Postfix's
``smtp-sink`` on 127.0.0.1, shared by both runs.  The figure is messages per
second from the moment the MTA is told to deliver until the sink has counted
the last message:

* pymta: the messages are written into its spool directory (the documented
  on-disk format: body and envelope per message, fsynced), and ``twistd
  pymta`` starts with a ``smarthost`` backend pointing at the sink's port
  while the sink is still down: every message is tried once and deferred.
  Then the sink starts, and the clock starts at ``ETRN`` (RFC 1985), which
  makes the whole queue due at once.
* Postfix: a private instance (own config, queue and log directories, set
  up by tests/postfixkit.py as for bench/postfix_instance.py) receives the
  messages over SMTP from ``smtp-source`` and puts them on hold; the clock
  starts at ``postsuper -H ALL`` (hold to deferred) + ``postqueue -f``
  (flush), with ``relayhost = [127.0.0.1]:<sink>`` and Postfix's default
  delivery tuning.

Besides messages/second, the CPU time of each MTA's process tree over the
measured interval is divided by the messages (Postfix: master and its
children, including the smtp(8) processes it reaps).

Checks: the sink must count exactly the messages each MTA had queued, and
both queues must be empty at the end.  Results go to
``bench/results/relay-<UTC time>.json``.  Needs root (Postfix) and the
``postfix`` package (installed as for bench/run.py unless --no-install).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import results_path, utc_stamp  # noqa: E402
from prerequisites import PrerequisiteError, ensure_postfix, find_tool  # noqa: E402
from procstat import tree_cpu_seconds  # noqa: E402
from servers import BENCH_DIR, REPO_ROOT, SmtpSink, free_port, log_tail  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))
sys.path.append(str(REPO_ROOT / "tests"))

from postfixkit import PrivatePostfix  # noqa: E402
from pymta.envelope import Envelope, Recipient  # noqa: E402
from pymta.spool.queueid import new_queue_id  # noqa: E402
from pymta.spool.queuefile import queue_file_content  # noqa: E402

WORK = BENCH_DIR / ".work" / "relay"
SENDER = "sender@bench.localhost"
RECIPIENT = "user@relay.bench.test"

#: main.cf lines of the Postfix peer, besides the common ones and its relayhost (the sink)
POSTFIX_SETTINGS = """\
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
# everything received is put on hold until the measurement starts
smtpd_client_restrictions = check_client_access static:HOLD
"""


def body_of(size: int) -> bytes:
    """A message of ``size`` octets of body, CRLF lines of 78 characters."""
    head = (f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: relay bench\r\n"
            "Message-ID: <bench@bench.localhost>\r\n\r\n").encode()
    line = b"x" * 76 + b"\r\n"
    body = bytearray(head)
    while len(body) < len(head) + size:
        body += line
    return bytes(body[:len(head) + size - 2]) + b"\r\n"


class Sink:
    def __init__(self) -> None:
        self.server = SmtpSink(WORK / "sink")

    def count(self) -> int:
        """smtp-sink's counter: the last "mesg=N" of its -c output (read from the file's end)."""
        try:
            with open(self.server.log_path, "rb") as fp:
                fp.seek(0, os.SEEK_END)
                fp.seek(max(0, fp.tell() - 200))
                tail = fp.read().decode("ascii", "replace")
        except FileNotFoundError:
            return 0
        found = re.findall(r"mesg=(\d+)", tail)
        return int(found[-1]) if found else 0

    def wait_for(self, target: int, timeout: float) -> float | None:
        """Poll until the sink counted ``target`` messages; the time it happened, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count() >= target:
                return time.monotonic()
            time.sleep(0.02)
        return None


def add_rate(result: dict, count: int, start: float, done: float | None) -> bool:
    """The seconds and messages/second of a run whose sink got every message (``done``, the time
    it did) into ``result``; False for a run that did not finish."""
    if done is None:
        return False
    result["seconds"] = round(done - start, 3)
    result["messages_per_second"] = round(count / (done - start), 1)
    return True


# -- pymta -------------------------------------------------------------------------------

def fill_pymta_spool(spool: Path, count: int, body: bytes) -> None:
    queue = spool / "queue"
    for sub in ("tmp", "queue", "corrupt"):
        (spool / sub).mkdir(parents=True, mode=0o700)
    now = time.time()
    received = ("Received: from client.bench.localhost ([127.0.0.1])\r\n"
                "\tby pymta.bench.localhost (pymta) with ESMTP; bench\r\n")
    for _ in range(count):
        queue_id = new_queue_id()
        envelope = Envelope(queue_id, SENDER, [Recipient(RECIPIENT, RECIPIENT, "sink")], now,
                            size=len(body), prepend=[received])
        (queue / f"{queue_id}.msg").write_bytes(queue_file_content(body, envelope))
    os.sync()


def count_in_log(path: Path, text: str) -> int:
    try:
        return path.read_bytes().count(text.encode())
    except FileNotFoundError:
        return 0


def wait_until_idle(pid: int, quiet: float = 0.02, period: float = 0.5, timeout: float = 120) -> None:
    """Until the process tree used less than ``quiet`` CPU seconds in ``period`` seconds."""
    deadline = time.monotonic() + timeout
    last = tree_cpu_seconds(pid)
    while time.monotonic() < deadline:
        time.sleep(period)
        now = tree_cpu_seconds(pid)
        if now - last < quiet:
            return
        last = now


def run_pymta(sink: Sink, count: int, body: bytes, concurrency: int, timeout: float) -> dict:
    """Queue ``count`` messages in pymta while the sink is down, then start it and ETRN."""
    work = WORK / "pymta"
    spool = work / "spool"
    fill_pymta_spool(spool, count, body)
    port = free_port()
    config = work / "pymta.toml"
    config.write_text(f"""\
# written by bench/relay.py
[server]
hostname = "pymta.bench.localhost"
domains = ["bench.localhost"]

[spool]
directory = "{spool}"

[[listeners]]
name = "mx"
endpoint = "tcp:{port}:interface=127.0.0.1"

[queue]
concurrency = {concurrency}

[backends.local]
use = "maildir"
base = "{work / 'mail'}"

[backends.sink]
use = "smarthost"
host = "127.0.0.1:{sink.server.port}"
tls = "none"
max_connections = {concurrency}

[[routes]]
match = "bench.localhost"
backend = "local"

[[routes]]
match = "*"
backend = "sink"
""")
    twistd = Path(sys.executable).parent / "twistd"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                    os.environ.get("PYTHONPATH")])))
    log_path = work / "pymta.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([str(twistd if twistd.exists() else "twistd"), "-n", "--pidfile=",
                             "pymta", "--config", str(config)], cwd=work, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    result = {"mta": "pymta", "messages": count, "concurrency": concurrency}
    try:
        # 1. every message tried once against the closed sink port: all deferred
        deadline = time.monotonic() + timeout
        while count_in_log(log_path, "status=deferred") < count and time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"pymta exited:\n{log_tail(log_path)}")
            time.sleep(0.2)
        deferred = count_in_log(log_path, "status=deferred")
        if deferred < count:
            raise RuntimeError(f"only {deferred} of {count} deferred:\n{log_tail(log_path)}")
        wait_until_idle(proc.pid)            # the 10,000 envelope updates reach the disk
        # 2. the sink comes up; ETRN starts the delivery of the whole queue at once
        sink.server.start()
        before = sink.count()
        cpu_before = tree_cpu_seconds(proc.pid)
        start = time.monotonic()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo()
            code, text = client.docmd("ETRN", RECIPIENT.partition("@")[2])
        if code != 250:
            raise RuntimeError(f"ETRN refused: {code} {text!r}")
        done = sink.wait_for(before + count, timeout)
        result["cpu_ms_per_message"] = round(1000 * (tree_cpu_seconds(proc.pid) - cpu_before) / count, 3)
        deadline = time.monotonic() + 30
        while list((spool / "queue").glob("*.msg")) and time.monotonic() < deadline:
            time.sleep(0.1)
        result["received_by_sink"] = sink.count() - before
        result["left_in_queue"] = len(list((spool / "queue").glob("*.msg")))
        if not add_rate(result, count, start, done):
            result["problem"] = (f"sink counted {result['received_by_sink']} of {count} within "
                                 f"{timeout:.0f}s; log tail:\n{log_tail(log_path)}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            result.setdefault("problem", "pymta did not stop within 30 s of SIGTERM")
    return result


# -- Postfix -------------------------------------------------------------------------------

class PostfixRelay(PrivatePostfix):
    """A private Postfix relaying everything to the sink, with its default delivery tuning."""

    def __init__(self, sink_port: int) -> None:
        super().__init__(WORK / "postfix", free_port(), find_tool("postfix") or "postfix")
        self.sink_port = sink_port

    def tool(self, name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([find_tool(name) or name, "-c", str(self.config_dir), *args],
                              capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        self.configure(hostname="postfix.bench.localhost", mydomain="bench.localhost",
                       relayhost=f"[127.0.0.1]:{self.sink_port}", settings=POSTFIX_SETTINGS,
                       services=("smtp", "relay"))
        super().start()
        self.wait_for_banner()

    def queued(self) -> int:
        return sum(len(files) for sub in ("maildrop", "incoming", "active", "deferred", "hold")
                   for _, _, files in os.walk(self.queue_dir / sub))

    def held(self) -> int:
        return sum(len(files) for _, _, files in os.walk(self.queue_dir / "hold"))


def run_postfix(sink: Sink, count: int, body_size: int, timeout: float) -> dict:
    postfix = PostfixRelay(sink.server.port)
    try:
        postfix.start()
        source = subprocess.run([find_tool("smtp-source") or "smtp-source", "-s", "20", "-d",
                                 "-l", str(body_size), "-m", str(count), "-f", SENDER,
                                 "-t", RECIPIENT, f"127.0.0.1:{postfix.port}"],
                                capture_output=True, text=True, timeout=600)
        if source.returncode != 0:
            raise RuntimeError(f"smtp-source failed: {source.stderr.strip()}")
        deadline = time.monotonic() + 120
        while postfix.held() < count and time.monotonic() < deadline:
            time.sleep(0.2)
        held = postfix.held()
        if held != count:
            raise RuntimeError(f"postfix holds {held} of {count} messages")
        before = sink.count()
        master = postfix.master_pid
        assert master is not None, "postfix is not running"
        wait_until_idle(master)
        cpu_before = tree_cpu_seconds(master)
        start = time.monotonic()
        postfix.tool("postsuper", "-H", "ALL")
        postfix.tool("postqueue", "-f")
        done = sink.wait_for(before + count, timeout)
        cpu_ms = round(1000 * (tree_cpu_seconds(master) - cpu_before) / count, 3)
        deadline = time.monotonic() + 30
        while postfix.queued() and time.monotonic() < deadline:
            time.sleep(0.1)
        result = {"mta": "postfix", "messages": count, "received_by_sink": sink.count() - before,
                  "left_in_queue": postfix.queued(), "cpu_ms_per_message": cpu_ms}
        if not add_rate(result, count, start, done):
            result["problem"] = f"sink counted {sink.count() - before} of {count} within {timeout:.0f}s"
        return result
    finally:
        postfix.stop()


# -- main ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--body-size", type=int, default=1024)
    parser.add_argument("--concurrency", type=int, default=20,
                        help="pymta's [queue] concurrency and connections to the sink "
                             "(Postfix: default_destination_concurrency_limit = 20)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per MTA run")
    parser.add_argument("--only", choices=("pymta", "postfix"), help="run one MTA only")
    parser.add_argument("--no-install", action="store_true", help="do not apt-get install postfix")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/relay.py: needs root (the Postfix peer)", file=sys.stderr)
        return 2
    try:
        if not args.no_install:
            ensure_postfix()
    except PrerequisiteError as e:
        print(f"bench/relay.py: {e}", file=sys.stderr)
        return 2
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir(parents=True)
    sink = Sink()
    results = []
    try:
        body = body_of(args.body_size)
        if args.only != "postfix":
            print(f"pymta: {args.messages} messages of {args.body_size} octets ...", flush=True)
            results.append(run_pymta(sink, args.messages, body, args.concurrency, args.timeout))
        if sink.server.process is None:
            sink.server.start()
        if args.only != "pymta":
            print(f"postfix: {args.messages} messages of {args.body_size} octets ...", flush=True)
            results.append(run_postfix(sink, args.messages, args.body_size, args.timeout))
    finally:
        sink.server.stop()
    problems = 0
    print()
    print(f"{'MTA':<10} {'msg/s':>10} {'seconds':>9} {'CPU ms/msg':>11} {'sink got':>9} {'left':>6}")
    for r in results:
        ok = r["received_by_sink"] == r["messages"] and r["left_in_queue"] == 0 and "problem" not in r
        problems += not ok
        print(f"{r['mta']:<10} {r.get('messages_per_second', '-'):>10} {r.get('seconds', '-'):>9} "
              f"{r.get('cpu_ms_per_message', '-'):>11} {r['received_by_sink']:>9} "
              f"{r['left_in_queue']:>6}{'' if ok else '  !'}")
        if "problem" in r:
            print(f"  {r['problem']}")
    rates = {r["mta"]: r.get("messages_per_second") for r in results}
    if rates.get("pymta") and rates.get("postfix"):
        ratio = rates["pymta"] / rates["postfix"]
        print(f"\npymta / postfix: {ratio:.2f}x  (target: at least 1.00x: "
              f"{'OK' if ratio >= 1 else 'MISSED'})")
    now = dt.datetime.now(dt.timezone.utc)
    path = results_path("relay-", now)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"time": utc_stamp(now), "results": results}, indent=2) + "\n")
    print(f"results: {path}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
