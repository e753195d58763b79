"""Prometheus metrics: a real server, real mail (smtplib), the numbers scraped over HTTP.

Every count is checked as the difference between a scrape before and one
after what the test sent, so the start-up probe of the fixture and the
order of tests do not matter.
"""

from __future__ import annotations

import os
import re
import smtplib
import socket
import subprocess
import textwrap
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from argon2 import PasswordHasher
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactor

from certs import client_tls, make_cert
from conftest import BACKEND_TOML, TWISTD, free_port, routes_toml, wait_for_log
from pymta.config.errors import ConfigError
from pymta.config.loader import load_config
from pymta.config.model import PluginInstance
from pymta.metrics.families import HistogramFamily
from pymta.metrics.instruments import ServerMetrics
from pymta.server.chain import run_chain

HASHER = PasswordHasher(time_cost=1, memory_cost=64, parallelism=1)
MESSAGE = b"Subject: metrics\r\n\r\nhello\r\n"


def scrape(port: int) -> dict[tuple, float]:
    """The server's samples: (name, sorted label pairs) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/plain")
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_when(port: int, ready, what: str, timeout: float = 20.0) -> dict:
    """The first scrape for which ``ready(samples)`` is true."""
    deadline = time.monotonic() + timeout
    while True:
        samples = scrape(port)
        if ready(samples):
            return samples
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.fixture
def metered(make_server):
    """pymta with metrics on: an mx listener (no relay for anyone), a submission listener
    (STARTTLS, AUTH) and a relay route to a closed port (retried only after an hour)."""
    srv = make_server("", start=False, server_toml="trusted_networks = []")
    cert, key = make_cert(srv.dir, "server")
    passwd = srv.dir / "passwd"
    passwd.write_text(f"alice:{HASHER.hash('correct horse')}\n")
    passwd.chmod(0o600)
    srv.sub_port, srv.metrics_port = free_port(), free_port()
    srv.config.write_text(srv.config.read_text() + textwrap.dedent(f"""
        [[listeners]]
        name = "submission"
        endpoint = "tcp:{srv.sub_port}:interface=127.0.0.1"
        role = "submission"

        [tls]
        certificate = "{cert}"
        key = "{key}"

        [limits]
        auth_failure_delay = 0.1

        [queue]
        retry_initial = "1h"

        [stages]
        auth = ["passwords"]

        [plugins.passwords]
        use = "passwdfile"
        file = "passwd"

        [metrics]
        endpoint = "tcp:{srv.metrics_port}:interface=127.0.0.1"

        [backends.out]
        use = "smarthost"
        host = "127.0.0.1:{free_port()}"
        tls = "none"
        """) + BACKEND_TOML + routes_toml(("example.test", "local"), ("*", "out")))
    return srv.start()


def test_scraped_numbers_match_what_was_sent(metered):
    srv = metered
    before = scrape(srv.metrics_port)

    # mx: one message accepted, one recipient refused at RCPT (no relaying here)
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        assert s.docmd("MAIL FROM:<alice@example.test>")[0] == 503     # before EHLO
        s.ehlo("client.example")
        assert s.docmd("FROB")[0] == 500
        s.mail("alice@example.test")
        assert s.rcpt("bob@example.test")[0] == 250
        assert s.rcpt("carol@elsewhere.example")[0] == 554
        code, _ = s.data(MESSAGE)
        assert code == 250

    # submission: STARTTLS, a wrong password, the right one, a message relayed to a closed port
    with smtplib.SMTP("127.0.0.1", srv.sub_port) as s:
        s.starttls(context=client_tls())
        s.ehlo()
        s.user, s.password = "alice", "wrong"
        with pytest.raises(smtplib.SMTPAuthenticationError):
            s.auth("PLAIN", s.auth_plain)         # one attempt (login() would try LOGIN too)
        s.login("alice", "correct horse")
        s.sendmail("alice@example.test", ["dave@far.example"], MESSAGE)

    # a STARTTLS whose handshake never happens
    with socket.create_connection(("127.0.0.1", srv.sub_port), timeout=10) as raw:
        stream = raw.makefile("rwb")
        assert stream.readline().startswith(b"220")
        stream.write(b"EHLO client.example\r\nSTARTTLS\r\n")
        stream.flush()
        while not stream.readline().startswith(b"220 "):
            pass
        stream.close()         # (the socket closes only once its file is closed too)

    wait_for_log(srv, r"to=<bob@example.test>.*status=sent")
    wait_for_log(srv, r"to=<dave@far.example>.*status=deferred")
    sizes = [int(n) for n in re.findall(r"client=.*, size=(\d+), nrcpt=1", srv.log_text())]
    assert len(sizes) == 2

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    # the sessions closed, and the deferral's envelope update applied
    after = scrape_when(srv.metrics_port, lambda samples: (
        value(samples, "pymta_sessions_open") == 0
        and value(samples, "pymta_spool_batch_changes_sum", kind="updates")
        > value(before, "pymta_spool_batch_changes_sum", kind="updates")), "the update")

    expected = [  # (metric, labels, how much it grew)
        ("pymta_connections_total", {"listener": "mx"}, 1),
        ("pymta_connections_total", {"listener": "submission"}, 2),
        ("pymta_sessions_total", {"listener": "mx", "outcome": "quit"}, 1),
        ("pymta_sessions_total", {"listener": "submission", "outcome": "quit"}, 1),
        ("pymta_sessions_total", {"listener": "submission", "outcome": "disconnect"}, 1),
        ("pymta_smtp_rejected_commands_total", {"stage": "rcpt", "code_class": "5xx"}, 1),
        ("pymta_smtp_rejected_commands_total", {"stage": "auth", "code_class": "5xx"}, 1),
        ("pymta_smtp_protocol_errors_total", {"listener": "mx"}, 2),
        ("pymta_smtp_protocol_errors_total", {"listener": "submission"}, 0),
        ("pymta_messages_accepted_total", {"listener": "mx"}, 1),
        ("pymta_messages_accepted_total", {"listener": "submission"}, 1),
        ("pymta_tls_handshakes_total", {"listener": "submission", "result": "ok"}, 1),
        ("pymta_tls_handshakes_total", {"listener": "submission", "result": "failed"}, 1),
        ("pymta_auth_attempts_total", {"mechanism": "PLAIN", "result": "failure"}, 1),
        ("pymta_auth_attempts_total", {"mechanism": "PLAIN", "result": "success"}, 1),
        ("pymta_delivery_recipients_total", {"backend": "local", "status": "delivered"}, 1),
        ("pymta_delivery_recipients_total", {"backend": "out", "status": "deferred"}, 1),
        ("pymta_delivery_recipients_total", {"backend": "out", "status": "bounced"}, 0),
        ("pymta_delivery_attempt_duration_seconds_count", {"backend": "out"}, 1),
        ("pymta_delivery_delay_seconds_count", {"backend": "local"}, 1),
        # the rcpt stage's plugin (localdomain) answered for bob and dave; carol was
        # refused (no relaying) before the plugins were asked
        ("pymta_plugin_duration_seconds_count", {"stage": "rcpt", "plugin": "localdomain"}, 2),
        # the password file's checker, for both logins
        ("pymta_plugin_duration_seconds_count", {"stage": "auth", "plugin": "passwords"}, 2),
    ]
    grown = [(name, labels, delta(name, **labels)) for name, labels, _ in expected]
    assert grown == expected
    assert delta("pymta_received_bytes_total", listener="mx") + \
        delta("pymta_received_bytes_total", listener="submission") == sum(sizes)
    # two commits (in one or two batches), each timed until durable
    assert delta("pymta_spool_batch_changes_sum", kind="commits") == 2
    assert delta("pymta_spool_commit_duration_seconds_count") == 2
    assert delta("pymta_spool_batch_changes_sum", kind="updates") == 1      # the deferral
    # the queue now: the deferred message, waiting an hour for its retry
    assert value(after, "pymta_queue_messages", state="deferred") == 1
    assert value(after, "pymta_queue_messages", state="active") == 0
    assert value(after, "pymta_queue_messages", state="held") == 0
    assert 0 < value(after, "pymta_queue_oldest_message_age_seconds") < 120
    assert value(after, "pymta_deliveries_in_flight") == 0
    assert value(after, "process_resident_memory_bytes") > 0

    # other paths are not found; scrapes are not logged
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{srv.metrics_port}/", timeout=10)
    assert info.value.code == 404
    log = srv.log_text()
    assert f"metrics served on tcp:{srv.metrics_port}:interface=127.0.0.1 at /metrics" in log
    assert "GET /metrics" not in log


def test_openmetrics_on_request(metered):
    request = urllib.request.Request(f"http://127.0.0.1:{metered.metrics_port}/metrics",
                                     headers={"Accept": "application/openmetrics-text"})
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert answer.headers["Content-Type"].startswith("application/openmetrics-text")
        text = answer.read().decode()
    assert text.rstrip().endswith("# EOF")
    assert "pymta_queue_messages" in text


def listening_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its own sockets, from /proc).

    /proc/net/tcp is generated in pieces as it is read: a read while other
    sockets come and go (the other tests) can miss a line, never invent
    one.  So the ports of several reads are put together.
    """
    ports: set[int] = set()
    for _ in range(5):
        ports |= _listening_ports_once(pid)
        time.sleep(0.05)
    return ports


def _listening_ports_once(pid: int) -> set[int]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:        # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    assert inodes, f"no socket among the open files of process {pid}"
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:       # 0A: LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_metrics_off_by_default_opens_no_port(server):
    assert listening_ports(server.proc.pid) == {server.port}
    assert "metrics served" not in server.log_text()


def test_metrics_on_opens_its_port(metered):
    assert listening_ports(metered.proc.pid) == {metered.port, metered.sub_port,
                                                 metered.metrics_port}


@pytest.mark.parametrize("table, key, problem", [
    ('endpoint = "tcp:notaport"', "metrics.endpoint", "invalid endpoint 'tcp:notaport'"),
    ('endpoint = "nosuch:9187"', "metrics.endpoint", "invalid endpoint 'nosuch:9187'"),
    ("endpoint = 9187", "metrics.endpoint", "expected a string"),
    ('endpont = "tcp:9187"', "metrics.endpont", "unknown key (did you mean 'endpoint'?)"),
])
def test_a_bad_metrics_table_is_a_config_error_naming_the_key(tmp_path, table, key, problem):
    path = tmp_path / "pymta.toml"
    path.write_text(f"[spool]\ndirectory = \"spool\"\n\n[metrics]\n{table}\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(path), MemoryReactor())
    message = str(info.value)
    assert message.startswith(f"{path}: {key}: ") and problem in message, message
    assert "\n" not in message


def failed_start(make_server, metrics_table: str) -> tuple[str, str]:
    """(config file, what twistd printed) for a server with ``metrics_table`` that did
    not start (exit status 1)."""
    srv = make_server(BACKEND_TOML + "\n[metrics]\n" + metrics_table, start=False)
    done = subprocess.run([TWISTD, "-n", "--pidfile=", "pymta", "--config", str(srv.config)],
                          cwd=srv.dir, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr + done.stdout
    return str(srv.config), done.stderr + done.stdout


def test_a_bad_endpoint_stops_start_up_with_one_line(make_server):
    config, output = failed_start(make_server, 'endpoint = "tcp:notaport"\n')
    assert f"pymta: configuration error: {config}: metrics.endpoint: invalid endpoint " \
           f"'tcp:notaport'" in output, output


def test_a_busy_metrics_port_stops_start_up_naming_the_key(make_server):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _config, output = failed_start(make_server, f'endpoint = "tcp:{port}:interface=127.0.0.1"\n')
    assert f"pymta: cannot listen: metrics.endpoint (tcp:{port}:interface=127.0.0.1): " \
           in output, output


# -- the parts, without a server ---------------------------------------------------

def test_histogram_buckets_are_inclusive_and_cumulative():
    histogram = HistogramFamily("h_seconds", "h", ["stage"], [1, 2])
    for amount in (0.5, 1, 1.5, 3):
        histogram.observe(("rcpt",), amount)
    samples = {(s.name, s.labels.get("le")): s.value for s in histogram.family().samples}
    assert samples == {("h_seconds_bucket", "1.0"): 2, ("h_seconds_bucket", "2.0"): 3,
                       ("h_seconds_bucket", "+Inf"): 4, ("h_seconds_count", None): 4,
                       ("h_seconds_sum", None): 6.0}


def test_families_without_labels_are_there_from_the_start():
    metrics = ServerMetrics(process=False)
    samples = {s.name: s.value for family in metrics.registry.collect() for s in family.samples}
    assert samples["pymta_spool_commit_duration_seconds_count"] == 0
    assert "pymta_connections_total" not in samples       # labelled: once a listener counts


def test_a_deferred_plugin_is_timed_until_it_fires():
    answer = Deferred()
    plugin = PluginInstance("slow", "slow", SimpleNamespace(check=lambda: answer))
    timed = []
    result = run_chain([plugin], "check", stage="rcpt",
                       observer=lambda *args: timed.append(args))
    assert timed == [] and not result.called
    answer.callback(None)
    assert [(stage, seen.name, outcome) for stage, seen, outcome, _ in timed] == [("rcpt", "slow", None)]
    assert timed[0][3] >= 0 and result.called


def test_sessions_refused_by_a_limit_and_timed_out(make_server):
    metrics_port = free_port()
    srv = make_server(BACKEND_TOML + textwrap.dedent(f"""
        [limits]
        max_connections_per_ip = 1
        idle_timeout = 1

        [metrics]
        endpoint = "tcp:{metrics_port}:interface=127.0.0.1"
        """))
    before = scrape(metrics_port)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as first:
        assert first.recv(100).startswith(b"220")
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as second:
            assert second.recv(100).startswith(b"421 4.7.0")
        assert b"421" in first.recv(100)              # the idle timeout, after a second
    after = scrape_when(metrics_port, lambda samples: value(
        samples, "pymta_sessions_total", listener="mx", outcome="timeout") == 1, "the timeout")
    outcomes = {outcome: value(after, "pymta_sessions_total", listener="mx", outcome=outcome)
                - value(before, "pymta_sessions_total", listener="mx", outcome=outcome)
                for outcome in ("limit", "timeout", "quit", "disconnect")}
    assert outcomes == {"limit": 1, "timeout": 1, "quit": 0, "disconnect": 0}
    assert value(after, "pymta_connections_total", listener="mx") \
        - value(before, "pymta_connections_total", listener="mx") == 2
